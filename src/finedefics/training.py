"""The one training loop of the pipeline (base pre-training, tiny CLIP, Stage I, Stage II).

A global batch is split across processes (`accelerate launch`) and into micro-batches of
`per_device_batch_size`; gradients are accumulated, then averaged across processes (what DDP
does, done by hand so that Stage I may call the model's submodules directly). The learning rate
follows a `transformers.get_scheduler` schedule. The data order is given by the caller as a list
of global batches (`plan` cuts seeded epochs), so a run restarted from its last checkpoint
(trainable weights, optimizer, schedule, random state, step) continues exactly where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from finedefics.io import StageError, atomic_path, progress

# transformers' schedules import peft, whose helpers import bitsandbytes eagerly (huggingface/peft#3106); bitsandbytes
# then warns that its CPU 4-bit kernel is not in the offline hub cache (bitsandbytes-foundation/bitsandbytes#2064)
for _name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    logging.getLogger(_name).setLevel(logging.ERROR)

RESUME = Path(".resume")  # checkpoints of unfinished runs (git- and dvc-ignored)


@dataclass(frozen=True)
class FitConfig:
    lr: float
    warmup_steps: int
    batch_size: int  # global
    per_device_batch_size: int
    checkpoint_every: int  # optimizer steps between checkpoints (when a resume folder is given)
    schedule: str  # a `transformers.get_scheduler` name: "linear", "cosine_with_min_lr", "constant", ...
    weight_decay: float
    max_grad_norm: float | None  # None: no clipping
    min_lr_rate: float = 0.0  # the floor of "cosine_with_min_lr", as a share of lr
    mixed_precision: str = "fp32"  # fp32 | bf16 | fp16: autocast of `step_fn` (fp16 with a gradient scaler)


def relaunch(num_processes: int) -> None:
    """With more than one process, re-execute this stage under `accelerate launch` (CPU: gloo).
    Its multi-process launcher (`--multi_gpu`, torch.distributed.run) serves CPUs too: with `--cpu`
    accelerate takes its single-process launcher (meant for mpirun), whose process, unranked, would
    launch again, and again. On CPUs the processes share this one's threads (each taking all of
    them made a rehearsal's training 6x slower)."""
    if num_processes <= 1 or "LOCAL_RANK" in os.environ:
        return
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    if not torch.cuda.is_available():
        cmd += ["--num_cpu_threads_per_process", str(max(1, torch.get_num_threads() // num_processes))]
    os.execvp(cmd[0], cmd + [sys.argv[0], *sys.argv[1:]])


def process() -> tuple[str, bool]:
    """Initialise the process group when launched by accelerate (gloo without CUDA); (device, is_main)."""
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return str(state.device), state.is_main_process


def world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resume_dir(name: str, *inputs) -> Path:
    """The checkpoint folder of a run of `name` on these inputs (files are hashed by content; for a
    model, pass its `finedefics.models.paths.model_fingerprint`)."""
    digest = hashlib.sha1()
    for part in inputs:
        data = part.read_bytes() if isinstance(part, Path) else json.dumps(part, sort_keys=True, default=str).encode()
        digest.update(data)
    return RESUME / name / digest.hexdigest()[:16]


def accumulation(cfg: FitConfig, processes: int) -> int:
    per_step = cfg.per_device_batch_size * processes
    if cfg.batch_size % per_step:
        raise ValueError(
            f"the global batch {cfg.batch_size} is not a multiple of per-device batch "
            f"{cfg.per_device_batch_size} x {processes} process(es)"
        )
    return cfg.batch_size // per_step


def plan(n_examples: int, batch_size: int, epochs: float, seed: int) -> list[np.ndarray]:
    """The global batches of a whole run: a seeded permutation per epoch, cut in full batches."""
    steps_per_epoch = max(1, n_examples // batch_size)
    total = max(1, math.ceil(epochs * steps_per_epoch))
    batches: list[np.ndarray] = []
    epoch = 0
    while len(batches) < total:
        order = np.random.default_rng([seed, epoch]).permutation(n_examples)
        batches += [order[i * batch_size : (i + 1) * batch_size] for i in range(steps_per_epoch)]
        epoch += 1
    return batches[:total]


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _trainable_state(modules: list[torch.nn.Module]) -> list[dict[str, torch.Tensor]]:
    return [{n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad} for m in modules]


class Diverged(StageError):
    """A loss, a gradient norm or the weights stopped being finite; the message is one line."""


def _not_finite(loss: torch.Tensor, values: dict[str, float]) -> str | None:
    """What is not finite in a micro-batch's loss: the first loss term that is not, else the total."""
    terms = [k for k, v in values.items() if k.startswith("loss") and not math.isfinite(v)]
    named = [k for k in terms if k != "loss"] or terms
    if named:
        return f"loss term '{named[0]}' ({values[named[0]]})"
    if not torch.isfinite(loss.detach()).all():
        return f"the loss ({loss.detach().float().sum().item()})"
    return None


class _Checkpoint:
    """A run's resume point in `resume`/checkpoint.pt: trainable weights, optimizer, schedule, scaler,
    random state and step; `saved` is the step of the last one (None before the first)."""

    def __init__(self, resume: Path | None, desc: str, total: int):
        self.folder, self.desc, self.total = resume, desc, total
        self.path = resume / "checkpoint.pt" if resume else None
        self.saved: int | None = None

    def restore(self, modules: list[torch.nn.Module], optimizer, sched, scaler) -> int:
        """Load the checkpoint into the run, if there is one; the step to start from."""
        if self.path is None or not self.path.is_file():
            return 0
        state = torch.load(self.path, weights_only=False)
        for module, weights in zip(modules, state["weights"]):
            module.load_state_dict(weights, strict=False)
        optimizer.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        scaler.load_state_dict(state.get("scaler", {}))
        torch.set_rng_state(state["rng"])
        self.saved = state["step"] or None
        return state["step"]

    def save(self, step: int, modules: list[torch.nn.Module], optimizer, sched, scaler) -> None:
        """Write the run's state after optimizer step `step` (1-based)."""
        state = {
            "weights": _trainable_state(modules),
            "optimizer": optimizer.state_dict(),
            "schedule": sched.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": torch.get_rng_state(),
            "step": step,
        }
        with atomic_path(self.path) as tmp:  # makes the folder
            torch.save(state, tmp)
        self.saved = step

    def resumes(self) -> str | None:
        """Where a re-run starts, as `progress` words it."""
        return f"its checkpoint of step {self.saved}" if self.saved else None

    def stop(self, step: int, what: str) -> None:
        """Raise `Diverged`: `what` is not finite at (0-based) `step`."""
        kept = (
            f"the checkpoint of step {self.saved} is kept in {self.folder}"
            if self.saved
            else "no checkpoint was written"
        )
        raise Diverged(f"{self.desc}: {what} is not finite at step {step + 1} of {self.total}; stopped ({kept})")


def _optimizer(params: list[torch.nn.Parameter], cfg: FitConfig, steps: int):
    """AdamW and its learning-rate schedule over `steps` optimizer steps."""
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    extra = {"min_lr_rate": cfg.min_lr_rate} if cfg.schedule == "cosine_with_min_lr" else None
    from transformers import get_scheduler  # imports peft and bitsandbytes (above)

    sched = get_scheduler(cfg.schedule, optimizer, cfg.warmup_steps, steps, scheduler_specific_kwargs=extra)
    return optimizer, sched


def _precision(cfg: FitConfig, device_type: str):
    """The autocast of `step_fn` and the gradient scaler. fp16 gradients under-/overflow without loss
    scaling: scaled, and a step whose gradients are not finite is skipped with a smaller scale (as the
    Trainer's fp16); the scaler is the identity unless fp16."""
    autocast = torch.autocast(
        device_type,
        dtype=torch.float16 if cfg.mixed_precision == "fp16" else torch.bfloat16,
        enabled=cfg.mixed_precision != "fp32",
    )
    return autocast, torch.amp.GradScaler(device_type, enabled=cfg.mixed_precision == "fp16")


def _accumulate(share: np.ndarray, accum: int, step_fn, autocast, scaler) -> tuple[dict[str, float], str | None]:
    """Back-propagate this process's `share` of a global batch in `accum` micro-batches, each loss
    divided by `accum`; the mean logged values and what is not finite (None: all is)."""
    logged: dict[str, float] = {}
    for micro in np.array_split(share, accum):
        with autocast:
            loss, values = step_fn(micro)
        problem = _not_finite(loss, values)
        if problem is not None:
            return logged, problem
        scaler.scale(loss / accum).backward()
        for k, v in values.items():
            logged[k] = logged.get(k, 0.0) + v / accum
    return logged, None


def _average_across(params: list[torch.nn.Parameter], problem: str | None, size: int) -> str | None:
    """Average the gradients over the `size` processes (what DDP does), unless a process found a loss
    that is not finite: then every process stops at the same step, or the others would wait in
    all_reduce. What is not finite here or elsewhere, or None."""
    import torch.distributed as dist

    flag = torch.tensor([float(problem is not None)], device=params[0].device)
    dist.all_reduce(flag)
    if flag.item() and problem is None:
        problem = "a loss on another process"
    for p in params if problem is None else ():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= size
    return problem


def _gradient_norm(params: list[torch.nn.Parameter], cfg: FitConfig) -> torch.Tensor:
    """The gradients' total norm, before clipping them to `max_grad_norm` where one is set."""
    if cfg.max_grad_norm is not None:
        return torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def fit(
    modules: list[torch.nn.Module],
    batches: list[np.ndarray],
    step_fn: Callable[[np.ndarray], tuple[torch.Tensor, dict[str, float]]],
    cfg: FitConfig,
    resume: Path | None,
    desc: str,
    log: Callable[[dict[str, float], int], None] | None = None,
    after_step: Callable[[], None] | None = None,
) -> int:
    """Train the trainable parameters of `modules` on `batches` (index arrays of global batches);
    `step_fn(indices)` returns a micro-batch's loss (a mean over its examples) and values to log;
    `after_step` runs after each optimizer step (e.g. to clamp a parameter). Returns the number of
    optimizer steps.

    The first loss (or loss term, a `values` key starting with "loss") or gradient norm that is not
    finite stops training with `Diverged` before the optimizer step, naming the step and the term; so
    do weights that are not finite when a checkpoint is due or at the end. The last checkpoint, written
    after a finite step, is kept."""
    rank, size = world()
    accum = accumulation(cfg, size)
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    optimizer, sched = _optimizer(params, cfg, len(batches))
    autocast, scaler = _precision(cfg, params[0].device.type)
    checkpoint = _Checkpoint(resume, desc, len(batches))
    start = checkpoint.restore(modules, optimizer, sched, scaler)
    for m in modules:
        m.train()
    bar = tqdm(total=len(batches), initial=start, desc=desc, unit="step", disable=rank != 0)
    try:
        for step in range(start, len(batches)):
            progress(f"{desc} step {step + 1} of {len(batches)}", checkpoint.resumes())
            began = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            share = batches[step][rank::size]  # this process's share of the global batch
            logged, problem = _accumulate(share, accum, step_fn, autocast, scaler)
            if size > 1:
                problem = _average_across(params, problem, size)
            if problem is not None:
                checkpoint.stop(step, problem)
            scaler.unscale_(optimizer)
            norm = _gradient_norm(params, cfg)
            if not torch.isfinite(norm) and not scaler.is_enabled():
                checkpoint.stop(step, f"the gradient norm ({norm.item()})")
            scaler.step(optimizer)  # skipped by the fp16 scaler when the gradients are not finite
            scaler.update()
            sched.step()
            if after_step is not None:
                after_step()
            # the weights are the same on every process: each checks them, all stop together
            due = checkpoint.path is not None and (step + 1) % cfg.checkpoint_every == 0
            if (due or step + 1 == len(batches)) and not all(torch.isfinite(p).all() for p in params):
                checkpoint.stop(step, "a weight after the optimizer step")
            seconds = time.perf_counter() - began
            logged |= {
                "lr": sched.get_last_lr()[0],
                "samples_per_s": len(batches[step]) / seconds,
                "peak_memory_mb": peak_memory_mb(),
            }
            if log is not None and rank == 0:
                log(logged, step + 1)
            bar.update(1)
            bar.set_postfix(loss=f"{logged.get('loss', float('nan')):.3f}")
            if due and rank == 0 and step + 1 < len(batches):
                checkpoint.save(step + 1, modules, optimizer, sched, scaler)
    finally:
        bar.close()  # an interrupted run's last line is its own, not the bar's
    progress(None, checkpoint.resumes())  # after the loop: a re-run still resumes from the last checkpoint
    for m in modules:
        m.eval()
    return len(batches)
