"""What `prepare` writes for a dataset, as one typed object: its images (`images.parquet`, columns
declared in `data.manifest.IMAGES`) and its categories (`classes.json`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from finedefics.artefacts import IMAGES
from finedefics.io import read_json

PREPARED = Path("data/prepared")


@dataclass(frozen=True)
class Attribute:
    """An attribute of the world's super-category: its type and possible values."""

    type: str  # color | shape | texture | size | other
    values: list[str]


@dataclass(frozen=True)
class Category:
    label: int
    name: str  # exactly as the FOCI benchmark spells it
    cluster: int | None = None  # world: the cluster of confusable siblings
    profile: dict[str, str] | None = None  # world: the category's attribute values


@dataclass(frozen=True)
class PreparedDataset:
    name: str
    source: str  # world | real
    super_category: str  # e.g. bird
    plural: str  # e.g. birds (FOCI's query)
    unit: str  # what one category is, e.g. "bird species" (attribute discovery's prompt)
    categories: list[Category]
    attributes: dict[str, Attribute] = field(default_factory=dict)  # world only
    images: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(IMAGES.columns)), repr=False)

    @property
    def names(self) -> list[str]:
        """Category names in label order."""
        return [c.name for c in self.categories]

    @property
    def keys(self) -> list[str]:
        """The world's attribute names."""
        return list(self.attributes)

    def unseen(self, n: int, seed: int) -> list[int]:
        """The labels of `n` categories whose images training never shows (`world.unseen`): one per
        cluster of siblings in turn (each keeps seen siblings to be confused with), seeded."""
        import numpy as np

        if n > len(self.categories) - 4:
            raise ValueError(f"{self.name}: {n} unseen of {len(self.categories)} categories leaves fewer than 4 seen")
        rng = np.random.default_rng([seed, 17, len(self.categories)])
        clusters: dict[int, list[int]] = {}
        for c in self.categories:
            clusters.setdefault(c.label if c.cluster is None else c.cluster, []).append(c.label)
        members = [list(rng.permutation(clusters[k])) for k in rng.permutation(sorted(clusters))]
        rounds = [m[i] for i in range(max(map(len, members))) for m in members if i < len(m)]
        return sorted(int(label) for label in rounds[:n])

    @property
    def train(self) -> pd.DataFrame:
        return self.images[self.images.split == "train"]

    @property
    def test(self) -> pd.DataFrame:
        return self.images[self.images.split == "test"]

    def to_json(self) -> dict:
        """The content of classes.json."""
        categories = [
            {"label": c.label, "name": c.name}
            | ({"cluster": c.cluster, "profile": c.profile} if c.profile is not None else {})
            for c in self.categories
        ]
        attributes = {k: {"type": a.type, "values": list(a.values)} for k, a in self.attributes.items()}
        return {
            "dataset": self.name,
            "source": self.source,
            "super_category": self.super_category,
            "plural": self.plural,
            "class_unit": self.unit,
            "attributes": attributes,
            "classes": categories,
        }

    @classmethod
    def from_json(cls, meta: dict, images: pd.DataFrame) -> PreparedDataset:
        return cls(
            name=meta["dataset"],
            source=meta["source"],
            super_category=meta["super_category"],
            plural=meta["plural"],
            unit=meta["class_unit"],
            categories=[Category(c["label"], c["name"], c.get("cluster"), c.get("profile")) for c in meta["classes"]],
            attributes={k: Attribute(a["type"], list(a["values"])) for k, a in meta["attributes"].items()},
            images=images,
        )


def load_prepared(name: str, root: Path = PREPARED, images: bool = True) -> PreparedDataset:
    """The prepared dataset `name`, its images checked against the declared columns (`images`
    False: its categories alone, from classes.json)."""
    folder = root / name
    table = IMAGES.read(folder / "images.parquet") if images else pd.DataFrame(columns=list(IMAGES.columns))
    return PreparedDataset.from_json(read_json(folder / "classes.json"), table)


def test_images(names: list[str], root: Path = PREPARED) -> tuple[list[str], list[str]]:
    """Paths and category names of every test image of these datasets."""
    paths: list[str] = []
    categories: list[str] = []
    for name in names:
        test = load_prepared(name, root).test
        paths += list(test.path)
        categories += list(test.category)
    return paths, categories
