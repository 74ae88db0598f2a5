"""Where the pipeline's models are: the base a run starts from, the final model, and the pointers
a stage writes instead of a copy when `align.paradigm` skips it."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

from finedefics.config import ModelConfig
from finedefics.models.families import TINY_BASES

BASE = Path("models/base")  # the tiny base `bootstrap` builds (or its record of a published one)
STAGE1 = Path("models/stage1")
# the CLIPs `bootstrap` writes: the one that mines (`model.clip`) and evaluate@clip's other one (`model.clip_baseline`)
CLIP_DIRS = {"mining": Path("models/clip"), "baseline": Path("models/clip_baseline")}
FINAL = Path("models/finedefics")
POINTER = "same_as.json"  # a stage that passes its input through writes only this file


class Role(str, Enum):
    """The two models every evaluation and analysis compares."""

    BASE = "base"  # the paper's "Original" row
    FINEDEFICS = "finedefics"


def resolve(path: str | Path) -> str:
    """A model folder, following pass-through pointers (see `pass_through`)."""
    path = Path(path)
    while (path / POINTER).is_file():
        path = Path(json.loads((path / POINTER).read_text())["model"])
    return str(path)


def pass_through(source: str | Path, out: Path) -> None:
    """Record that this stage's model is `source`, without copying its weights. The pointer holds
    the source's fingerprint (its files' content, or a hub id's snapshot), so that DVC sees it
    change when the model it points at does: a pointer naming only the path hashed the same for
    every base and every Stage I model, and DVC's run cache then restored the stages after it from
    another run (a Stage I model's evaluation, or Stage II trained from another base)."""
    from finedefics.training import model_fingerprint

    model = resolve(source)
    out.mkdir(parents=True, exist_ok=True)
    (out / POINTER).write_text(json.dumps({"model": model, "fingerprint": model_fingerprint(model)}) + "\n")


def base_model(cfg: ModelConfig) -> str:
    """The folder or hub id of the base MLLM."""
    return str(BASE) if cfg.base in TINY_BASES else cfg.base


def model_path(cfg: ModelConfig, role: Role) -> str:
    """The folder (or hub id) of the base or of the final model."""
    return resolve(FINAL) if role is Role.FINEDEFICS else base_model(cfg)
