"""The training loop of both stages: a plain loop over global batches, one or several processes.

A global batch is split across processes (`accelerate launch`) and into micro-batches of
`per_device_batch_size`; gradients are accumulated, then averaged across processes (what DDP
does, done by hand so that Stage I may call the model's submodules directly). The data order is
a function of the seed, so a run restarted from its last checkpoint (trainable weights,
optimizer, schedule, random state, step) continues exactly where it stopped.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from finedefics.io import atomic_path


@dataclass(frozen=True)
class FitConfig:
    epochs: float
    lr: float
    warmup_steps: int
    batch_size: int  # global
    per_device_batch_size: int
    checkpoint_every: int
    seed: int
    max_grad_norm: float = 1.0


def world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def accumulation(cfg: FitConfig, processes: int) -> int:
    per_step = cfg.per_device_batch_size * processes
    if cfg.batch_size % per_step:
        raise ValueError(
            f"the global batch {cfg.batch_size} is not a multiple of per-device batch {cfg.per_device_batch_size} x {processes} process(es)"
        )
    return cfg.batch_size // per_step


def plan(n_examples: int, cfg: FitConfig) -> list[np.ndarray]:
    """The global batches of the whole run: a seeded permutation per epoch, cut in batches."""
    steps_per_epoch = max(1, n_examples // cfg.batch_size)
    total = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    batches = []
    epoch = 0
    while len(batches) < total:
        order = np.random.default_rng([cfg.seed, epoch]).permutation(n_examples)
        batches += [order[i * cfg.batch_size : (i + 1) * cfg.batch_size] for i in range(steps_per_epoch)]
        epoch += 1
    return batches[:total]


def schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then linear decay to zero (the transformers default)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _trainable_state(modules: list[torch.nn.Module]) -> list[dict[str, torch.Tensor]]:
    return [{n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad} for m in modules]


def fit(
    modules: list[torch.nn.Module],
    n_examples: int,
    step_fn: Callable[[np.ndarray], tuple[torch.Tensor, dict[str, float]]],
    cfg: FitConfig,
    resume_dir: Path | None,
    desc: str,
    log: Callable[[dict[str, float], int], None] | None = None,
) -> int:
    """Train the trainable parameters of `modules`; `step_fn(indices)` returns a micro-batch's loss
    (a mean over its examples) and values to log. Returns the number of optimizer steps."""
    import torch.distributed as dist

    rank, size = world()
    accum = accumulation(cfg, size)
    batches = plan(n_examples, cfg)
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s, len(batches), cfg.warmup_steps))
    start = 0
    checkpoint = resume_dir / "checkpoint.pt" if resume_dir else None
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=False)
        for module, weights in zip(modules, state["weights"]):
            module.load_state_dict(weights, strict=False)
        optimizer.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])
        start = state["step"]
    for m in modules:
        m.train()
    bar = tqdm(total=len(batches), initial=start, desc=desc, unit="step", disable=rank != 0)
    for step in range(start, len(batches)):
        began = time.perf_counter()
        mine = batches[step][rank::size]  # this process's share of the global batch
        logged: dict[str, float] = {}
        optimizer.zero_grad(set_to_none=True)
        for micro in np.array_split(mine, accum):
            loss, values = step_fn(micro)
            (loss / accum).backward()
            for k, v in values.items():
                logged[k] = logged.get(k, 0.0) + v / accum
        if size > 1:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad /= size
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        sched.step()
        logged.update(
            {
                "lr": sched.get_last_lr()[0],
                "samples_per_s": cfg.batch_size / (time.perf_counter() - began),
                "peak_memory_mb": peak_memory_mb(),
            }
        )
        if log is not None and rank == 0:
            log(logged, step + 1)
        bar.update(1)
        bar.set_postfix(loss=f"{logged.get('loss', float('nan')):.3f}")
        if checkpoint is not None and rank == 0 and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < len(batches):
            state = {
                "weights": _trainable_state(modules),
                "optimizer": optimizer.state_dict(),
                "schedule": sched.state_dict(),
                "rng": torch.get_rng_state(),
                "step": step + 1,
            }
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(checkpoint) as tmp:
                torch.save(state, tmp)
    bar.close()
    for m in modules:
        m.eval()
    return len(batches)
