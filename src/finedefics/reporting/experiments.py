"""Which of the ledger's experiments a row reads, and where their metrics are.

A row names the params that differ from the committed `params.yaml`; it reads the ledger's experiments
whose params are exactly those apart from `train.seed`, the newest per training seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from finedefics.reporting.ledger import SEED, Experiment, flatten

# where each Row.model's accuracies are: a metrics file, and the section of it
MODEL_METRICS = {
    "final": ("metrics/eval.json", None),
    "base": ("metrics/eval_base.json", None),
    "clip": ("metrics/eval_clip.json", "mining"),
    "clip_baseline": ("metrics/eval_clip.json", "baseline"),
}
SEEDLESS = ("base", "clip", "clip_baseline")  # models that do not depend on train.seed
PREDICTIONS = {"final": "finedefics", "base": "base", "clip": "clip/mining", "clip_baseline": "clip/baseline"}


def committed_params(path: Path) -> dict[str, Any]:
    """A params file, flattened to dotted keys."""
    return flatten(yaml.safe_load(path.read_text()))


def experiments_with(exps: list[Experiment], default: dict[str, Any], overrides: dict[str, Any]) -> list[Experiment]:
    """The newest experiment per training seed whose params are the committed ones with `overrides`
    applied, all of them, not only the switches (a param an older experiment did not have yet
    counts as the committed value); ordered by seed."""
    want = {k: v for k, v in (default | overrides).items() if k != SEED}
    found: dict[int, Experiment] = {}
    for e in exps:  # newest first
        if all(e.params.get(k, default.get(k)) == v for k, v in want.items()):
            found.setdefault(e.seed(default), e)
    return [found[seed] for seed in sorted(found)]


def used(exps: list[Experiment], default: dict[str, Any], overrides: list[dict[str, Any]]) -> list[Experiment]:
    """The experiments that rows with these `overrides` read (not every experiment in the ledger)."""
    seen = {e.rev: e for o in overrides for e in experiments_with(exps, default, o)}
    return sorted(seen.values(), key=lambda e: (e.timestamp, e.rev))


def provenance(runs: list[Experiment]) -> str:
    commits = sorted({e.commit[:7] for e in runs})
    machines = sorted({e.machine for e in runs if e.machine})
    return f"Experiments from commit(s) {', '.join(commits) or 'none'}; collected on {'; '.join(machines) or '-'}."


def metrics_of(exp: Experiment, model: str) -> dict[str, Any]:
    """`exp`'s metrics of a Row.model (its accuracies per dataset and on average)."""
    path, section = MODEL_METRICS[model]
    data = exp.metrics.get(path, {})
    return data.get(section, {}) if section else data
