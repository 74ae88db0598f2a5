"""Published base models at paper scale: find them offline, check them, record which weights are used.

Nothing is downloaded here: a hub id must already be in the local Hugging Face cache (or be a
local folder). What `bootstrap` records (revision, or a hash of every weight file) pins the
exact weights a run used.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

MLLM_TYPES = ("idefics2", "llava", "qwen2_5_vl")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class ModelNotAvailable(FileNotFoundError):
    """The configured model is not on this machine; the message says how to provide it offline."""


def sha256(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def looks_like_path(spec: str) -> bool:
    """Whether `spec` means a local folder rather than a hub id (`org/name`, or a bare `name`).

    It does when it starts with /, . or ~, contains a path separator but is not of the form
    org/name, or its parent folder exists here (`models/my-base` next to a `models/` folder).
    """
    if spec.startswith(("/", ".", "~")):
        return True
    if "/" not in spec and os.sep not in spec:
        return False
    if not _HUB_ID.fullmatch(spec):
        return True
    return Path(spec).parent.is_dir()


def _missing_folder(spec: str, key: str) -> ModelNotAvailable:
    local = Path(spec).expanduser()
    what = "is a file, not a folder" if local.is_file() else "does not exist"
    return ModelNotAvailable(
        f"{key} {spec!r}: the folder {local} {what}; a local model is a folder with config.json and the weights "
        f"(relative paths start from the repository root)"
    )


def _hub_snapshot(repo_id: str, key: str, instead: str = "a local folder holding it") -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id=repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError) as err:
        raise ModelNotAvailable(
            f"{key} {repo_id!r} is not available offline ({type(err).__name__}); fetch it once where there is "
            f"internet with `huggingface-cli download {repo_id}` (it fills ~/.cache/huggingface; copy that cache "
            f"here or set HF_HOME), or set {key} to {instead}"
        ) from None


def check_mllm(spec: str, key: str = "model.base") -> dict:
    """Load config and processor through the Auto classes and check the weight files are present."""
    from transformers import AutoConfig, AutoProcessor

    local = Path(spec).expanduser()
    if not local.is_dir() and looks_like_path(spec):
        raise _missing_folder(spec, key)
    folder = local if local.is_dir() else _hub_snapshot(spec, key)
    config = AutoConfig.from_pretrained(str(folder))
    if config.model_type not in MLLM_TYPES:
        raise ValueError(f"{key} {spec!r} is a {config.model_type!r} model; supported: {', '.join(MLLM_TYPES)}")
    AutoProcessor.from_pretrained(str(folder))
    weights = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not weights:
        raise ModelNotAvailable(f"{key} {spec!r}: no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {folder}")
    record = {"model": spec, "model_type": config.model_type, "path": str(folder.resolve())}
    if local.is_dir():
        record["files"] = {p.name: sha256(p) for p in weights}
    else:
        record["revision"] = folder.name  # the hub cache keeps each snapshot under its commit hash
        record["files"] = [p.name for p in weights]
    return record


def check_clip(spec: str, key: str = "model.clip") -> dict:
    """`<architecture>:<pretrained tag or file>` or `local-dir:<folder>`, found offline."""
    import open_clip

    if spec.startswith("local-dir:"):
        folder = Path(spec.split(":", 1)[1])
        weights = sorted(p for p in folder.glob("*") if p.suffix in WEIGHT_SUFFIXES)
        if not (folder / "open_clip_config.json").is_file() or not weights:
            raise ModelNotAvailable(f"{key} {spec!r}: expected open_clip_config.json and weights in {folder}")
        return {"model": spec, "files": {p.name: sha256(p) for p in weights}}
    if ":" not in spec:
        raise ValueError(
            f"{key} {spec!r}: expected tiny, <architecture>:<pretrained tag or file> or local-dir:<folder>"
        )
    name, pretrained = spec.split(":", 1)
    if name not in open_clip.list_models():
        raise ValueError(f"{key} {spec!r}: unknown open_clip architecture {name!r}")
    if Path(pretrained).is_file():
        return {"model": spec, "architecture": name, "files": {Path(pretrained).name: sha256(Path(pretrained))}}
    if looks_like_path(pretrained) or pretrained.endswith(WEIGHT_SUFFIXES):
        raise ModelNotAvailable(f"{key} {spec!r}: the weights file {pretrained} does not exist")
    source = open_clip.get_pretrained_cfg(name, pretrained)
    if not source or not source.get("hf_hub"):
        raise ModelNotAvailable(
            f"{key} {spec!r}: no hub source for tag {pretrained!r}; put the weights file on this machine and set {key} to {name}:<file>"
        )
    repo = "/".join(source["hf_hub"].strip("/").split("/")[:2])
    snapshot = _hub_snapshot(repo, key, f"{name}:<path of the weights file>")
    files = sorted(p.name for p in snapshot.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise ModelNotAvailable(f"{key} {spec!r}: the cached {repo} holds no weights; download it again")
    return {"model": spec, "architecture": name, "hub": repo, "revision": snapshot.name, "files": files}
