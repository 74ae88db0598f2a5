"""Reading what `prepare` wrote for a dataset: its image manifest and classes.json."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from finedefics.io import read_json

PREPARED = Path("data/prepared")


def load_prepared(name: str, root: Path = PREPARED) -> tuple[pd.DataFrame, dict]:
    """(manifest, classes) of the prepared dataset `name`."""
    folder = root / name
    return pd.read_parquet(folder / "images.parquet"), read_json(folder / "classes.json")
