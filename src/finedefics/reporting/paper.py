"""The paper's tables as the report fills them, and the paper's published numbers: read from `tables.yaml`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from finedefics.config import load_params

TABLES_FILE = Path(__file__).with_name("tables.yaml")


@dataclass(frozen=True)
class Row:
    label: str
    paper: float | None  # the paper's average accuracy (%); None where the paper has no such row
    overrides: dict[str, Any] = field(default_factory=dict)
    model: str = "final"  # a key of `experiments.MODEL_METRICS`: the final model, the base, or a CLIP baseline


@dataclass(frozen=True)
class Table:
    title: str
    rows: tuple[Row, ...]
    note: str = ""
    families: bool = False  # also each family's final model against its own zero-shot base (Table 4)


# The authors' release's loss and batch forms that apply on the world, as configs/release.yaml sets
# them (its QLoRA, fp16 and scale switches do not apply to the world's LoRA on a CPU).
RELEASE_CONFIG = Path(__file__).resolve().parents[3] / "configs" / "release.yaml"
WORLD_FORMS = (
    "align.ccc",
    "align.negatives_scope",
    "align.temperatures",
    "align.learn_temperature",
    "align.mask_same_class",
    "align.contrastive_batch",
    "align.text_bos",
    "train.generation_loss",
    "train.weight_decay",
)
_RELEASE = load_params(RELEASE_CONFIG).flat()
RELEASE = {key: _RELEASE[key] for key in WORLD_FORMS}
NAMED_OVERRIDES = {"release": RELEASE}  # sets of switches a row of tables.yaml names instead of listing


def _row(entry: dict[str, Any]) -> Row:
    overrides = entry.get("overrides") or {}
    if isinstance(overrides, str):
        overrides = NAMED_OVERRIDES[overrides]
    return Row(entry["label"], entry["paper"], dict(overrides), entry.get("model", "final"))


def _table(entry: dict[str, Any]) -> Table:
    rows = tuple(_row(r) for r in entry["rows"])
    return Table(entry["title"], rows, entry.get("note", ""), entry.get("families", False))


_DATA = yaml.safe_load(TABLES_FILE.read_text())

PAPER_DATASETS = tuple(_DATA["paper"]["datasets"])
PAPER_TABLE2: dict[str, tuple[float, ...]] = {k: tuple(v) for k, v in _DATA["paper"]["table2"].items()}
PAPER_TABLE8: dict[str, float] = _DATA["paper"]["table8"]  # per model folder: base, finedefics
OBJ_CAT: dict[str, Any] = _DATA["shared"]["obj_cat"]
TABLES = tuple(_table(t) for t in _DATA["tables"])  # the paper's
EXTRA = tuple(_table(t) for t in _DATA["beyond"])  # the report's own, after the paper's
OTHER_BASES = next(t for t in TABLES if t.families)  # Table 4
