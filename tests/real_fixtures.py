"""Small trees in the exact published layouts of the six real datasets.

Test images are real FOCI test entries (their published file names and classes, taken from
the reference files), so the FOCI key mapping is tested against the benchmark itself; train
images get invented names. Every image has distinct bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.io as sio
from PIL import Image

from finedefics.data.real import REAL_DATASETS, flower_classes

CLASSES_PER_DATASET = 3
TEST_PER_CLASS = 2
TRAIN_PER_CLASS = 2


@dataclass
class Fixture:
    root: Path
    classes: list[str]  # in label order
    test_keys: dict[str, str] = field(default_factory=dict)  # foci key -> class
    train_count: int = 0


_counter = [0]


def write_image(path: Path) -> None:
    """A tiny JPEG whose bytes differ from every other image written here."""
    _counter[0] += 1
    rng = np.random.default_rng(_counter[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(path, format="JPEG")


def foci_sample(
    name: str, classes: int | None = CLASSES_PER_DATASET, per_class: int | None = TEST_PER_CLASS
) -> dict[str, list[str]]:
    """The first `classes` classes of the FOCI reference (all if None) and a few of their test keys."""
    reference = json.loads(REAL_DATASETS[name].foci_file.read_text())
    return {c: [e["image"] for e in entries[:per_class]] for c, entries in list(reference.items())[:classes]}


def closed_sample(name: str, classes: int = 2) -> dict[str, list[str]]:
    """`foci_sample` of `classes` classes, and every class their FOCI option sets name, without test keys
    (the makers give such a class one test image FOCI does not list): a tree whose option sets name only
    classes it holds, as the paper path's mining checks."""
    sample = foci_sample(name, classes)
    reference = json.loads(REAL_DATASETS[name].foci_file.read_text())
    keys = {k for ks in sample.values() for k in ks}
    named = [
        o for v in reference.values() for e in v if e["image"] in keys for o in e["options"]
    ]  # dog-120 lists one image twice
    return sample | {o: [] for o in named if o not in sample}


def _naming_key(name: str, cls: str, keys: list[str]) -> str:
    """A FOCI key of the class, for its folder or file-name stem."""
    return keys[0] if keys else json.loads(REAL_DATASETS[name].foci_file.read_text())[cls][0]["image"]


def _strip(key: str) -> str:
    return key.removeprefix("images/")


def make_cub(root: Path, closed: bool = False) -> Fixture:
    sample = closed_sample("bird-200") if closed else foci_sample("bird-200")
    fx = Fixture(root, list(sample))
    lines = {"images": [], "labels": [], "split": [], "classes": []}
    attrs = [
        "1 has_bill_shape::curved_(up_or_down)",
        "2 has_bill_shape::dagger",
        "3 has_wing_color::blue",
        "4 has_wing_color::white",
    ]
    attr_rows = []
    image_id = 0
    for label, (cls, keys) in enumerate(sample.items()):
        folder = _strip(_naming_key("bird-200", cls, keys)).split("/")[0]  # e.g. 001.Black_footed_Albatross
        lines["classes"].append(f"{label + 1} {folder}")
        tests = [_strip(k) for k in keys] or [f"{folder}/{cls}_test_0.jpg"]
        rels = [(t, "0") for t in tests] + [(f"{folder}/{cls}_train_{i}.jpg", "1") for i in range(TRAIN_PER_CLASS)]
        for rel, is_train in rels:
            image_id += 1
            write_image(root / "images" / rel)
            lines["images"].append(f"{image_id} {rel}")
            lines["labels"].append(f"{image_id} {label + 1}")
            lines["split"].append(f"{image_id} {is_train}")
            for attr in range(1, 5):
                present = int(attr in (1 + label % 2, 3, 4) if image_id % 2 else attr in (2, 3))
                attr_rows.append(f"{image_id} {attr} {present} 3 10.5")
        fx.test_keys.update({k: cls for k in keys})
        fx.train_count += TRAIN_PER_CLASS
    for fname, key in (
        ("images.txt", "images"),
        ("image_class_labels.txt", "labels"),
        ("train_test_split.txt", "split"),
        ("classes.txt", "classes"),
    ):
        (root / fname).write_text("\n".join(lines[key]) + "\n")
    (root / "attributes").mkdir()
    (root / "attributes" / "image_attribute_labels.txt").write_text("\n".join(attr_rows) + "\n")
    (root.parent / "attributes.txt").write_text("\n".join(attrs) + "\n")
    return fx


def _annotations(rows: list[tuple[str, int]]) -> np.ndarray:
    dtype = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"), ("fname", "O")]
    return np.array([(0, 0, 10, 10, label, fname) for fname, label in rows], dtype=dtype)


def make_cars(root: Path, closed: bool = False) -> Fixture:
    sample = closed_sample("car-196") if closed else foci_sample("car-196")
    fx = Fixture(root, list(sample))
    train, test = [], []
    for label, (cls, keys) in enumerate(sample.items()):
        for fname in [_strip(k) for k in keys] or [f"{90000 + label:05d}.jpg"]:
            write_image(root / "cars_test" / fname)
            test.append((fname, label + 1))
        for i in range(TRAIN_PER_CLASS):
            fname = f"{label * TRAIN_PER_CLASS + i + 1:05d}.jpg"
            write_image(root / "cars_train" / fname)
            train.append((fname, label + 1))
        fx.test_keys.update({k: cls for k in keys})
        fx.train_count += TRAIN_PER_CLASS
    (root / "devkit").mkdir(parents=True)
    sio.savemat(root / "devkit" / "cars_meta.mat", {"class_names": np.array(fx.classes, dtype=object).reshape(1, -1)})
    sio.savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": _annotations(train)})
    sio.savemat(root / "cars_test_annos_withlabels.mat", {"annotations": _annotations(test)})
    return fx


def _cell(items: list[str]) -> np.ndarray:
    cell = np.empty((len(items), 1), dtype=object)
    for i, item in enumerate(items):
        cell[i, 0] = item
    return cell


def make_dogs(root: Path, closed: bool = False) -> Fixture:
    sample = closed_sample("dog-120") if closed else foci_sample("dog-120")
    fx = Fixture(root, list(sample))
    lists: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "test": ([], [])}
    for label, (cls, keys) in enumerate(sample.items()):
        folder = _strip(_naming_key("dog-120", cls, keys)).split("/")[0]  # e.g. n02085620-Chihuahua
        for rel in [_strip(k) for k in keys] or [f"{folder}/{folder.split('-')[0]}_test0.jpg"]:
            lists["test"][0].append(rel)
            lists["test"][1].append(label + 1)
        for i in range(TRAIN_PER_CLASS):
            lists["train"][0].append(f"{folder}/{folder.split('-')[0]}_train{i}.jpg")
            lists["train"][1].append(label + 1)
        fx.test_keys.update({k: cls for k in keys})
        fx.train_count += TRAIN_PER_CLASS
    for split, (files, labels) in lists.items():
        for rel in files:
            write_image(root / "Images" / rel)
        sio.savemat(root / f"{split}_list.mat", {"file_list": _cell(files), "labels": np.array(labels).reshape(-1, 1)})
    return fx


def make_flowers(root: Path, closed: bool = False) -> Fixture:
    """Flower-102's class list is fixed, so every class gets one test, one train and one val image
    (closed already)."""
    sample = foci_sample("flower-102", classes=None, per_class=1)
    names = flower_classes()
    fx = Fixture(root, names)
    ids: dict[str, list[int]] = {"trnid": [], "valid": [], "tstid": []}
    labels = np.ones(8189, dtype=np.uint8)
    test_ids = {int(_strip(k)[len("image_") : -len(".jpg")]) for keys in sample.values() for k in keys}
    free = (i for i in range(1, 8190) if i not in test_ids)
    for cls, keys in sample.items():
        assigned = [("tstid", int(_strip(k)[len("image_") : -len(".jpg")])) for k in keys]
        assigned += [("trnid", next(free)), ("valid", next(free))]
        for setname, image_id in assigned:
            ids[setname].append(image_id)
            labels[image_id - 1] = names.index(cls) + 1
            write_image(root / "jpg" / f"image_{image_id:05d}.jpg")
        fx.test_keys.update({k: cls for k in keys})
        fx.train_count += 2
    sio.savemat(root / "imagelabels.mat", {"labels": labels.reshape(1, -1)})
    sio.savemat(root / "setid.mat", {k: np.array(v).reshape(1, -1) for k, v in ids.items()})
    return fx


def make_pets(root: Path, closed: bool = False) -> Fixture:
    sample = closed_sample("pet-37") if closed else foci_sample("pet-37")
    fx = Fixture(root, list(sample))
    lines: dict[str, list[str]] = {"trainval.txt": [], "test.txt": []}
    for label, (cls, keys) in enumerate(sample.items()):
        stem = _strip(_naming_key("pet-37", cls, keys)).rsplit("_", 1)[0]  # e.g. Abyssinian, american_bulldog
        for test in [_strip(k)[:-4] for k in keys] or [f"{stem}_800"]:
            lines["test.txt"].append(f"{test} {label + 1} 1 1")
        for i in range(TRAIN_PER_CLASS):
            lines["trainval.txt"].append(f"{stem}_{900 + i} {label + 1} 1 1")
        fx.test_keys.update({k: cls for k in keys})
        fx.train_count += TRAIN_PER_CLASS
    (root / "annotations").mkdir(parents=True)
    for fname, rows in lines.items():
        (root / "annotations" / fname).write_text("\n".join(rows) + "\n")
        for row in rows:
            write_image(root / "images" / f"{row.split()[0]}.jpg")
    return fx


def make_aircraft(root: Path, closed: bool = False) -> Fixture:
    sample = closed_sample("aircraft-102") if closed else foci_sample("aircraft-102")
    fx = Fixture(root, list(sample))
    data = root / "data"
    lines: dict[str, list[str]] = {"images_variant_trainval.txt": [], "images_variant_test.txt": []}
    for label, (cls, keys) in enumerate(sample.items()):
        tests = [_strip(k)[:-4] for k in keys] or [f"{8000000 + label}"]
        lines["images_variant_test.txt"] += [f"{t} {cls}" for t in tests]
        lines["images_variant_trainval.txt"] += [f"{9000000 + label * 10 + i} {cls}" for i in range(TRAIN_PER_CLASS)]
        fx.test_keys.update({k: cls for k in keys})
        fx.train_count += TRAIN_PER_CLASS
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("\n".join(fx.classes) + "\n")
    for fname, rows in lines.items():
        (data / fname).write_text("\n".join(rows) + "\n")
        for row in rows:
            write_image(data / "images" / f"{row.split(' ', 1)[0]}.jpg")
    return fx


def make_flat(root: Path, name: str) -> Fixture:
    """The authors' prepared layout: images/ (every FOCI test key) + train/ listed in train.csv."""
    sample = foci_sample(name, classes=None, per_class=None)
    fx = Fixture(root, list(sample))
    rows = ["image,class_name"]
    for cls, keys in sample.items():
        for k in keys:
            write_image(root / k)
        for _ in range(TRAIN_PER_CLASS):
            rel = f"train/{len(rows):05d}.jpg"
            write_image(root / rel)
            rows.append(f'{rel},"{cls}"')
        fx.test_keys.update({k: cls for k in keys})
        fx.train_count += TRAIN_PER_CLASS
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return fx


MAKERS = {
    "bird-200": make_cub,
    "car-196": make_cars,
    "dog-120": make_dogs,
    "flower-102": make_flowers,
    "pet-37": make_pets,
    "aircraft-102": make_aircraft,
}
