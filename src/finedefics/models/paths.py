"""Where the pipeline's models are: the base a run starts from, the final model, and the pointers
a stage writes instead of a copy when `align.paradigm` skips it."""

from __future__ import annotations

import hashlib
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
    model = resolve(source)
    out.mkdir(parents=True, exist_ok=True)
    (out / POINTER).write_text(json.dumps({"model": model, "fingerprint": model_fingerprint(model)}) + "\n")


def model_fingerprint(model: str | Path) -> str:
    """What a training checkpoint of `model` depends on: for a local folder, the content of its files
    (weights, config, tokenizer; hidden ones such as `.git` left out), so that a base rebuilt at the
    same path is another base; for a hub id, the id and the commit of the cached snapshot."""
    folder = Path(model)
    if folder.is_dir():
        digest = hashlib.sha1()
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            if path.is_file() and not any(part.startswith(".") for part in rel.parts):
                digest.update(f"{rel.as_posix()}\0".encode())
                with path.open("rb") as f:
                    for block in iter(lambda: f.read(1 << 24), b""):
                        digest.update(block)
        return f"sha1:{digest.hexdigest()}"
    try:
        from huggingface_hub import snapshot_download

        snapshot = Path(snapshot_download(str(model), local_files_only=True))
        return f"{model}@{snapshot.name}"  # the snapshot folder is named by the commit
    except Exception:  # not cached (not a hub id, or not downloaded yet): the id is all there is
        return str(model)


def base_model(cfg: ModelConfig) -> str:
    """The folder or hub id of the base MLLM."""
    return str(BASE) if cfg.base in TINY_BASES else cfg.base


def model_path(cfg: ModelConfig, role: Role) -> str:
    """The folder (or hub id) of the base or of the final model."""
    return resolve(FINAL) if role is Role.FINEDEFICS else base_model(cfg)
