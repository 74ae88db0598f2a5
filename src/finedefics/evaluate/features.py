"""Global representations of objects and texts from an MLLM, for the analyses (paper §2):
the last token (the appended EOS, as Stage I uses) and the average over the sequence."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from finedefics.align.adapter import Adapter
from finedefics.models.mllm import MLLM
from finedefics.models.sft import load_image


@dataclass
class Features:
    last: np.ndarray  # (n, hidden): the state at the appended EOS
    mean: np.ndarray  # (n, hidden): the states averaged over the sequence


def _pool(hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = mask.sum(1)
    last = hidden[torch.arange(len(hidden)), lengths - 1]
    mean = (hidden * mask[..., None]).sum(1) / lengths[:, None]
    return last.float(), mean.float()


def _collect(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> Features:
    return Features(torch.cat([p[0] for p in parts]).cpu().numpy(), torch.cat([p[1] for p in parts]).cpu().numpy())


@torch.no_grad()
def objects(mllm: MLLM, paths: list[str], batch_size: int = 32) -> Features:
    """Each image's visual tokens and an EOS embedding, through the LLM."""
    adapter = Adapter(mllm.model, mllm.tokenizer.eos_token_id)
    device = next(mllm.model.parameters()).device
    parts = []
    for start in range(0, len(paths), batch_size):
        pixels = mllm.processor.image_processor([[load_image(p)] for p in paths[start : start + batch_size]], return_tensors="pt")
        visual = adapter.visual_tokens({k: v.to(device) for k, v in pixels.items()})
        eos = adapter.embed(torch.full((len(visual), 1), adapter.eos_id, device=device)).to(visual.dtype)
        embeds = torch.cat([visual, eos], dim=1)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=device)
        parts.append(_pool(adapter.text_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state, mask))
    return _collect(parts)


@torch.no_grad()
def texts(mllm: MLLM, items: list[str], batch_size: int = 64) -> Features:
    """Each text's tokens and EOS, through the LLM (right-padded)."""
    adapter = Adapter(mllm.model, mllm.tokenizer.eos_token_id)
    device = next(mllm.model.parameters()).device
    ids = mllm.tokenizer(items, add_special_tokens=False)["input_ids"]
    parts = []
    for start in range(0, len(ids), batch_size):
        chunk = [t + [adapter.eos_id] for t in ids[start : start + batch_size]]
        width = max(len(t) for t in chunk)
        batch = torch.tensor([t + [adapter.eos_id] * (width - len(t)) for t in chunk], device=device)
        mask = (torch.arange(width, device=device)[None] < torch.tensor([len(t) for t in chunk], device=device)[:, None]).long()
        parts.append(_pool(adapter.text_model(inputs_embeds=adapter.embed(batch), attention_mask=mask).last_hidden_state, mask))
    return _collect(parts)
