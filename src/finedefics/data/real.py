"""Loaders for the six real FGVR datasets in their published layouts.

Each loader reads the dataset's own annotation files (no download) and returns the class
names, exactly as the FOCI benchmark spells them, and every image with its split, label and
`foci_key` (its path in FOCI's `images/...` form). A dataset folder may hold the published
files directly or inside the folder the published archive (or torchvision's `download=True`)
creates, e.g. `data/raw/bird-200/CUB_200_2011/`. The flat `images/` layout of the Finedefics
authors' prepared release is read too: test images under `images/` labelled by the FOCI
reference file, train images listed in `train.csv` (columns `image`, `class_name`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.io import loadmat

REFERENCE_DIR = Path(__file__).resolve().parents[1] / "reference" / "foci"


class DatasetNotFound(FileNotFoundError):
    """The dataset folder is missing or incomplete; the message is one line."""


@dataclass(frozen=True)
class SourceImage:
    split: str  # "train" | "test"
    image_id: str  # the image's path relative to the dataset's base folder
    label: int
    foci_key: str
    attributes: dict[str, str] | None = None


@dataclass
class Source:
    """What a loader found: the base folder, class names in label order and the images."""

    base: Path
    classes: list[str]
    images: list[SourceImage] = field(default_factory=list)


@dataclass(frozen=True)
class RealDataset:
    name: str
    super_category: str
    plural: str
    class_unit: str
    required: tuple[str, ...]  # files a published layout must have, relative to its base folder
    subfolder: str  # the folder the published archive / torchvision creates
    load: Callable[[Path], Source]

    @property
    def foci_file(self) -> Path:
        return REFERENCE_DIR / f"{self.name}-ViT-L-14-laion2b_s32b_b82k-4.json"


def _mat_list(value: object) -> list:
    return list(np.atleast_1d(value))


def _mat_str(value: object) -> str:
    return str(np.atleast_1d(value)[0]) if isinstance(value, np.ndarray) else str(value)


def load_cub(base: Path) -> Source:
    classes = [line.split(maxsplit=1)[1].strip().split(".", 1)[1] for line in _lines(base / "classes.txt")]
    paths = dict(line.split(maxsplit=1) for line in _lines(base / "images.txt"))
    labels = {i: int(c) - 1 for i, c in (line.split() for line in _lines(base / "image_class_labels.txt"))}
    is_train = {i: t == "1" for i, t in (line.split() for line in _lines(base / "train_test_split.txt"))}
    attributes = _cub_attributes(base)
    images = [
        SourceImage(
            "train" if is_train[i] else "test",
            f"images/{rel}",
            labels[i],
            f"images/{rel}",
            attributes.get(i) if attributes is not None else None,
        )
        for i, rel in paths.items()
    ]
    return Source(base, classes, images)


def _cub_attributes(base: Path) -> dict[str, dict[str, str]] | None:
    """CUB's per-image attribute annotations as {image_id: {"bill shape": "hooked", ...}}, if present."""
    labels_file = base / "attributes" / "image_attribute_labels.txt"
    names_file = next(
        (
            p
            for p in (base / "attributes" / "attributes.txt", base / "attributes.txt", base.parent / "attributes.txt")
            if p.is_file()
        ),
        None,
    )
    if not labels_file.is_file() or names_file is None:
        return None
    names = {}
    for line in _lines(names_file):
        attr_id, raw = line.split(maxsplit=1)
        key, value = raw.strip().split("::", 1)
        names[attr_id] = (key.removeprefix("has_").replace("_", " "), value.replace("_", " "))
    present: dict[str, dict[str, list[str]]] = {}
    for line in _lines(labels_file):
        image_id, attr_id, is_present = line.split()[:3]
        if is_present == "1":
            key, value = names[attr_id]
            present.setdefault(image_id, {}).setdefault(key, []).append(value)
    return {i: {k: " and ".join(v) for k, v in attrs.items()} for i, attrs in present.items()}


def load_cars(base: Path) -> Source:
    devkit = base / "devkit"
    classes = [str(c) for c in _mat_list(loadmat(devkit / "cars_meta.mat", squeeze_me=True)["class_names"])]
    test_annos = next(
        p for p in (base / "cars_test_annos_withlabels.mat", devkit / "cars_test_annos_withlabels.mat") if p.is_file()
    )
    images = []
    for split, annos, folder in (
        ("train", devkit / "cars_train_annos.mat", "cars_train"),
        ("test", test_annos, "cars_test"),
    ):
        for a in _mat_list(loadmat(annos, squeeze_me=True)["annotations"]):
            fname = _mat_str(a["fname"])
            images.append(SourceImage(split, f"{folder}/{fname}", int(a["class"]) - 1, f"images/{fname}"))
    return Source(base, classes, images)


def load_dogs(base: Path) -> Source:
    by_label: dict[int, str] = {}
    images = []
    for split in ("train", "test"):
        lists = loadmat(base / f"{split}_list.mat", squeeze_me=True)
        for rel, label in zip(_mat_list(lists["file_list"]), _mat_list(lists["labels"])):
            rel = _mat_str(rel)
            by_label[int(label) - 1] = rel.split("/")[0].split("-", 1)[1]
            images.append(SourceImage(split, f"Images/{rel}", int(label) - 1, f"images/{rel}"))
    return Source(base, [by_label[i] for i in range(len(by_label))], images)


# torchvision's Flowers102.classes, with the three names FOCI spells differently.
_FOCI_FLOWER_NAMES = {
    "globe-flower": "globe flower",
    "pink-yellow dahlia?": "pink and yellow dahlia",
    "ball moss": "air plant",
}


def flower_classes() -> list[str]:
    from torchvision.datasets import Flowers102

    return [_FOCI_FLOWER_NAMES.get(c, c) for c in Flowers102.classes]


def load_flowers(base: Path) -> Source:
    labels = _mat_list(loadmat(base / "imagelabels.mat", squeeze_me=True)["labels"])
    setid = loadmat(base / "setid.mat", squeeze_me=True)
    images = []
    for split, keys in (("train", ("trnid", "valid")), ("test", ("tstid",))):
        for key in keys:
            for image_id in _mat_list(setid[key]):
                name = f"image_{int(image_id):05d}.jpg"
                images.append(SourceImage(split, f"jpg/{name}", int(labels[int(image_id) - 1]) - 1, f"images/{name}"))
    return Source(base, flower_classes(), images)


def load_pets(base: Path) -> Source:
    by_label: dict[int, str] = {}
    images = []
    for split, listing in (("train", "trainval.txt"), ("test", "test.txt")):
        for line in _lines(base / "annotations" / listing):
            image_id, label = line.split()[:2]
            label_i = int(label) - 1
            by_label[label_i] = " ".join(part.title() for part in image_id.rsplit("_", 1)[0].split("_"))
            images.append(SourceImage(split, f"images/{image_id}.jpg", label_i, f"images/{image_id}.jpg"))
    return Source(base, [by_label[i] for i in range(len(by_label))], images)


def load_aircraft(base: Path) -> Source:
    data = base / "data"
    classes = _lines(data / "variants.txt")
    index = {c: i for i, c in enumerate(classes)}
    images = []
    for split, listing in (("train", "images_variant_trainval.txt"), ("test", "images_variant_test.txt")):
        for line in _lines(data / listing):
            image_id, variant = line.split(" ", 1)
            if variant not in index:
                raise ValueError(f"{data / listing}: variant {variant!r} is not in variants.txt")
            images.append(SourceImage(split, f"data/images/{image_id}.jpg", index[variant], f"images/{image_id}.jpg"))
    return Source(base, classes, images)


def load_flat(base: Path, foci_file: Path) -> Source:
    """The authors' prepared release: `images/` (test, labelled by FOCI) + `train.csv`."""
    reference = json.loads(foci_file.read_text())
    classes = list(reference)
    with open(base / "train.csv", newline="") as f:
        train = [(row["image"], row["class_name"]) for row in csv.DictReader(f)]
    classes += sorted({c for _, c in train} - set(classes))
    index = {c: i for i, c in enumerate(classes)}
    images = [SourceImage("train", rel, index[c], rel) for rel, c in train]
    images += [
        SourceImage("test", e["image"], index[c], e["image"]) for c, entries in reference.items() for e in entries
    ]
    return Source(base, classes, images)


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


REAL_DATASETS: dict[str, RealDataset] = {
    d.name: d
    for d in (
        RealDataset(
            "bird-200",
            "bird",
            "birds",
            "species",
            ("images", "images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"),
            "CUB_200_2011",
            load_cub,
        ),
        RealDataset(
            "car-196",
            "car",
            "cars",
            "models",
            ("cars_train", "cars_test", "devkit/cars_meta.mat", "devkit/cars_train_annos.mat"),
            "stanford_cars",
            load_cars,
        ),
        RealDataset(
            "dog-120",
            "dog",
            "dogs",
            "breeds",
            ("Images", "train_list.mat", "test_list.mat"),
            "stanford_dogs",
            load_dogs,
        ),
        RealDataset(
            "flower-102",
            "flower",
            "flowers",
            "species",
            ("jpg", "imagelabels.mat", "setid.mat"),
            "flowers-102",
            load_flowers,
        ),
        RealDataset(
            "pet-37",
            "pet",
            "pets",
            "breeds",
            ("images", "annotations/trainval.txt", "annotations/test.txt"),
            "oxford-iiit-pet",
            load_pets,
        ),
        RealDataset(
            "aircraft-102",
            "aircraft",
            "aircrafts",
            "models",
            ("data/images", "data/variants.txt", "data/images_variant_trainval.txt", "data/images_variant_test.txt"),
            "fgvc-aircraft-2013b",
            load_aircraft,
        ),
    )
}
FLAT_REQUIRED = ("images", "train.csv")


def load_real(name: str, root: Path) -> Source:
    """Load dataset `name` from `root` (published layout, its archive subfolder, or flat)."""
    spec = REAL_DATASETS.get(name)
    if spec is None:
        raise DatasetNotFound(
            f"{name}: not a known real dataset ({', '.join(REAL_DATASETS)}); world datasets point to a world/*.yaml spec"
        )
    for base in (root, root / spec.subfolder):
        if all((base / r).exists() for r in spec.required):
            if name == "car-196" and not any(
                (p / "cars_test_annos_withlabels.mat").is_file() for p in (base, base / "devkit")
            ):
                continue
            return spec.load(base)
    if all((root / r).exists() for r in FLAT_REQUIRED):
        return load_flat(root, spec.foci_file)
    wanted = ", ".join((*spec.required, "cars_test_annos_withlabels.mat") if name == "car-196" else spec.required)
    raise DatasetNotFound(
        f"{name}: dataset not found or incomplete at {root}: looked for {wanted} in {root} "
        f"or {root / spec.subfolder}, or the flat layout {' + '.join(FLAT_REQUIRED)} in {root}"
    )
