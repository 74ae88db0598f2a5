"""The `prepare` stage's work for one dataset: a checked manifest from real files or the world."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from finedefics.config import WorldConfig
from finedefics.data import world
from finedefics.data.manifest import build_manifest, check_classes, check_leakage, foci_unmapped
from finedefics.data.real import REAL_DATASETS, Source, SourceImage, load_real


@dataclass
class Prepared:
    manifest: pd.DataFrame
    rejected: pd.DataFrame
    classes: dict  # the content of classes.json
    unmapped: pd.DataFrame | None  # FOCI entries without exactly one prepared test image (real data)


def is_world(source: str) -> bool:
    return source.endswith((".yaml", ".yml"))


def prepare_world(name: str, spec_file: Path, cfg: WorldConfig, seed: int, out: Path, final: Path) -> Prepared:
    """Draw the world's images into `out/images`; manifest paths point into `final`."""
    spec = world.WorldSpec.load(spec_file)
    classes = world.make_classes(spec, cfg, world.dataset_rng(seed, name, 0))
    plan = world.image_plan(spec, classes, cfg, seed, name)
    images, extra = [], {}
    for item in tqdm(plan, desc=f"draw {name}", unit="img"):
        image_id = f"images/{item.split}/{item.label:03d}_{item.index:03d}.png"
        file = out / image_id
        file.parent.mkdir(parents=True, exist_ok=True)
        image, scene = world.draw_image(spec, item, cfg, seed, name)
        image.save(file, format="PNG")
        images.append(SourceImage(item.split, image_id, item.label, image_id, item.attributes))
        extra[image_id] = {"deviation": item.deviation, "scene": json.dumps(scene, sort_keys=True)}
    source = Source(out, [c.name for c in classes], images)
    manifest, rejected = build_manifest(
        source, spec.super_category, extra, location=lambda f: str(final / f.relative_to(out))
    )
    meta = {
        "dataset": name,
        "source": "world",
        "super_category": spec.super_category,
        "plural": spec.plural,
        "class_unit": spec.class_unit,
        "attributes": {k: {"type": a.type, "values": list(a.values)} for k, a in spec.attributes.items()},
        "classes": [{"label": c.label, "name": c.name, "cluster": c.cluster, "profile": c.profile} for c in classes],
    }
    return _checked(manifest, rejected, meta, None)


def prepare_real(name: str, root: Path) -> Prepared:
    source = load_real(name, root)  # refuses unknown names and incomplete folders
    spec = REAL_DATASETS[name]
    manifest, rejected = build_manifest(source, spec.super_category)
    meta = {
        "dataset": name,
        "source": "real",
        "super_category": spec.super_category,
        "plural": spec.plural,
        "class_unit": spec.class_unit,
        "attributes": {},
        "classes": [{"label": i, "name": c} for i, c in enumerate(source.classes)],
    }
    reference = json.loads(spec.foci_file.read_text())
    return _checked(manifest, rejected, meta, foci_unmapped(manifest, reference))


def _checked(manifest: pd.DataFrame, rejected: pd.DataFrame, meta: dict, unmapped: pd.DataFrame | None) -> Prepared:
    check_leakage(manifest)
    check_classes(manifest, [c["name"] for c in meta["classes"]])
    return Prepared(manifest, rejected, meta, unmapped)


def statistics(p: Prepared) -> dict[str, float]:
    """Counts logged to MLflow and written to metrics/prepare/<name>.json."""
    m = p.manifest
    per_class = m[m.split == "train"].groupby("label").size()
    stats = {
        "classes": len(p.classes["classes"]),
        "train_images": int((m.split == "train").sum()),
        "test_images": int((m.split == "test").sum()),
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
