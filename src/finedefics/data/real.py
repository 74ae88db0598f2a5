"""Loaders for the six real FGVR datasets in their published layouts.

Each loader reads the dataset's own annotation files (no download) and returns the class
names, exactly as the FOCI benchmark spells them, and every image with its split, label and
`foci_key` (its path in FOCI's `images/...` form). A dataset folder may hold the published
files directly or inside the folder the published archive (or torchvision's `download=True`)
creates, e.g. `data/raw/bird-200/CUB_200_2011/`. The flat `images/` layout of the Finedefics
authors' prepared release is read too: test images under `images/` labelled by the FOCI
reference file, train images listed in `train.csv` (columns `image`, `class_name`).

A malformed annotation file (a short line, a label outside the classes, an image id missing from
one of CUB's tables, bytes that are not UTF-8, a .mat file scipy cannot read or that lacks a
variable) raises `AnnotationError`: one line naming the file, the line (or the .mat variable's
entry) and what was expected there.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.io import loadmat

REFERENCE_DIR = Path(__file__).resolve().parents[1] / "reference" / "foci"


class DatasetNotFound(FileNotFoundError):
    """The dataset folder is missing or incomplete; the message is one line."""


class AnnotationError(ValueError):
    """An annotation file is malformed; the one-line message names the file, the line (or the
    MATLAB variable's entry) and what was expected there."""


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


# --- reading annotation files: every malformed entry is one AnnotationError line -------------


def stable_message(err: BaseException) -> str:
    """An exception's message on one line without memory addresses, the same text every run."""
    text = " ".join(str(err).split())
    return _ADDRESS.sub("", text) or type(err).__name__


_ADDRESS = re.compile(r"(?: at)? 0x[0-9a-fA-F]{8,}")  # a memory address, not a short code like 0xFF


def _show(value: object, limit: int = 60) -> str:
    """A value as it appears in an error message: quoted, one line, cut at `limit` characters."""
    text = str(value) if isinstance(value, str) else stable_message(ValueError(value))
    return repr(text if len(text) <= limit else text[:limit] + "...")


@dataclass(frozen=True)
class _Line:
    """One non-blank, non-comment line of an annotation text file."""

    path: Path
    number: int  # 1-based, counting every line of the file
    text: str  # stripped

    def error(self, expected: str, got: str | None = None) -> AnnotationError:
        return AnnotationError(f"{self.path}:{self.number}: expected {expected}, got {got or _show(self.text)}")

    def fields(self, count: int, expected: str, maxsplit: int = -1) -> list[str]:
        """The first `count` whitespace-separated fields (the last one holding the rest if maxsplit)."""
        parts = self.text.split(maxsplit=maxsplit)
        if len(parts) < count:
            raise self.error(expected)
        return parts[:count]

    def number_in(self, value: str, low: int, high: int | None, expected: str) -> int:
        """`value` as an int in [low, high] (no upper bound if high is None)."""
        try:
            n = int(value)
        except ValueError:
            raise self.error(expected, _show(value)) from None
        if n < low or (high is not None and n > high):
            raise self.error(expected, _show(value))
        return n


def _text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DatasetNotFound(f"{path}: file not found") from None
    except OSError as err:
        raise AnnotationError(f"{path}: expected a readable file, got {err.strerror or type(err).__name__}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise AnnotationError(f"{path}:{line}: expected UTF-8 text, got the byte 0x{data[err.start]:02x}") from None


def _lines(path: Path) -> list[_Line]:
    """The file's non-blank lines not starting with '#', with their line numbers."""
    lines = (_Line(path, n, raw.strip()) for n, raw in enumerate(_text(path).split("\n"), 1))
    return [line for line in lines if line.text and not line.text.startswith("#")]


def _id_map(path: Path, expected: str, maxsplit: int = -1) -> dict[str, tuple[str, _Line]]:
    """`<id> <value>` lines as {id: (value, line)}; an id listed twice is an error."""
    found: dict[str, tuple[str, _Line]] = {}
    for line in _lines(path):
        key, value = line.fields(2, expected, maxsplit)
        if key in found:
            raise line.error(f"each image id once ({key} is already on line {found[key][1].number})")
        found[key] = (value, line)
    return found


def _loadmat(path: Path, *keys: str) -> dict:
    """The MATLAB file's variables; it must hold every one of `keys`."""
    if not path.is_file():
        raise DatasetNotFound(f"{path}: file not found")
    try:
        mat = loadmat(path, squeeze_me=True)
    except Exception as err:  # scipy raises many types for files that are not MATLAB files
        raise AnnotationError(
            f"{path}: expected a MATLAB .mat file, got one scipy cannot read ({stable_message(err)})"
        ) from None
    missing = [k for k in keys if k not in mat]
    if missing:
        found = ", ".join(sorted(k for k in mat if not k.startswith("__"))) or "none"
        raise AnnotationError(f"{path}: expected the variable(s) {', '.join(keys)}, got {found}")
    return mat


def _mat_list(path: Path, mat: dict, key: str) -> list:
    value = np.atleast_1d(mat[key])
    if value.ndim != 1:
        raise AnnotationError(f"{path}: expected {key} to be a list, got an array of shape {value.shape}")
    return list(value)


def _mat_int(value: object) -> int | None:
    arr = np.asarray(value)
    if arr.size != 1 or arr.dtype.kind not in "iuf":
        return None
    x = arr.reshape(-1)[0]
    if arr.dtype.kind == "f" and not (np.isfinite(x) and float(x).is_integer()):
        return None
    return int(x)


def _mat_str(value: object) -> str | None:
    arr = np.asarray(value)
    if arr.size != 1 or arr.dtype.kind != "U":
        return None
    return str(arr.reshape(-1)[0]) or None


def _mat_ints(path: Path, mat: dict, key: str, low: int, high: int | None, what: str) -> list[int]:
    """Variable `key` as a list of ints in [low, high]; a bad entry is named by its position."""
    out = []
    for k, value in enumerate(_mat_list(path, mat, key), 1):
        n = _mat_int(value)
        if n is None or n < low or (high is not None and n > high):
            raise AnnotationError(f"{path}: {key} entry {k}: expected {what}, got {_show(value)}")
        out.append(n)
    return out


def _struct_list(path: Path, mat: dict, key: str, fields: tuple[str, ...]) -> list:
    value = np.atleast_1d(mat[key])
    if value.dtype.names is None or not set(fields) <= set(value.dtype.names) or value.ndim != 1:
        raise AnnotationError(f"{path}: expected {key} to be a list of structs with fields {', '.join(fields)}")
    return list(value)


def _classes_by_label(labels: list[tuple[int, str, str]]) -> list[str]:
    """Class names in label order from (0-based label, name, where) records of the images.

    Labels must count up from 1 without gaps and every image of a label must give the same name.
    """
    names: dict[int, tuple[str, str]] = {}
    for label, name, where in labels:
        first = names.setdefault(label, (name, where))
        if first[0] != name:
            raise AnnotationError(
                f"{where}: expected class {label + 1} to be {first[0]!r} as at {first[1]}, got {_show(name)}"
            )
    for label, _, where in labels:
        if label >= len(names):
            raise AnnotationError(
                f"{where}: expected a class id from 1 to {len(names)} ({len(names)} classes are listed and "
                f"their ids count up from 1 without gaps), got {label + 1}"
            )
    return [names[i][0] for i in range(len(names))]


# --- the six published layouts --------------------------------------------------------------


def load_cub(base: Path) -> Source:
    classes = []
    for line in _lines(base / "classes.txt"):
        expected = f"'{len(classes) + 1} <number>.<class name>' (class ids count up from 1)"
        class_id, folder = line.fields(2, expected, maxsplit=1)
        name = folder.split(".", 1)[1].strip() if "." in folder else ""
        if class_id != str(len(classes) + 1) or not name:
            raise line.error(expected)
        classes.append(name)
    paths = _id_map(base / "images.txt", "'<image id> <image path>'", maxsplit=1)
    labels_file, split_file = base / "image_class_labels.txt", base / "train_test_split.txt"
    labels = _id_map(labels_file, "'<image id> <class id>'")
    splits = _id_map(split_file, "'<image id> <1 for train, 0 for test>'")
    attributes = _cub_attributes(base)
    images = []
    for i, (rel, where) in paths.items():
        label = _cub_field(labels_file, labels, i, where, 1, len(classes), f"a class id from 1 to {len(classes)}")
        is_train = _cub_field(split_file, splits, i, where, 0, 1, "1 (train) or 0 (test)")
        images.append(
            SourceImage(
                "train" if is_train else "test",
                f"images/{rel}",
                label - 1,
                f"images/{rel}",
                attributes.get(i) if attributes is not None else None,
            )
        )
    return Source(base, classes, images)


def _cub_field(
    path: Path, table: dict[str, tuple[str, _Line]], image_id: str, listed: _Line, low: int, high: int, expected: str
) -> int:
    """Image `image_id`'s number in a CUB `<image id> <number>` file; `listed` is its images.txt line."""
    if image_id not in table:
        raise AnnotationError(
            f"{path}: expected a line for image id {image_id} (listed on line {listed.number} of "
            f"{listed.path.name}), got none"
        )
    value, line = table[image_id]
    return line.number_in(value, low, high, expected)


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
    expected = "'<attribute id> has_<attribute>::<value>'"
    for line in _lines(names_file):
        attr_id, raw = line.fields(2, expected, maxsplit=1)
        key, sep, value = raw.strip().partition("::")
        if not sep or not key or not value:
            raise line.error(expected)
        names[attr_id] = (key.removeprefix("has_").replace("_", " "), value.replace("_", " "))
    present: dict[str, dict[str, list[str]]] = {}
    for line in _lines(labels_file):
        image_id, attr_id, is_present = line.fields(3, "'<image id> <attribute id> <is present 0/1> ...'")
        if attr_id not in names:
            raise line.error(f"an attribute id listed in {names_file}", _show(attr_id))
        if line.number_in(is_present, 0, 1, "is present 0 or 1 as the third field"):
            key, value = names[attr_id]
            present.setdefault(image_id, {}).setdefault(key, []).append(value)
    return {i: {k: " and ".join(v) for k, v in attrs.items()} for i, attrs in present.items()}


def load_cars(base: Path) -> Source:
    devkit = base / "devkit"
    meta = devkit / "cars_meta.mat"
    classes = []
    for k, value in enumerate(_mat_list(meta, _loadmat(meta, "class_names"), "class_names"), 1):
        name = _mat_str(value)
        if name is None:
            raise AnnotationError(f"{meta}: class_names entry {k}: expected a class name, got {_show(value)}")
        classes.append(name)
    test_annos = next(
        p for p in (base / "cars_test_annos_withlabels.mat", devkit / "cars_test_annos_withlabels.mat") if p.is_file()
    )
    images = []
    for split, annos, folder in (
        ("train", devkit / "cars_train_annos.mat", "cars_train"),
        ("test", test_annos, "cars_test"),
    ):
        for k, a in enumerate(
            _struct_list(annos, _loadmat(annos, "annotations"), "annotations", ("fname", "class")), 1
        ):
            fname, label = _mat_str(a["fname"]), _mat_int(a["class"])
            if fname is None:
                raise AnnotationError(f"{annos}: annotations entry {k}: expected a file name, got {_show(a['fname'])}")
            if label is None or not 1 <= label <= len(classes):
                raise AnnotationError(
                    f"{annos}: annotations entry {k}: expected a class from 1 to {len(classes)}, got {_show(a['class'])}"
                )
            images.append(SourceImage(split, f"{folder}/{fname}", label - 1, f"images/{fname}"))
    return Source(base, classes, images)


def load_dogs(base: Path) -> Source:
    labelled: list[tuple[int, str, str]] = []
    images = []
    for split in ("train", "test"):
        path = base / f"{split}_list.mat"
        lists = _loadmat(path, "file_list", "labels")
        files = _mat_list(path, lists, "file_list")
        labels = _mat_ints(path, lists, "labels", 1, None, "a class id from 1")
        if len(files) != len(labels):
            raise AnnotationError(f"{path}: expected as many labels as files, got {len(labels)} and {len(files)}")
        for k, (value, label) in enumerate(zip(files, labels), 1):
            rel = _mat_str(value)
            folder = rel.split("/")[0] if rel is not None and "/" in rel else ""
            if "-" not in folder or not folder.split("-", 1)[1]:
                raise AnnotationError(
                    f"{path}: file_list entry {k}: expected '<wnid>-<breed>/<file>', got {_show(value)}"
                )
            labelled.append((label - 1, folder.split("-", 1)[1], f"{path}: file_list entry {k}"))
            images.append(SourceImage(split, f"Images/{rel}", label - 1, f"images/{rel}"))
    return Source(base, _classes_by_label(labelled), images)


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
    classes = flower_classes()
    path = base / "imagelabels.mat"
    labels = _mat_ints(path, _loadmat(path, "labels"), "labels", 1, len(classes), f"a class from 1 to {len(classes)}")
    path = base / "setid.mat"
    setid = _loadmat(path, "trnid", "valid", "tstid")
    images = []
    for split, keys in (("train", ("trnid", "valid")), ("test", ("tstid",))):
        for key in keys:
            ids = _mat_ints(path, setid, key, 1, len(labels), f"an image id from 1 to {len(labels)} (imagelabels.mat)")
            for image_id in ids:
                name = f"image_{image_id:05d}.jpg"
                images.append(SourceImage(split, f"jpg/{name}", labels[image_id - 1] - 1, f"images/{name}"))
    return Source(base, classes, images)


def load_pets(base: Path) -> Source:
    labelled: list[tuple[int, str, str]] = []
    images = []
    expected = "'<image name> <class id> <species> <breed id>'"
    for split, listing in (("train", "trainval.txt"), ("test", "test.txt")):
        for line in _lines(base / "annotations" / listing):
            image_id, label = line.fields(2, expected)
            label_i = line.number_in(label, 1, None, "a class id from 1 as the second field") - 1
            breed = " ".join(part.title() for part in image_id.rsplit("_", 1)[0].split("_") if part)
            if not breed:
                raise line.error("an image name '<breed>_<number>'", _show(image_id))
            labelled.append((label_i, breed, f"{line.path}:{line.number}"))
            images.append(SourceImage(split, f"images/{image_id}.jpg", label_i, f"images/{image_id}.jpg"))
    return Source(base, _classes_by_label(labelled), images)


def load_aircraft(base: Path) -> Source:
    data = base / "data"
    classes, index = [], {}
    for line in _lines(data / "variants.txt"):
        if line.text in index:
            raise line.error(f"each variant once ({line.text!r} is already on line {index[line.text][1]})")
        index[line.text] = (len(classes), line.number)
        classes.append(line.text)
    images = []
    for split, listing in (("train", "images_variant_trainval.txt"), ("test", "images_variant_test.txt")):
        for line in _lines(data / listing):
            image_id, variant = line.fields(2, "'<image id> <variant>'", maxsplit=1)
            if variant not in index:
                raise line.error("a variant listed in variants.txt", _show(variant))
            label = index[variant][0]
            images.append(SourceImage(split, f"data/images/{image_id}.jpg", label, f"images/{image_id}.jpg"))
    return Source(base, classes, images)


def load_flat(base: Path, foci_file: Path) -> Source:
    """The authors' prepared release: `images/` (test, labelled by FOCI) + `train.csv`."""
    reference = json.loads(foci_file.read_text())
    classes = list(reference)
    path = base / "train.csv"
    reader = csv.DictReader(io.StringIO(_text(path), newline=""))
    train = []
    try:
        if reader.fieldnames is None or not {"image", "class_name"} <= set(reader.fieldnames):
            got = _show(",".join(f or "" for f in reader.fieldnames or []))
            raise AnnotationError(f"{path}:1: expected the header 'image,class_name', got {got}")
        for row in reader:
            image, class_name = row["image"], row["class_name"]
            if not image or not class_name:
                fields = [f for v in row.values() if v is not None for f in ([v] if isinstance(v, str) else v)]
                raise AnnotationError(
                    f"{path}:{reader.line_num}: expected '<image path>,<class name>', got {_show(','.join(fields))}"
                )
            train.append((image, class_name))
    except csv.Error as err:
        raise AnnotationError(f"{path}:{reader.line_num}: expected CSV, got {stable_message(err)}") from None
    classes += sorted({c for _, c in train} - set(classes))
    index = {c: i for i, c in enumerate(classes)}
    images = [SourceImage("train", rel, index[c], rel) for rel, c in train]
    images += [
        SourceImage("test", e["image"], index[c], e["image"]) for c, entries in reference.items() for e in entries
    ]
    return Source(base, classes, images)


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
