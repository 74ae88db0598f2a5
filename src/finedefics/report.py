"""`finedefics report`: the paper's tables filled from the experiment ledger, the paper's numbers beside ours.

Each row of a table names the params that differ from the committed `params.yaml` (the ablation
switches); its cell comes from the ledger's experiments whose params are exactly those apart from
`train.seed` (the newest per training seed), and is marked missing when none matches. Every cell is
the mean over seeds with its 95% CI; every row's difference from its reference is tested over
training seeds (`finedefics.inference`), Holm-corrected within the table. The report is a pure
function of the ledger (`finedefics.ledger`) and the committed params.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from finedefics import inference
from finedefics.inference import ONE_SAMPLE, PAIRED, WELCH, SeedTest, holm, resolved, smallest_resolvable
from finedefics.ledger import SEED, Experiment, Scores, flatten
from finedefics.stats import across_seeds

PAPER_DATASETS = ("Dog-120", "Bird-200", "Aircraft-102", "Flower-102", "Pet-37", "Car-196")


@dataclass(frozen=True)
class Row:
    label: str
    paper: float | None  # the paper's average (accuracy %, or the Table 8 cosine)
    overrides: dict[str, Any] = field(default_factory=dict)
    model: str = "final"  # a key of MODEL_METRICS: the final model, the base, or a CLIP baseline


@dataclass(frozen=True)
class Table:
    title: str
    rows: tuple[Row, ...]
    note: str = ""


ORIGINAL = Row("Original (base model, zero-shot)", 65.95, model="base")
OURS = Row("**Finedefics (ours)**", 76.84)
OBJ_CAT = {"align.objective": "obj-cat"}
LLAVA = {"model.base": "tiny-llava"}
QWEN = {"model.base": "tiny-qwen2.5-vl"}
# where each Row.model's accuracies are: a metrics file, and the section of it
MODEL_METRICS = {
    "final": ("metrics/eval.json", None),
    "base": ("metrics/eval_base.json", None),
    "clip": ("metrics/eval_clip.json", "mining"),
    "clip_baseline": ("metrics/eval_clip.json", "baseline"),
}
SEEDLESS = ("base", "clip", "clip_baseline")  # models that do not depend on train.seed
PREDICTIONS = {"final": "finedefics", "base": "base", "clip": "clip/mining", "clip_baseline": "clip/baseline"}

OTHER_BASES = Table(
    "Table 4: attribute augmented alignment on other base MLLMs",
    (
        Row("LLaVA 1.5", 43.24, LLAVA, model="base"),
        Row("LLaVA 1.5 + A^3", 57.21, LLAVA),
        Row("Qwen2.5-VL", None, QWEN, model="base"),
        Row("Qwen2.5-VL + A^3", None, QWEN),
    ),
    "The Qwen2.5-VL rows go beyond the paper; published 4-way numbers on the six FOCI datasets put "
    "Qwen2.5-VL-7B zero-shot at about 81. `vs default` compares with the default's Idefics2 after both "
    "stages; the base and + A^3 rows of one family are the same experiments.",
)

TABLES = (
    Table(
        "Table 3a: fine-tuning methods",
        (
            ORIGINAL,
            Row("Finetune (open-set QA only)", 0.03, {"align.paradigm": "stage2-only", "instructions.stage2": "open"}),
            OURS,
        ),
    ),
    Table(
        "Table 3b: effectiveness of attributes",
        (ORIGINAL, Row("CL (obj.-cat.)", 72.72, OBJ_CAT), Row("**CL (obj.-att.-cat.)**", 76.84)),
    ),
    Table(
        "Table 3c: training paradigm",
        (ORIGINAL, Row("One stage", 25.42, {"align.paradigm": "one-stage"}), Row("**Two stages**", 76.84)),
    ),
    OTHER_BASES,
    Table(
        "Table 5: attribute types",
        (
            Row("without color", 75.66, {"attributes.types": ["shape", "texture", "size"]}),
            Row("without shape", 76.41, {"attributes.types": ["color", "texture", "size"]}),
            Row("without texture", 74.54, {"attributes.types": ["color", "shape", "size"]}),
            Row("without size", 75.49, {"attributes.types": ["color", "shape", "texture"]}),
            Row("**all four**", 76.84),
        ),
        "The paper's copy we work from lost Table 5's check marks; its rows 1-4 are listed here in order "
        "as dropping color, shape, texture, size, which is an assumption.",
    ),
    Table(
        "Table 6a: negative types",
        (
            ORIGINAL,
            Row("Simple Neg.", 74.26, {"negatives": "simple"}),
            Row("No hard-negative terms", None, {"negatives": "none"}),
            Row("**Hard Neg. (ours)**", 76.84),
        ),
    ),
    Table(
        "Table 6b: training stages",
        (
            Row("Pretrain only", 0.00, {"align.paradigm": "stage1-only"}),
            Row("I.T. only", 76.13, {"align.paradigm": "stage2-only"}),
            Row("**Pretrain + I.T.**", 76.84),
        ),
    ),
    Table(
        "Table 6c: description quality",
        (
            Row("None (obj.-cat.)", 72.72, OBJ_CAT),
            Row("Noisy", 75.62, {"attributes.quality": "noisy"}),
            Row("**Complete (ours)**", 76.84),
        ),
    ),
    Table(
        "Table 6d: levels of detailed descriptions",
        (
            Row("None (obj.-cat.)", 72.72, OBJ_CAT),
            Row("Short", 76.11, {"attributes.level": "short"}),
            Row("**Long (ours)**", 76.84),
        ),
    ),
    Table(
        "Table 6e: description construction",
        (
            Row("Upper-bound (ground-truth attributes)", 52.52, {"attributes.construction": "ground-truth"}),
            Row("Tag-based baseline", 50.48, {"attributes.construction": "tag-based"}),
            Row("**Finedefics (ours)**", 51.12),
        ),
        "The paper trains these on Bird-200 alone and reports Bird-200; ours train on the whole world, and "
        "the toy-bird column is the comparable one.",
    ),
)
# the authors' release's loss and batch forms, on the world (configs/release.yaml has all)
RELEASE = {
    "align.ccc": "release",
    "align.negatives_scope": "batch",
    "align.temperatures": "two",
    "align.learn_temperature": False,
    "align.mask_same_class": False,
    "align.contrastive_batch": "device",
    "align.text_bos": True,
    "train.generation_loss": "sequence",
    "train.weight_decay": 0.01,
}
EXTRA = (
    Table(
        "Beyond the paper: the authors' release as it ran",
        (
            Row("ours (default)", None),
            Row("the release's eq. 7 alone", None, {"align.ccc": "release"}),
            Row("the release's generation loss on every token alone", None, {"train.generation_loss": "sequence"}),
            Row("the release's loss forms (eq. 7, shared negatives, frozen temperatures, ...)", None, RELEASE),
        ),
        "Not a table of the paper: the release's eq. 7, negative scope, two frozen temperatures, no same-class "
        "masking, per-device contrastive batch, BOS on texts, loss on every token and weight decay 0.01, on the "
        "world (fp32: fp16 autocast costs ~10x on CPU; the QLoRA-only switches do not apply to the world's LoRA, "
        "and the release's LoRA rank, alpha, dropout and Gaussian init are not switched here). README: Paper, "
        "release, ours.",
    ),
    Table(
        "Beyond the paper: the form of eq. 7 (L_CCC)",
        (
            Row("bounded: the name itself as the positive (default)", None),
            Row("as written: log sum_k exp Sim(c_i, c_k), unbounded below", None, {"align.ccc": "logsumexp"}),
        ),
        "Not a table of the paper: why Table 8's measure falls with eq. 7 as written (README: Training).",
    ),
)
PAPER_TABLE2 = {
    "Idefics2": (57.96, 47.17, 56.23, 72.78, 81.28, 80.25, 65.95),
    "Finedefics": (72.86, 57.61, 63.82, 89.88, 92.18, 84.67, 76.84),
}
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
PLANNED_SEEDS = 5  # the power line also says what this many seeds per row would resolve


def shares_streams(switches: Iterable[str]) -> bool:
    """Whether a row that switches these params (dotted keys) over its reference draws the same seed streams."""
    return not any(key == p or key.startswith(p) for key in switches for p in OWN_STREAMS)


def find(exps: list[Experiment], default: dict[str, Any], overrides: dict[str, Any]) -> list[Experiment]:
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
    seen = {e.rev: e for o in overrides for e in find(exps, default, o)}
    return sorted(seen.values(), key=lambda e: (e.timestamp, e.rev))


def provenance(runs: list[Experiment]) -> str:
    commits = sorted({e.commit[:7] for e in runs})
    machines = sorted({e.machine for e in runs if e.machine})
    return f"Experiments from commit(s) {', '.join(commits) or 'none'}; collected on {'; '.join(machines) or '-'}."


def md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def md_head(head: list[str]) -> list[str]:
    """A markdown table's header and rule."""
    return [md_row(head), "|" + " --- |" * len(head)]


def fmt(value: float | None, digits: int = 1) -> str:
    return "missing" if value is None else f"{value:.{digits}f}"


def metrics_of(exp: Experiment, model: str) -> dict[str, Any]:
    path, section = MODEL_METRICS[model]
    data = exp.metrics.get(path, {})
    return data.get(section, {}) if section else data


@dataclass(frozen=True)
class Cell:
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


def cell(runs: list[Experiment], model: str, datasets: list[str]) -> Cell:
    seedless = model in SEEDLESS
    if seedless:  # the base and the CLIPs do not depend on the training seed: one run that has them
        runs = [e for e in runs if metrics_of(e, model)][:1]
    data = [metrics_of(e, model) for e in runs]
    averages = [d.get("average", {}).get("accuracy") for d in data]
    if not runs or None in averages:
        return Cell([None] * len(datasets), None, None, None, len(runs), seedless)
    per_dataset = [_mean([d.get(n, {}).get("accuracy") for d in data]) for n in datasets]
    if len(runs) > 1:  # no interval from identical seeds: that would read as certainty
        s = across_seeds(averages)
        low, high = (s.low, s.high) if np.ptp(averages) > inference.TOLERANCE else (None, None)
    else:
        low, high = data[0]["average"].get("accuracy_low"), data[0]["average"].get("accuracy_high")
        if low is not None and high is not None and high - low <= inference.TOLERANCE:
            low = high = None  # every image scored alike: the bootstrap has no spread to show
    pct = lambda v: None if v is None else 100 * v  # noqa: E731
    return Cell([pct(v) for v in per_dataset], pct(float(np.mean(averages))), pct(low), pct(high), len(runs), seedless)


def _mean(values: list[float | None]) -> float | None:
    return None if None in values else float(np.mean(values))


# one side of a comparison: each training seed's per-dataset image scores; a seedless model has the one key None
Side = dict[int | None, list[dict[str, float]]]


def side(runs: list[Experiment], model: str, scores: Scores, default: dict[str, Any]) -> Side | None:
    """A row's predictions per seed (a seedless model's from the first run that has them); None when any
    of them is not in the ledger."""
    if model in SEEDLESS:  # the first run with both its metrics and its predictions, as `cell` shows its metrics
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


def p_text(p: float) -> str:
    """A p value as printed: 3 decimals rounded down (so a p below 0.05 never prints as 0.050), or 2
    significant digits below 0.001."""
    return f"{p:.1e}" if p < 0.001 else f"{math.floor(p * 1000) / 1000:.3f}"


def holm_cells(comparisons: list[Comparison | None]) -> list[list[str] | None]:
    """Each comparison's cells, Holm-adjusted over the tested ones."""
    tested = [c for c in comparisons if c is not None and c.test.tested]
    adjusted = dict(zip(map(id, tested), holm([c.test.p for c in tested])))
    return [None if c is None else comparison_cells(c, adjusted.get(id(c), float("nan"))) for c in comparisons]


COMPARISON_HEAD = ["[95% CI]", "test", "resolved", "McNemar p (images)"]


def seed_values(runs: list[Experiment], key: str = "accuracy") -> list[float]:
    """The final model's average `key` (accuracy, or a part of it such as `unseen_accuracy`) per seed."""
    values = [metrics_of(e, "final").get("average", {}).get(key) for e in runs]
    return [v for v in values if v is not None]


def power_line(values: list[float]) -> str:
    """The smallest differences the table's seeds resolve, from the reference row's accuracies over seeds."""
    if len(values) < 2:
        return "Power: the reference has fewer than 2 seeds, so no difference in this table can be resolved."
    sd = 100 * float(np.std(values, ddof=1))
    if np.ptp(values) <= inference.TOLERANCE:
        return f"Power: the reference's {len(values)} seeds are identical, so their spread cannot size a resolvable difference."

    def sizes(n: int) -> str:
        return ", ".join(f"{smallest_resolvable(sd, n, d):.1f} ({d})" for d in (PAIRED, WELCH, ONE_SAMPLE))

    return (
        f"Power: the reference's seed sd is {sd:.1f} points over {len(values)} seeds. With {len(values)} seeds a row, "
        f"a true difference of at least {sizes(len(values))} points is resolved with 80% power (alpha 0.05, "
        f"two-sided, before Holm); with {PLANNED_SEEDS} seeds: {sizes(PLANNED_SEEDS)}. A smaller true difference "
        "is likely to read not resolved."
    )


def table_md(
    table: Table,
    exps: list[Experiment],
    default: dict[str, Any],
    datasets: list[str],
    scores: Scores,
    regime: dict[str, Any] | None = None,
) -> str:
    """`table` as markdown; under a `regime` (params over the committed ones, `finedefics.regimes`),
    every row and the reference it is compared with take the regime's params first."""
    regime = regime or {}
    head = ["Method", *datasets, "Avg. [95% CI]", "seeds", "vs default " + COMPARISON_HEAD[0], *COMPARISON_HEAD[1:]]
    lines = [f"### {table.title}", "", *md_head([*head, "paper Avg.", "experiments"])]
    reference = find(exps, default, regime)
    ours = side(reference, "final", scores, default)
    found = [find(exps, default, regime | row.overrides) for row in table.rows]
    is_reference = [not row.overrides and row.model == "final" for row in table.rows]
    comparisons = [
        None if ref else compare(side(runs, row.model, scores, default), ours, shares_streams(row.overrides))
        for row, runs, ref in zip(table.rows, found, is_reference)
    ]
    for row, runs, ref, cells in zip(table.rows, found, is_reference, holm_cells(comparisons)):
        x = cell(runs, row.model, datasets)
        if ref:
            cells = ["(the reference)", "", "", ""]
        elif cells is None:
            cells = ["missing" if runs else "", "", "", ""]
        shown = runs[:1] if row.model in SEEDLESS else runs
        source = ", ".join(f"`{e.name}`" for e in shown)
        source += f" ({row.model} model)" if source and row.model in SEEDLESS else ""
        paper = "not in the paper" if row.paper is None else f"{row.paper:.2f}"
        lines.append(
            md_row([row.label, *map(fmt, x.per_dataset), x.text(), x.count(), *cells, paper, source or "missing"])
        )
    lines += ["", power_line(seed_values(reference))]
    if table.note:
        lines += ["", table.note]
    return "\n".join(lines)


def family_gains(
    table: Table, exps: list[Experiment], default: dict[str, Any], datasets: list[str], scores: Scores
) -> str:
    """Table 4's own question: each family's final model against its zero-shot base (the `table`'s base and
    final rows with the same switches), on the same test images (one-sample t over seeds, Holm over the
    families)."""
    families = [
        (base, final)
        for base in table.rows
        if base.model == "base"
        for final in table.rows
        if final.model == "final" and final.overrides == base.overrides
    ]
    found = [find(exps, default, base.overrides) for base, _ in families]
    comparisons = [
        compare(side(runs, "final", scores, default), side(runs, "base", scores, default), True) for runs in found
    ]
    head = ["Family", "zero-shot", "+ A^3", "seeds", "gain " + COMPARISON_HEAD[0], *COMPARISON_HEAD[1:], "paper gain"]
    lines = md_head(head)
    for (base_row, final_row), runs, cells in zip(families, found, holm_cells(comparisons)):
        cells = cells or ["missing", "", "", ""]
        base, final = cell(runs, "base", datasets), cell(runs, "final", datasets)
        papers = (final_row.paper, base_row.paper)
        gain = "not in the paper" if None in papers else f"{papers[0] - papers[1]:+.2f}"
        lines.append(md_row([base_row.label, base.text(), final.text(), str(final.runs), *cells, gain]))
    return "\n".join(
        [
            "Within each family, + A^3 against its own zero-shot base on the same test images (the base does not "
            "depend on the training seed: a one-sample t of the per-seed gains):",
            "",
            *lines,
        ]
    )


def main_table(exps: list[Experiment], default: dict[str, Any], datasets: list[str], scores: Scores) -> str:
    runs = find(exps, default, {})
    lines = ["### Table 2: main result (4-way multiple choice, FOCI protocol, accuracy %)", ""]
    head = ["Model", *datasets, "Avg. [95% CI]", "seeds", "vs Finedefics " + COMPARISON_HEAD[0], *COMPARISON_HEAD[1:]]
    lines += md_head(head)
    rows = (
        Row("Base model (zero-shot)", None, model="base"),
        Row("**Finedefics (ours)**", None),
        Row("CLIP that mined the options (zero-shot, 4-way)", None, model="clip"),
        Row("CLIP (zero-shot, 4-way), independent of the options", None, model="clip_baseline"),
    )
    ours = side(runs, "final", scores, default)
    comparisons = [
        None if r.model == "final" else compare(side(runs, r.model, scores, default), ours, True) for r in rows
    ]
    for row, cells in zip(rows, holm_cells(comparisons)):
        x = cell(runs, row.model, datasets)
        if row.model == "final":
            cells = ["(the reference)", "", "", ""]
        lines.append(
            md_row([row.label, *map(fmt, x.per_dataset), x.text(), x.count(), *(cells or ["missing", "", "", ""])])
        )
    lines += [
        "",
        power_line(seed_values(runs)),
        "",
        "The CLIP rows score each image's 4 options by image-text similarity (`evaluate@clip`). The first is "
        "the CLIP that mined the options: they are its own hardest wrong classes, so its 4-way accuracy equals "
        "its top-1 over every class. The second did not pick them (`model.clip_baseline`).",
    ]
    lines += ["", "The paper (" + ", ".join(PAPER_DATASETS) + ", Avg.):", ""]
    for name, values in PAPER_TABLE2.items():
        lines.append(f"- {name}: " + " / ".join(f"{v:.2f}" for v in values))
    return "\n".join(lines)


def seed_text(values: list[float], digits: int = 3) -> str:
    """Mean over seeds with the t-interval of the mean, or the one value."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    s = across_seeds(values)
    if np.ptp(values) <= inference.TOLERANCE:
        return f"{s.mean:.{digits}f} (identical seeds)"
    return f"{s.mean:.{digits}f} [{s.low:.{digits}f}, {s.high:.{digits}f}]"


def alignment_table(exps: list[Experiment], default: dict[str, Any], datasets: list[str]) -> str:
    """Table 8 (test images, analyze stage) for the default, and stage I's own before/after
    measures for every row that trains stage I; means over seeds with their t-intervals."""
    runs = find(exps, default, {})
    lines = ["### Table 8: object-category alignment (mean cosine of each object with its category name)", ""]
    head = ["Model", *datasets, "Avg.", "seeds", "paper Avg."]
    lines += md_head(head)
    for label, model, paper in (("Base model", "base", 0.13), ("**Finedefics (ours)**", "finedefics", 0.27)):
        analysis = [e.metrics.get("metrics/analysis.json", {}).get(model, {}) for e in runs]
        per_run = [v for v in ([a.get(d, {}).get("alignment") for d in datasets] for a in analysis) if None not in v]
        if model == "base":  # the base does not depend on the training seed: one run
            per_run = per_run[:1]
        cells = [seed_text([v[k] for v in per_run]) if per_run else "missing" for k in range(len(datasets))]
        avg = seed_text([float(np.mean(v)) for v in per_run]) if per_run else "missing"
        count = "1 run" if model == "base" and per_run else str(len(per_run))
        lines.append(md_row([label, *cells, avg, count, f"{paper:.2f}"]))
    lines += [
        "",
        "Stage I's own measures (both datasets' test images, before -> after stage I, means over seeds with "
        "their 95% t-intervals): the mean cosine above, the margin (own name minus the mean of the other names, "
        "immune to an offset all representations share) and top-1 retrieval of the own name among all names.",
        "",
        "| switches | seeds | cosine | margin | top-1 |",
        "| --- | --- | --- | --- | --- |",
    ]
    seen = []
    for row in (r for t in (*TABLES, *EXTRA) for r in t.rows if r.model == "final"):
        if row.overrides in seen:
            continue
        seen.append(row.overrides)
        done = [e.metrics.get("metrics/train_stage1.json", {}) for e in find(exps, default, row.overrides)]
        done = [m for m in done if "alignment_end" in m]
        if not done:
            continue
        pairs = [
            f"{seed_text([m[f'{k}_start'] for m in done][:1])} -> {seed_text([m[f'{k}_end'] for m in done])}"
            for k in ("alignment", "alignment_margin", "alignment_top1")
        ]
        switches = ", ".join(f"{k}={v}" for k, v in row.overrides.items()) or "(default)"
        lines.append(md_row([switches, str(len(done)), *pairs]))
    return "\n".join(lines)


METHOD = (
    "Every cell is the mean over the row's training seeds (`train.seed`) with its 95% CI: the t-interval over "
    "seeds, or for one run (`1 run`: the zero-shot bases and the CLIPs, which do not depend on the training seed) "
    "the stratified bootstrap over test images (each image shown in `evaluate.permutations` seeded option orders). "
    "`vs default` is the row minus its reference in points, on the test images both have, tested over training "
    "seeds, the units of training variance (each seed's accuracy holds its images' noise): a paired t (df = "
    "seeds - 1) on the seeds both rows have when they share their seed streams (the seeds it paired are named), "
    "Welch's t when they do not (another base family, paradigm, data size or batch), and a one-sample t of the "
    "per-seed differences against a model that has no seed. `resolved` is yes when the Holm-corrected p over the "
    "table's tested rows is below 0.05; a row with one seed is not tested. A difference not marked resolved is "
    "not an ordering: the data do not separate it from noise, and the power line under each table says how "
    "large a difference its seeds could resolve. `McNemar p (images)` is a secondary check per dataset on each "
    "image's majority outcome (test-image noise only; it does not see training noise and decides nothing)."
)


def render(exps: list[Experiment], default: dict[str, Any], datasets: list[str], scores: Scores) -> str:
    def section(t: Table) -> str:
        text = table_md(t, exps, default, datasets, scores)
        return f"{text}\n\n{family_gains(t, exps, default, datasets, scores)}" if t is OTHER_BASES else text

    read = used(exps, default, [{}, *(r.overrides for t in (*TABLES, *EXTRA) for r in t.rows)])
    parts = [
        "# Results: the paper's tables on the embedded world",
        "",
        "Written by `finedefics report` from the experiment ledger (`reports/ledger/`, the experiments of "
        "`scripts/ablations.sh`). Ours: 4-way multiple-choice accuracy (%) on the world's test images; the "
        "paper's: its average over six real datasets with Idefics2-8b. The two are not comparable in level, only "
        "in ordering.",
        "",
        METHOD,
        "",
        provenance(read),
        "",
        main_table(exps, default, datasets, scores),
        "",
        *(part for t in (*TABLES, *EXTRA) for part in (section(t), "")),
        alignment_table(exps, default, datasets),
        "",
    ]
    return "\n".join(parts)


def committed_params(path: Path) -> dict[str, Any]:
    return flatten(yaml.safe_load(path.read_text()))
