"""Global representations of objects and texts from an MLLM, for the analyses (paper §2):
the last token (the appended EOS, as Stage I uses) and the average over the sequence."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from finedefics.models.mllm import MLLM
from finedefics.models.representations import Representations, last, mean, pixels, text_ids


@dataclass
class Features:
    last: np.ndarray  # (n, hidden): the state at the appended EOS
    mean: np.ndarray  # (n, hidden): the states averaged over the sequence


def _collect(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> Features:
    pooled = [(last(*p).float(), mean(*p).float()) for p in parts]
    return Features(torch.cat([p[0] for p in pooled]).cpu().numpy(), torch.cat([p[1] for p in pooled]).cpu().numpy())


@torch.no_grad()
def objects(mllm: MLLM, paths: list[str], batch_size: int = 32) -> Features:
    """Each image's visual tokens and an EOS embedding, through the LLM."""
    reader = Representations(mllm.model, mllm.tokenizer.eos_token_id)
    return _collect(
        [reader.object_states(pixels(mllm, paths[i : i + batch_size])) for i in range(0, len(paths), batch_size)]
    )


@torch.no_grad()
def texts(mllm: MLLM, items: list[str], bos: bool, batch_size: int = 64) -> Features:
    """Each text's tokens and EOS (BOS first when `bos`, align.text_bos), through the LLM (right-padded)."""
    reader = Representations(mllm.model, mllm.tokenizer.eos_token_id)
    ids = text_ids(mllm.tokenizer, items, bos)
    return _collect([reader.text_states(ids[i : i + batch_size]) for i in range(0, len(ids), batch_size)])
