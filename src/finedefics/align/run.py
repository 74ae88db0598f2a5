"""What the training stages share: launching, inputs, and running one training to a merged model."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pandas as pd
import torch

from finedefics.align.finetune import load_processor, load_trainable, resolve, save_merged
from finedefics.align.losses import Temperature
from finedefics.align.steps import Stage1, Stage2, alignment
from finedefics.align.trainer import FitConfig, fit
from finedefics.config import TINY_BASES, Params, StageTrainConfig
from finedefics.data.prepared import load_prepared
from finedefics.io import atomic_path, write_json
from finedefics.models.mllm import MLLM

INSTRUCTIONS = Path("data/instructions")


def relaunch(params: Params) -> None:
    """With train.num_processes > 1, re-execute this stage under `accelerate launch` (CPU: gloo)."""
    n = params.train.num_processes
    if n <= 1 or "LOCAL_RANK" in os.environ:
        return
    cmd = [
        "accelerate",
        "launch",
        "--num_processes",
        str(n),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    if not torch.cuda.is_available():
        cmd.append("--cpu")
    os.execvp(cmd[0], cmd + [sys.argv[0], *sys.argv[1:]])


def process():
    """Initialise the process group when launched by accelerate; (device, is_main)."""
    from accelerate import PartialState

    state = PartialState()
    return str(state.device), state.is_main_process


def base_model(params: Params) -> str:
    return "models/base" if params.model.base in TINY_BASES else params.model.base


def model_path(params: Params, which: str) -> str:
    """The folder (or hub id) of `base` or of the final model `finedefics`."""
    return resolve("models/finedefics") if which == "finedefics" else base_model(params)


def test_images(datasets: list[str]) -> tuple[list[str], list[str]]:
    """Paths and class names of every test image, for the alignment metric."""
    paths, names = [], []
    for name in datasets:
        manifest, _ = load_prepared(name)
        test = manifest[manifest.split == "test"]
        paths += list(test.path)
        names += list(test.class_name)
    return paths, names


def fingerprint(*parts) -> str:
    digest = hashlib.sha1()
    for part in parts:
        digest.update(
            part.read_bytes() if isinstance(part, Path) else json.dumps(part, sort_keys=True, default=str).encode()
        )
    return digest.hexdigest()[:16]


def fit_config(params: Params, stage: StageTrainConfig) -> FitConfig:
    return FitConfig(
        epochs=stage.epochs,
        lr=stage.lr,
        warmup_steps=stage.warmup_steps,
        batch_size=stage.batch_size,
        per_device_batch_size=params.train.per_device_batch_size,
        checkpoint_every=params.train.checkpoint_every,
        seed=params.seed,
    )


def train(params: Params, which: str, source: str, out: Path, log) -> dict[str, float]:
    """Train `source` for stage `which` ("stage1", "stage2" or "joint"), save it merged in `out`."""
    device, main = process()
    model = load_trainable(source, params.model, params.train.gradient_checkpointing, device)
    mllm = MLLM(model, load_processor(source))
    temperature = Temperature(params.align.temperature)
    frames = {k: pd.read_parquet(INSTRUCTIONS / f"{k}.parquet") for k in ("stage1", "stage2")}
    s1, s2 = frames["stage1"], frames["stage2"]
    names = sorted(set(s1.category) | {c for cs in s1.negative_categories for c in cs})
    stage1 = Stage1(
        mllm,
        temperature,
        params.align.objective,
        bool(s1.negative_categories.str.len().max()),
        params.align.mask_same_class,
        {n: i for i, n in enumerate(names)},
        ccc=params.align.ccc,
    )
    stage2 = Stage2(mllm)
    if which == "stage1":
        n, step, cfg = len(s1), lambda idx: stage1.loss(s1.iloc[idx]), params.train.stage1
    elif which == "stage2":
        n, step, cfg = len(s2), lambda idx: stage2.loss(s2.iloc[idx]), params.train.stage2
    else:  # one stage: each step takes images and both their Stage I triple and Stage II questions
        by_image = s2.groupby("image_id").indices

        def step(idx):
            rows = s1.iloc[idx]
            l1, v1 = stage1.loss(rows)
            l2, v2 = stage2.loss(s2.iloc[[i for image in rows.image_id for i in by_image[image]]])
            return l1 + l2, {
                **{k: v for k, v in v1.items() if k != "loss"},
                "loss_classification": v2["loss"],
                "loss": (l1 + l2).item(),
            }

        n, cfg = len(s1), params.train.stage2
    metrics: dict[str, float] = {}
    paths, categories = test_images(list(params.datasets))
    if which != "stage2" and main:
        metrics.update({f"{k}_start": v for k, v in alignment(mllm, paths, categories).items()})
    resume = (
        Path(".resume")
        / f"train_{which}"
        / fingerprint(
            INSTRUCTIONS / f"{'stage2' if which == 'stage2' else 'stage1'}.parquet",
            resolve(source),
            params.model_dump(exclude={"tracking"}),
        )
    )
    steps = fit([model, temperature], n, step, fit_config(params, cfg), resume, desc=f"train {which}", log=log)
    metrics["steps"] = steps
    if main:
        if which != "stage2":
            metrics.update({f"{k}_end": v for k, v in alignment(mllm, paths, categories).items()})
            metrics["temperature"] = float(temperature())
        with atomic_path(out) as tmp:
            save_merged(model, params.model.finetune, source, mllm.processor, tmp)
            write_json(tmp / "training.json", {"stage": which, "source": resolve(source), **metrics})
        shutil.rmtree(resume, ignore_errors=True)  # finished: nothing to resume
    return metrics
