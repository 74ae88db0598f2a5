"""Supervised chat fine-tuning: (image?, question) -> answer examples, the loss on the answer only."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from finedefics.models.mllm import MLLM


@dataclass(frozen=True)
class ChatExample:
    question: str
    answer: str
    image: str | None = None  # path of the image, or None for a text-only example
    whole: bool = False  # language-model the whole dialogue, not just the answer


def load_image(path: str) -> Image.Image:
    with Image.open(Path(path)) as im:
        return im.convert("RGB")


def encode(mllm: MLLM, examples: list[ChatExample]) -> dict[str, torch.Tensor]:
    """A right-padded batch whose labels are the answer tokens and the end of the turn (the whole
    dialogue for examples marked `whole`)."""
    with_image = examples[0].image is not None
    if any((e.image is not None) != with_image for e in examples):
        raise ValueError("a batch mixes examples with and without an image")
    images = {"images": [[load_image(e.image)] for e in examples]} if with_image else {}
    prompts = [mllm.prompt(e.question, image=with_image) for e in examples]
    end = mllm.turn_end
    full = [f"{p} {e.answer}{end}" for p, e in zip(prompts, examples)]
    mllm.tokenizer.padding_side = "right"
    batch = mllm.processor(text=full, return_tensors="pt", padding=True, **images)
    prompt_lens = mllm.processor(text=prompts, return_tensors="pt", padding=True, **images)["attention_mask"].sum(1)
    labels = batch["input_ids"].clone()
    positions = torch.arange(labels.shape[1])[None]
    answer_only = torch.tensor([not e.whole for e in examples])[:, None]
    labels[((positions < prompt_lens[:, None]) & answer_only) | (batch["attention_mask"] == 0)] = -100
    batch["labels"] = labels
    return dict(batch)


def answer_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The answer tokens' cross-entropy, averaged per example, then over examples: a one-letter
    answer weighs as much as a sixty-token caption (a token mean would drown it)."""
    labels = batch["labels"]
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1].float()
    targets = labels[:, 1:]
    per_token = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none"
    )
    per_token = per_token.view(targets.shape)
    counts = (targets != -100).sum(1).clamp(min=1)
    return (per_token.sum(1) / counts).mean()


def batches(examples: list[ChatExample], batch_size: int, rng: np.random.Generator) -> list[list[ChatExample]]:
    """Shuffled batches, each all-image or all-text."""
    out = []
    for group in ([e for e in examples if e.image is not None], [e for e in examples if e.image is None]):
        order = rng.permutation(len(group))
        out += [[group[i] for i in order[s : s + batch_size]] for s in range(0, len(group), batch_size)]
    return [out[i] for i in rng.permutation(len(out))]


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to 10%."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def train(
    mllm: MLLM,
    examples: list[ChatExample],
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    desc: str,
    log: Callable[[dict[str, float], int], None] | None = None,
) -> list[float]:
    """Plain AdamW fine-tuning of every trainable parameter; returns the loss per step."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    plan = [batches(examples, batch_size, rng) for _ in range(epochs)]
    total = sum(len(p) for p in plan)
    params = [p for p in mllm.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(max(1, total // 20), total))
    mllm.model.train()
    losses: list[float] = []
    bar = tqdm(total=total, desc=desc, unit="step")
    for epoch_batches in plan:
        for chunk in epoch_batches:
            loss = answer_loss(mllm.model, encode(mllm, chunk))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
            if log is not None and len(losses) % 10 == 0:
                log({"loss": float(np.mean(losses[-10:])), "lr": schedule.get_last_lr()[0]}, len(losses))
    bar.close()
    mllm.model.eval()
    return losses


def iterate(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
