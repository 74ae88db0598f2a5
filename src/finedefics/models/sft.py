"""Supervised chat fine-tuning: (image?, question) -> answer examples, the loss on the answer only."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from finedefics.io import load_image
from finedefics.models.mllm import MLLM
from finedefics.training import FitConfig, fit


@dataclass(frozen=True)
class ChatExample:
    question: str
    answer: str
    image: str | None = None  # path of the image, or None for a text-only example
    whole: bool = False  # language-model the whole dialogue, not just the answer


def encode(mllm: MLLM, examples: list[ChatExample]) -> dict[str, torch.Tensor]:
    """A right-padded batch whose labels are the answer tokens and the end of the turn (the whole
    dialogue for examples marked `whole`)."""
    with_image = examples[0].image is not None
    if any((e.image is not None) != with_image for e in examples):
        raise ValueError("a batch mixes examples with and without an image")
    images = {"images": [[load_image(e.image)] for e in examples]} if with_image else {}
    prompts = [mllm.prompt(e.question, image=with_image) for e in examples]
    end = mllm.turn_end
    # the answer after a space ("Assistant: A"), or straight after a prompt ending in a newline (Qwen's)
    full = [p + ("" if p.endswith("\n") else " ") + e.answer + end for p, e in zip(prompts, examples)]
    mllm.tokenizer.padding_side = "right"
    batch = mllm.processor(text=full, return_tensors="pt", padding=True, **images)
    prompt_lens = mllm.processor(text=prompts, return_tensors="pt", padding=True, **images)["attention_mask"].sum(1)
    labels = batch["input_ids"].clone()
    positions = torch.arange(labels.shape[1])[None]
    answer_only = torch.tensor([not e.whole for e in examples])[:, None]
    labels[((positions < prompt_lens[:, None]) & answer_only) | (batch["attention_mask"] == 0)] = -100
    batch["labels"] = labels
    return dict(batch)


def token_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy of each labelled next token, 0 elsewhere; the number labelled per example)."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    per_token = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none"
    )
    return per_token.view(targets.shape), (targets != -100).sum(1)


def answer_loss(model, batch: dict[str, torch.Tensor], per_example: bool) -> torch.Tensor:
    """The cross-entropy of the labelled tokens (the answers). `per_example`: averaged per
    example, then over examples, so that a one-letter answer weighs as much as a sixty-token
    caption (pre-training mixes both); else the token mean over the batch, what the model's own
    `loss` computes and what the authors' release trains both stages with."""
    return _combine([token_losses(model, batch)], per_example)


def _combine(parts: list[tuple[torch.Tensor, torch.Tensor]], per_example: bool) -> torch.Tensor:
    if per_example:
        return torch.cat([t.sum(1) / n.clamp(min=1) for t, n in parts]).mean()
    return sum(t.sum() for t, _ in parts) / sum(n.sum() for _, n in parts).clamp(min=1)


def by_length(examples: list[ChatExample], min_saving: float = 0.2) -> list[list[int]]:
    """The examples' indices in one group, or in two (short, long) where padding each group to its
    own longest example saves at least `min_saving` of the padded length (characters stand in for
    tokens): a one-letter answer is not padded to a sixty-token caption."""
    lengths = [len(e.question) + len(e.answer) for e in examples]
    order = sorted(range(len(examples)), key=lengths.__getitem__)
    whole = len(order) * lengths[order[-1]]
    best, cut = 0, 0
    for k in range(1, len(order)):  # order[:k] padded to lengths[order[k - 1]]
        saved = k * (lengths[order[-1]] - lengths[order[k - 1]])
        if saved > best:
            best, cut = saved, k
    if best < min_saving * whole:
        return [list(range(len(examples)))]
    return [order[:cut], order[cut:]]


def chat_loss(mllm: MLLM, examples: list[ChatExample], per_example: bool) -> torch.Tensor:
    """`answer_loss` of a batch of chat examples, run in length groups (`by_length`): the same value
    as one padded pass, with less padding."""
    parts = [token_losses(mllm.model, encode(mllm, [examples[i] for i in g])) for g in by_length(examples)]
    return _combine(parts, per_example)


def batches(examples: list[ChatExample], batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of shuffled batches (indices into `examples`), each all-image or all-text."""
    out = []
    for group in (
        [i for i, e in enumerate(examples) if e.image is not None],
        [i for i, e in enumerate(examples) if e.image is None],
    ):
        order = rng.permutation(len(group))
        out += [np.asarray([group[i] for i in order[s : s + batch_size]]) for s in range(0, len(group), batch_size)]
    return [out[i] for i in rng.permutation(len(out))]


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
    """Pre-training of every trainable parameter on chat examples: AdamW, warm-up over the first
    5% of steps, then cosine decay to 10% of `lr`. Returns the loss per step."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    plan = [b for _ in range(epochs) for b in batches(examples, batch_size, rng)]
    losses: list[float] = []

    def step(idx: np.ndarray) -> tuple[torch.Tensor, dict[str, float]]:
        loss = chat_loss(mllm, [examples[i] for i in idx], per_example=True)
        losses.append(loss.item())
        return loss, {"loss": losses[-1]}

    cfg = FitConfig(
        lr=lr,
        warmup_steps=max(1, len(plan) // 20),
        batch_size=batch_size,
        per_device_batch_size=batch_size,
        checkpoint_every=0,
        schedule="cosine_with_min_lr",
        min_lr_rate=0.1,
        weight_decay=0.01,
        max_grad_norm=1.0,
    )
    fit([mllm.model], plan, step, cfg, resume=None, desc=desc, log=log)
    return losses


def iterate(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
