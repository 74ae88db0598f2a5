"""Does a change of the training recipe learn as well? Two sets of DVC experiments (before and after,
one per training seed), their final models' multiple-choice average with the 95% t-interval over
seeds, Stage I's alignment rise, and the difference after - before on the same test images, tested
over seeds (`reporting.inference`: Welch's t, since a recipe change gives other seed streams).

    python benchmarks/learning.py --before default-s0 default-s1 default-s2 --after fast-s0 fast-s1 fast-s2

The experiments are read from the experiment ledger (`finedefics ledger` collects them).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from finedefics.reporting import ledger
from finedefics.reporting.comparison import compare, side
from finedefics.reporting.experiments import committed_params
from finedefics.reporting.ledger import Experiment
from finedefics.stats import across_seeds

REPO = Path(__file__).resolve().parents[1]


def pick(exps: list[Experiment], names: list[str]) -> list[Experiment]:
    by_name = {}
    for e in exps:  # newest first
        by_name.setdefault(e.name, e)
    missing = [n for n in names if n not in by_name]
    if missing:
        raise SystemExit(f"not in the ledger: {', '.join(missing)} (collect them with `finedefics ledger`)")
    return [by_name[n] for n in names]


def summary(label: str, runs: list[Experiment]) -> None:
    averages = [e.metrics["metrics/eval.json"]["average"]["accuracy"] for e in runs]
    s = across_seeds(averages)
    stage1 = [e.metrics.get("metrics/train_stage1.json", {}) for e in runs]
    start = np.mean([m.get("alignment_start", np.nan) for m in stage1])
    end = across_seeds([m.get("alignment_end", np.nan) for m in stage1])
    margin = across_seeds([m.get("alignment_margin_end", np.nan) for m in stage1])
    print(
        f"{label}: multiple-choice average {100 * s.mean:.1f} [{100 * s.low:.1f}, {100 * s.high:.1f}] over "
        f"{len(runs)} seeds ({', '.join(f'{100 * a:.1f}' for a in averages)}); Stage I alignment "
        f"{start:.3f} -> {end.mean:.3f} [{end.low:.3f}, {end.high:.3f}], margin {margin.mean:.3f} "
        f"[{margin.low:.3f}, {margin.high:.3f}]"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--before", nargs="+", required=True, help="experiment names, one per training seed")
    parser.add_argument("--after", nargs="+", required=True, help="experiment names, one per training seed")
    args = parser.parse_args()
    book = ledger.read(REPO / ledger.FOLDER)
    before, after = pick(list(book.experiments), args.before), pick(list(book.experiments), args.after)
    datasets = [k for k in before[0].metrics["metrics/eval.json"] if k != "average"]
    summary("before", before)
    summary("after ", after)
    default, scores = committed_params(REPO / "params.yaml"), book.scores(datasets)
    c = compare(side(after, "final", scores, default), side(before, "final", scores, default), paired=False)
    if c is None:
        raise SystemExit("the ledger lacks these experiments' predictions")
    t = c.test
    print(
        f"after - before on the same test images, {t.design} over seeds: {100 * t.difference:+.1f} "
        f"[{100 * t.low:+.1f}, {100 * t.high:+.1f}], p {t.p:.3f}"
    )


if __name__ == "__main__":
    main()
