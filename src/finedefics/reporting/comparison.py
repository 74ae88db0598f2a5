"""What a row's experiments say: its accuracies over training seeds, and its difference from a reference.

Every row's difference from its reference is tested over training seeds (`reporting.inference`): a paired t
on the seeds both rows have when they share seed streams, Welch's t when they do not, a one-sample t against
a seedless model; Holm-corrected within a table.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from finedefics.reporting import inference
from finedefics.reporting.experiments import PREDICTIONS, SEEDLESS, metrics_of
from finedefics.reporting.inference import PAIRED, SeedTest, holm, resolved
from finedefics.reporting.ledger import SEED, Experiment, Scores
from finedefics.reporting.markdown import p_text
from finedefics.stats import across_seeds

# Params whose change gives a row other seed streams than its reference (another initialisation, data size,
# data order or number of steps for the same `train.seed`): such rows are tested by Welch's t, all others by a
# paired t on the seeds both rows have.
OWN_STREAMS = (
    "seed",
    "datasets.",
    "world.",
    "bootstrap.",
    "model.base",
    "model.finetune",
    "model.lora.",
    "align.paradigm",
    "instructions.stage2",
    "train.stage1.batch_size",
    "train.stage2.batch_size",
    "train.stage1.epochs",
    "train.stage2.epochs",
    "train.per_device_batch_size",
    "train.num_processes",
)
COMPARISON_HEAD = ["[95% CI]", "test", "resolved", "McNemar p (images)"]


def shares_streams(switches: Iterable[str]) -> bool:
    """Whether a row that switches these params (dotted keys) over its reference draws the same seed streams."""
    return not any(key == p or key.startswith(p) for key in switches for p in OWN_STREAMS)


def switched(row: list[Experiment], reference: list[Experiment], default: dict[str, Any]) -> list[str]:
    """The params (dotted keys, sorted; `train.seed` aside) on which an experiment of `row` differs from one
    of `reference`; a param an older experiment did not have yet counts as the committed value."""
    keys = {k for e in (*row, *reference) for k in e.params if k != SEED}
    value = lambda e, k: e.params.get(k, default.get(k))  # noqa: E731
    return [k for k in sorted(keys) if any(value(e, k) != value(r, k) for e in row for r in reference)]


@dataclass(frozen=True)
class RowAccuracy:
    """A row's accuracies (%): per dataset and the average, means over its seeds, and the average's
    95% CI: the t-interval over seeds, or for one run the image bootstrap of `evaluate`."""

    per_dataset: list[float | None]
    average: float | None
    low: float | None
    high: float | None
    runs: int
    seedless: bool = False

    def text(self) -> str:
        if self.average is None:
            return "missing"
        if self.low is None:
            return f"{self.average:.1f}" + (" (identical seeds)" if self.runs > 1 else "")
        return f"{self.average:.1f} [{self.low:.1f}, {self.high:.1f}]"

    def count(self) -> str:
        return "1 run" if self.seedless and self.runs else str(self.runs)


def row_accuracy(runs: list[Experiment], model: str, datasets: list[str]) -> RowAccuracy:
    seedless = model in SEEDLESS
    if seedless:  # the base and the CLIPs do not depend on the training seed: one run that has them
        runs = [e for e in runs if metrics_of(e, model)][:1]
    data = [metrics_of(e, model) for e in runs]
    averages = [d.get("average", {}).get("accuracy") for d in data]
    if not runs or None in averages:
        return RowAccuracy([None] * len(datasets), None, None, None, len(runs), seedless)
    per_dataset = [_mean([d.get(n, {}).get("accuracy") for d in data]) for n in datasets]
    if len(runs) > 1:  # no interval from identical seeds: that would read as certainty
        s = across_seeds(averages)
        low, high = (s.low, s.high) if np.ptp(averages) > inference.TOLERANCE else (None, None)
    else:
        low, high = data[0]["average"].get("accuracy_low"), data[0]["average"].get("accuracy_high")
        if low is not None and high is not None and high - low <= inference.TOLERANCE:
            low = high = None  # every image scored alike: the bootstrap has no spread to show
    pct = lambda v: None if v is None else 100 * v  # noqa: E731
    average = pct(float(np.mean(averages)))
    return RowAccuracy([pct(v) for v in per_dataset], average, pct(low), pct(high), len(runs), seedless)


def _mean(values: list[float | None]) -> float | None:
    return None if None in values else float(np.mean(values))


def seed_values(runs: list[Experiment], key: str = "accuracy") -> list[float]:
    """The final model's average `key` (accuracy, or a part of it such as `unseen_accuracy`) per seed."""
    values = [metrics_of(e, "final").get("average", {}).get(key) for e in runs]
    return [v for v in values if v is not None]


# one side of a comparison: each training seed's per-dataset image scores; a seedless model has the one key None
Side = dict[int | None, list[dict[str, float]]]


def side(runs: list[Experiment], model: str, scores: Scores, default: dict[str, Any]) -> Side | None:
    """A row's predictions per seed (a seedless model's from the first run that has them); None when any
    of them is not in the ledger."""
    if (
        model in SEEDLESS
    ):  # the first run with both its metrics and its predictions, as `row_accuracy` shows its metrics
        found = [s for s in (scores(e, PREDICTIONS[model]) for e in runs if metrics_of(e, model)) if s is not None]
        return {None: found[0]} if found else None
    out = {e.seed(default): scores(e, PREDICTIONS[model]) for e in runs}
    return out if out and None not in out.values() else None


@dataclass(frozen=True)
class Comparison:
    """A row against its reference: the seed-level test and, per dataset, McNemar's test-image check."""

    test: SeedTest
    mcnemar: tuple[float, ...]


def compare(row: Side | None, reference: Side | None, paired: bool) -> Comparison | None:
    """`row` minus `reference` on the test images every run of both has: each seed's average accuracy (mean
    over datasets of its mean image score), tested over seeds; None when a side has no predictions."""
    if not row or not reference:
        return None
    everything = [*row.values(), *reference.values()]
    common = [sorted(set.intersection(*(set(s[k]) for s in everything))) for k in range(len(everything[0]))]

    def arrays(s: Side) -> list[np.ndarray]:  # per dataset, (seeds x images) in the side's seed order
        return [np.array([[v[k][i] for i in images] for v in s.values()]) for k, images in enumerate(common)]

    def accuracies(s: Side, per_dataset: list[np.ndarray]) -> dict[int, float] | float:
        per_seed = np.mean([a.mean(axis=1) for a in per_dataset], axis=0)
        return float(per_seed[0]) if None in s else dict(zip(s, per_seed.tolist()))

    ours, theirs = arrays(row), arrays(reference)
    test = inference.seed_test(accuracies(row, ours), accuracies(reference, theirs), paired)
    return Comparison(test, tuple(inference.mcnemar_p(r, d) for r, d in zip(ours, theirs)))


def comparison_cells(c: Comparison, adjusted_p: float, label: str = "Holm p") -> list[str]:
    """A comparison's cells: the difference in points with its 95% t-interval, the test (a paired t names
    the seeds it paired), whether it is resolved with its adjusted p (`label`), and McNemar's p per dataset
    (test images only)."""
    t = c.test
    diff = f"{100 * t.difference:+.1f}" + (f" [{100 * t.low:+.1f}, {100 * t.high:+.1f}]" if t.tested else "")
    design = t.design
    if t.design == PAIRED:
        design += f" (seeds {', '.join(map(str, t.seeds))})"
    mark = (
        f"{'yes' if resolved(t, adjusted_p) else 'no'} ({label} {p_text(adjusted_p)})"
        if t.tested
        else f"no test ({t.untested})"
    )
    return [diff, design, mark, ", ".join(f"{v:.2g}" for v in c.mcnemar)]


def holm_cells(comparisons: list[Comparison | None]) -> list[list[str] | None]:
    """Each comparison's cells, Holm-adjusted over the tested ones."""
    tested = [c for c in comparisons if c is not None and c.test.tested]
    adjusted = dict(zip(map(id, tested), holm([c.test.p for c in tested])))
    return [None if c is None else comparison_cells(c, adjusted.get(id(c), float("nan"))) for c in comparisons]
