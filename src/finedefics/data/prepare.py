"""The `prepare` stage's work for one dataset: a checked manifest from real files or the world."""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from finedefics.config import WorldConfig
from finedefics.data import world
from finedefics.data.manifest import build_manifest, check_classes, check_leakage, foci_unmapped
from finedefics.data.prepared import Attribute, Category, PreparedDataset
from finedefics.data.real import REAL_DATASETS, RealDataset, Source, SourceImage, load_real


@dataclass
class Prepared:
    dataset: PreparedDataset  # images.parquet and classes.json
    rejected: pd.DataFrame
    unmapped: pd.DataFrame | None  # FOCI entries without exactly one prepared test image (real data)


def is_world(source: str) -> bool:
    return source.endswith((".yaml", ".yml"))


IMAGES_PER_WORKER = 128  # fewer images are drawn in this process (a worker costs more than it saves)


def _draw(item: world.WorldImage, spec: world.WorldSpec, cfg: WorldConfig, seed: int, name: str, out: Path) -> str:
    """Draw one image of the plan into `out`; its scene description as JSON."""
    image, scene = world.draw_image(spec, item, cfg, seed, name)
    image.save(out / _image_id(item), format="PNG")
    return json.dumps(scene, sort_keys=True)


def _image_id(item: world.WorldImage) -> str:
    return f"images/{item.split}/{item.label:03d}_{item.index:03d}.png"


def prepare_world(name: str, spec_file: Path, cfg: WorldConfig, seed: int, out: Path, final: Path) -> Prepared:
    """Draw the world's images into `out/images` (on every core: each image is seeded by itself);
    manifest paths point into `final`."""
    spec = world.WorldSpec.load(spec_file)
    classes = world.make_classes(spec, cfg, world.dataset_rng(seed, name, 0))
    plan = world.image_plan(spec, classes, cfg, seed, name)
    for split in {item.split for item in plan}:
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
    draw = partial(_draw, spec=spec, cfg=cfg, seed=seed, name=name, out=out)
    workers = min(os.cpu_count() or 1, len(plan) // IMAGES_PER_WORKER)
    bar = partial(tqdm, total=len(plan), desc=f"draw {name}", unit="img")
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            scenes = list(bar(pool.map(draw, plan, chunksize=16)))
    else:
        scenes = list(bar(map(draw, plan)))
    images, extra = [], {}
    for item, scene in zip(plan, scenes):
        image_id = _image_id(item)
        images.append(SourceImage(item.split, image_id, item.label, image_id, item.attributes))
        extra[image_id] = {"deviation": item.deviation, "scene": scene}
    source = Source(out, [c.name for c in classes], images)
    manifest, rejected = build_manifest(
        source, spec.super_category, extra, location=lambda f: str(final / f.relative_to(out))
    )
    categories = [Category(c.label, c.name, c.cluster, dict(c.profile)) for c in classes]
    attributes = {k: Attribute(a.type, list(a.values)) for k, a in spec.attributes.items()}
    return _checked(name, "world", spec, categories, attributes, manifest, rejected, None)


def first_per_class(source: Source, per_class: int) -> Source:
    """The first `per_class` train and test images of every class, by file name."""
    kept = sorted(source.images, key=lambda im: (im.split, im.label, im.image_id))
    seen: dict[tuple[str, int], int] = {}
    images = []
    for im in kept:
        n = seen[im.split, im.label] = seen.get((im.split, im.label), 0) + 1
        if n <= per_class:
            images.append(im)
    return Source(source.base, source.classes, images)


def prepare_real(name: str, root: Path, per_class: int | None = None) -> Prepared:
    """A real dataset in its published layout; `per_class` keeps that many train and test images per class."""
    source = load_real(name, root)  # refuses unknown names and incomplete folders
    if per_class is not None:
        source = first_per_class(source, per_class)
    spec = REAL_DATASETS[name]
    manifest, rejected = build_manifest(source, spec.super_category)
    categories = [Category(i, c) for i, c in enumerate(source.classes)]
    unmapped = foci_unmapped(manifest, json.loads(spec.foci_file.read_text()))
    return _checked(name, "real", spec, categories, {}, manifest, rejected, unmapped)


def _checked(
    name: str,
    source: str,
    spec: world.WorldSpec | RealDataset,
    categories: list[Category],
    attributes: dict[str, Attribute],
    manifest: pd.DataFrame,
    rejected: pd.DataFrame,
    unmapped: pd.DataFrame | None,
) -> Prepared:
    """The prepared dataset, once its images pass the leakage and class checks."""
    dataset = PreparedDataset(
        name, source, spec.super_category, spec.plural, spec.class_unit, categories, attributes, manifest
    )
    check_leakage(dataset.images)
    check_classes(dataset.images, dataset.names)
    return Prepared(dataset, rejected, unmapped)


def statistics(p: Prepared) -> dict[str, float]:
    """Counts logged to MLflow and written to metrics/prepare/<name>.json."""
    m = p.dataset.images
    per_class = p.dataset.train.groupby("label").size()
    stats = {
        "classes": len(p.dataset.categories),
        "train_images": len(p.dataset.train),
        "test_images": len(p.dataset.test),
        "rejected_images": len(p.rejected),
        "train_per_class_min": int(per_class.min()),
        "train_per_class_max": int(per_class.max()),
        "mean_width": float(m.width.mean()),
        "mean_height": float(m.height.mean()),
    }
    if p.unmapped is not None:
        stats["foci_unmapped"] = len(p.unmapped)
    if (m.deviation != "").any():
        stats["deviating_images"] = int((m.deviation != "").sum())
    return stats
