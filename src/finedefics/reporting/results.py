"""`finedefics report`: reports/results.md, the paper's tables filled from the experiment ledger, the paper's
numbers beside ours.

Each row of a table (`tables.yaml`) names the params that differ from the committed `params.yaml` (the
ablation switches); its cells come from the ledger's experiments whose params are exactly those apart from
`train.seed` (the newest per training seed), and are marked missing when none matches. Every cell is the
mean over seeds with its 95% CI; every row's difference from its reference is tested over training seeds
(`reporting.inference`), Holm-corrected within the table. The report is a pure function of the ledger
(`finedefics.reporting.ledger`) and the committed params.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from finedefics.reporting.comparison import (
    COMPARISON_HEAD,
    compare,
    holm_cells,
    row_accuracy,
    seed_values,
    shares_streams,
    side,
)
from finedefics.reporting.experiments import SEEDLESS, experiments_with, provenance, used
from finedefics.reporting.ledger import Experiment, Scores
from finedefics.reporting.markdown import fmt, md_head, md_row, power_line, seed_text
from finedefics.reporting.paper import EXTRA, PAPER_DATASETS, PAPER_TABLE2, PAPER_TABLE8, TABLES, Row, Table


def table_md(
    table: Table,
    exps: list[Experiment],
    default: dict[str, Any],
    datasets: list[str],
    scores: Scores,
    regime: dict[str, Any] | None = None,
) -> str:
    """`table` as markdown; under a `regime` (params over the committed ones, `finedefics.reporting.regimes`),
    every row and the reference it is compared with take the regime's params first."""
    regime = regime or {}
    head = ["Method", *datasets, "Avg. [95% CI]", "seeds", "vs default " + COMPARISON_HEAD[0], *COMPARISON_HEAD[1:]]
    lines = [f"### {table.title}", "", *md_head([*head, "paper Avg.", "experiments"])]
    reference = experiments_with(exps, default, regime)
    ours = side(reference, "final", scores, default)
    found = [experiments_with(exps, default, regime | row.overrides) for row in table.rows]
    is_reference = [not row.overrides and row.model == "final" for row in table.rows]
    comparisons = [
        None if ref else compare(side(runs, row.model, scores, default), ours, shares_streams(row.overrides))
        for row, runs, ref in zip(table.rows, found, is_reference)
    ]
    for row, runs, ref, cells in zip(table.rows, found, is_reference, holm_cells(comparisons)):
        x = row_accuracy(runs, row.model, datasets)
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
    found = [experiments_with(exps, default, base.overrides) for base, _ in families]
    comparisons = [
        compare(side(runs, "final", scores, default), side(runs, "base", scores, default), True) for runs in found
    ]
    head = ["Family", "zero-shot", "+ A^3", "seeds", "gain " + COMPARISON_HEAD[0], *COMPARISON_HEAD[1:], "paper gain"]
    lines = md_head(head)
    for (base_row, final_row), runs, cells in zip(families, found, holm_cells(comparisons)):
        cells = cells or ["missing", "", "", ""]
        base, final = row_accuracy(runs, "base", datasets), row_accuracy(runs, "final", datasets)
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
    runs = experiments_with(exps, default, {})
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
        x = row_accuracy(runs, row.model, datasets)
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


def alignment_table(exps: list[Experiment], default: dict[str, Any], datasets: list[str]) -> str:
    """Table 8 (test images, analyze stage) for the default, and stage I's own before/after
    measures for every row that trains stage I; means over seeds with their t-intervals."""
    runs = experiments_with(exps, default, {})
    lines = ["### Table 8: object-category alignment (mean cosine of each object with its category name)", ""]
    head = ["Model", *datasets, "Avg.", "seeds", "paper Avg."]
    lines += md_head(head)
    for label, model in (("Base model", "base"), ("**Finedefics (ours)**", "finedefics")):
        analysis = [e.metrics.get("metrics/analysis.json", {}).get(model, {}) for e in runs]
        per_run = [v for v in ([a.get(d, {}).get("alignment") for d in datasets] for a in analysis) if None not in v]
        if model == "base":  # the base does not depend on the training seed: one run
            per_run = per_run[:1]
        cells = [seed_text([v[k] for v in per_run]) if per_run else "missing" for k in range(len(datasets))]
        avg = seed_text([float(np.mean(v)) for v in per_run]) if per_run else "missing"
        count = "1 run" if model == "base" and per_run else str(len(per_run))
        lines.append(md_row([label, *cells, avg, count, f"{PAPER_TABLE8[model]:.2f}"]))
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
        done = [e.metrics.get("metrics/train_stage1.json", {}) for e in experiments_with(exps, default, row.overrides)]
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
        return f"{text}\n\n{family_gains(t, exps, default, datasets, scores)}" if t.families else text

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
