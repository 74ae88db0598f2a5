"""What `align.paradigm` runs in each training stage, and one training run to a merged model."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch

from finedefics.align.finetune import load_trainable, save_merged
from finedefics.align.losses import LossForm, Temperatures
from finedefics.align.steps import Stage1, Stage2, alignment
from finedefics.artefacts import STAGE1, STAGE2
from finedefics.config import Params, StageTrainConfig
from finedefics.io import atomic_path, write_json
from finedefics.models.mllm import MLLM, ImageSettings, load_processor
from finedefics.models.paths import model_fingerprint, resolve
from finedefics.training import FitConfig, fit, plan, process, resume_dir


class Task(str, Enum):
    """What a training stage trains."""

    STAGE1 = "stage1"  # attribute augmented contrastive learning (eq. 8)
    STAGE2 = "stage2"  # classification-centred instruction tuning (eq. 9)
    JOINT = "joint"  # both losses in one stage: each step takes images with their triple and questions


@dataclass(frozen=True)
class Paradigm:
    """A training paradigm (`align.paradigm`): what `train_stage1` and `train_stage2` run; None: the
    stage passes its input through."""

    stage1: Task | None
    stage2: Task | None


PARADIGMS = {
    "two-stage": Paradigm(Task.STAGE1, Task.STAGE2),
    "one-stage": Paradigm(None, Task.JOINT),
    "stage2-only": Paradigm(None, Task.STAGE2),
    "stage1-only": Paradigm(Task.STAGE1, None),
}


@dataclass(frozen=True)
class Inputs:
    """The files a training run reads (a stage's `deps`), and the test images whose
    object-category alignment it reports."""

    stage1: Path  # data/instructions/stage1.parquet
    stage2: Path  # data/instructions/stage2.parquet
    test_paths: list[str]
    test_categories: list[str]


def fit_config(params: Params, stage: StageTrainConfig) -> FitConfig:
    return FitConfig(
        lr=stage.lr,
        warmup_steps=stage.warmup_steps,
        batch_size=stage.batch_size,
        per_device_batch_size=stage.per_device_batch_size or params.train.per_device_batch_size,
        checkpoint_every=params.train.checkpoint_every,
        schedule="linear",  # the transformers Trainer's default, as in the authors' release
        weight_decay=params.train.weight_decay,
        max_grad_norm=1.0,
        mixed_precision=params.train.mixed_precision,
    )


def train(
    params: Params, task: Task, source: str, out: Path, inputs: Inputs, log: Callable[[dict[str, float], int], None]
) -> dict[str, float]:
    """Train `source` on `task`, save it merged in `out`; returns the run's metrics."""
    device, main = process()
    torch.manual_seed(params.train.seed)  # LoRA initialisation and dropout; `plan` below orders the data
    model = load_trainable(source, params.model, params.train.gradient_checkpointing, device)
    mllm = MLLM(model, load_processor(resolve(source), ImageSettings.from_config(params.model)))
    align, sequence = params.align, params.train.generation_loss == "sequence"
    temperature = Temperatures(align.temperature, two=align.temperatures == "two", learn=align.learn_temperature)
    s1, s2 = STAGE1.read(inputs.stage1), STAGE2.read(inputs.stage2)
    names = sorted(set(s1.category) | {c for cs in s1.negative_categories for c in cs})
    stage1 = Stage1(
        mllm,
        temperature,
        align.objective,
        bool(s1.negative_categories.str.len().max()),  # negatives: none mines none
        {n: i for i, n in enumerate(names)},
        LossForm(align.mask_same_class, align.ccc, align.negatives_scope, align.contrastive_batch),
        text_bos=align.text_bos,
        whole_sequence=sequence,
    )
    stage2 = Stage2(mllm, whole_sequence=sequence)
    if task is Task.STAGE1:
        n, step, cfg = len(s1), lambda idx: stage1.loss(s1.iloc[idx]), params.train.stage1
    elif task is Task.STAGE2:
        n, step, cfg = len(s2), lambda idx: stage2.loss(s2.iloc[idx]), params.train.stage2
    else:
        by_image = s2.groupby("image_id").indices

        def step(idx):
            rows = s1.iloc[idx]
            l1, v1 = stage1.loss(rows)
            l2, v2 = stage2.loss(s2.iloc[[i for image in rows.image_id for i in by_image[image]]])
            values = {k: v for k, v in v1.items() if k != "loss"}
            return l1 + l2, {**values, "loss_classification": v2["loss"], "loss": (l1 + l2).item()}

        n, cfg = len(s1), params.train.stage2
    aligned = task is not Task.STAGE2  # Stage I's alignment before and after (Table 8)

    def measured(when: str) -> dict[str, float]:
        found = alignment(mllm, inputs.test_paths, inputs.test_categories, align.text_bos)
        return {f"{k}_{when}": v for k, v in found.items()}

    metrics: dict[str, float] = {}
    if aligned and main:
        metrics.update(measured("start"))
    data = inputs.stage2 if task is Task.STAGE2 else inputs.stage1
    # the base's weights, not its path: a base rebuilt at the same path must not resume the old one's run
    base = model_fingerprint(resolve(source))
    resume = resume_dir(f"train_{task.value}", data, base, params.model_dump(exclude={"tracking"}))
    batches = plan(n, cfg.batch_size, cfg.epochs, params.train.seed)
    metrics["steps"] = fit(
        [model, temperature], batches, step, fit_config(params, cfg), resume, f"train {task.value}", log
    )
    if main:
        if aligned:
            metrics.update(measured("end"))
            taus = temperature()
            metrics["temperature"] = taus.object_attribute.item()
            if taus.attribute_category is not taus.object_attribute:
                metrics["temperature_ac"] = taus.attribute_category.item()
        with atomic_path(out) as tmp:
            save_merged(model, params.model, source, mllm.processor, tmp)
            write_json(tmp / "training.json", {"stage": task.value, "source": resolve(source), **metrics})
        shutil.rmtree(resume, ignore_errors=True)  # finished: nothing to resume
    return metrics
