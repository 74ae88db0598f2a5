"""Markdown and numbers as the reports print them."""

from __future__ import annotations

import math

import numpy as np

from finedefics.reporting import inference
from finedefics.reporting.inference import ONE_SAMPLE, PAIRED, WELCH, smallest_resolvable
from finedefics.stats import across_seeds

PLANNED_SEEDS = 5  # the power line also says what this many seeds per row would resolve


def md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def md_head(head: list[str]) -> list[str]:
    """A markdown table's header and rule."""
    return [md_row(head), "|" + " --- |" * len(head)]


def fmt(value: float | None, digits: int = 1) -> str:
    return "missing" if value is None else f"{value:.{digits}f}"


def p_text(p: float) -> str:
    """A p value as printed: 3 decimals rounded down (so a p below 0.05 never prints as 0.050), or 2
    significant digits below 0.001."""
    return f"{p:.1e}" if p < 0.001 else f"{math.floor(p * 1000) / 1000:.3f}"


def seed_text(values: list[float], digits: int = 3) -> str:
    """Mean over seeds with the t-interval of the mean, or the one value."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    s = across_seeds(values)
    if np.ptp(values) <= inference.TOLERANCE:
        return f"{s.mean:.{digits}f} (identical seeds)"
    return f"{s.mean:.{digits}f} [{s.low:.{digits}f}, {s.high:.{digits}f}]"


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
