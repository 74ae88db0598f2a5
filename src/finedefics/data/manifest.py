"""The prepared-image manifest: content hashes, corrupt-image rejection, leakage and class checks."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from finedefics.artefacts import IMAGES
from finedefics.data.real import Source, stable_message


class LeakageError(ValueError):
    """The same image bytes occur in the train and the test split."""


class EmptyClassError(ValueError):
    """A class has no usable image in a split."""


@dataclass(frozen=True)
class Inspection:
    sha1: str
    width: int
    height: int
    reason: str  # "" when the image is usable


def inspect_image(path: Path) -> Inspection:
    """Hash the file and decode it fully; a missing or corrupt file gets a reason instead.

    Reasons are stable text (no memory addresses or absolute paths), so `rejected.csv` is
    byte-identical across runs.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Inspection("", 0, 0, "missing file")
    except OSError as err:
        return Inspection("", 0, 0, f"unreadable file: {err.strerror or type(err).__name__}")
    sha1 = hashlib.sha1(data).hexdigest()
    if not data:
        return Inspection(sha1, 0, 0, "unreadable image: empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return Inspection(sha1, im.width, im.height, "")
    except UnidentifiedImageError:  # its message names the in-memory buffer by address
        return Inspection(sha1, 0, 0, "unreadable image: not a recognised image format")
    except Exception as err:  # PIL raises many types for broken files
        return Inspection(sha1, 0, 0, f"unreadable image: {type(err).__name__}: {stable_message(err)}")


def build_manifest(
    source: Source,
    super_category: str,
    extra: dict[str, dict[str, str]] | None = None,
    location: Callable[[Path], str] = str,
    workers: int = 8,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Inspect every image of `source`; returns (manifest, rejected).

    `extra` maps image_id to additional columns (the world's deviation); `location` turns the
    file being read into the path recorded in the manifest.
    """
    files = [source.base / img.image_id for img in source.images]
    with ThreadPoolExecutor(workers) as pool:
        checks = list(tqdm(pool.map(inspect_image, files), total=len(files), desc="inspect images", unit="img"))
    rows, rejected, seen = [], [], set()
    for img, file, check in zip(source.images, files, checks):
        if (img.split, img.image_id) in seen:
            check = Inspection("", 0, 0, f"listed more than once in the {img.split} split")
        seen.add((img.split, img.image_id))
        if check.reason:
            rejected.append(
                {"image_id": img.image_id, "path": location(file), "split": img.split, "reason": check.reason}
            )
            continue
        rows.append(
            {
                "image_id": img.image_id,
                "path": location(file),
                "split": img.split,
                "label": img.label,
                "category": source.classes[img.label],
                "super_category": super_category,
                "foci_key": img.foci_key,
                "sha1": check.sha1,
                "width": check.width,
                "height": check.height,
                "attributes": json.dumps(img.attributes, sort_keys=True) if img.attributes else "",
                "deviation": "",
                "scene": "",
                **(extra or {}).get(img.image_id, {}),
            }
        )
    manifest = pd.DataFrame(rows, columns=list(IMAGES.columns))
    return manifest, pd.DataFrame(rejected, columns=["image_id", "path", "split", "reason"])


def check_leakage(manifest: pd.DataFrame, limit: int = 10) -> None:
    """Refuse any image whose bytes are in both splits (equal names with other bytes are fine)."""
    train = manifest[manifest.split == "train"]
    test = manifest[manifest.split == "test"]
    shared = set(train.sha1) & set(test.sha1)
    if not shared:
        return
    pairs = []
    for sha in sorted(shared)[:limit]:
        a = train.loc[train.sha1 == sha, "path"].iloc[0]
        b = test.loc[test.sha1 == sha, "path"].iloc[0]
        pairs.append(f"{a} == {b}")
    more = f" (and {len(shared) - limit} more)" if len(shared) > limit else ""
    raise LeakageError(f"{len(shared)} image(s) are in both train and test: {'; '.join(pairs)}{more}")


def check_classes(manifest: pd.DataFrame, classes: list[str]) -> None:
    """Every class must keep at least one image in each split."""
    for split in ("train", "test"):
        present = set(manifest.loc[manifest.split == split, "label"])
        empty = [classes[i] for i in range(len(classes)) if i not in present]
        if empty:
            listed = ", ".join(repr(c) for c in empty[:10])
            raise EmptyClassError(f"{len(empty)} class(es) have no usable {split} image: {listed}")


def foci_unmapped(manifest: pd.DataFrame, reference: dict[str, list[dict]]) -> pd.DataFrame:
    """FOCI test entries that do not map to exactly one prepared test image of their class."""
    test = manifest[manifest.split == "test"]
    by_key = test.groupby("foci_key")["category"].apply(list).to_dict()
    missing = []
    for class_name, entries in reference.items():
        for entry in entries:
            found = by_key.get(entry["image"], [])
            if len(found) == 1 and found[0] == class_name:
                continue
            if not found:
                reason = "no prepared test image"
            elif len(found) > 1:
                reason = f"{len(found)} prepared test images"
            else:
                reason = f"prepared as class {found[0]!r}"
            missing.append({"image": entry["image"], "groundtruth": class_name, "reason": reason})
    return pd.DataFrame(missing, columns=["image", "groundtruth", "reason"])
