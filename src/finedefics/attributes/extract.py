"""Visual attribute extraction (eq. 3): one answer per train image and attribute key, resumable.

Work is split into units: an image (per-sample and ground-truth construction) or a class
(tag-based construction: values from the category name, given to every image of the class).
Answers are written in shards under a resume folder named by a fingerprint of everything that
decides them, so a run killed at any moment continues where it stopped and ends with the same
output as an uninterrupted run. Items whose request failed are recorded, counted and asked again
on the next run, alone (not the other keys of their image); the stage fails, keeping its shards,
once failures exceed the allowed rate.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image
from tqdm import tqdm

from finedefics.artefacts import VALUES
from finedefics.attributes.backends import BackendError, VQABackend
from finedefics.attributes.discover import AttributeKey
from finedefics.attributes.prompts import EXTRACT, EXTRACT_GENERAL, EXTRACT_TAG, EXTRACT_TAG_GENERAL
from finedefics.config import ExtractConfig
from finedefics.data.prepared import PreparedDataset
from finedefics.io import atomic_path

SHARD_COLUMNS = ["unit", "key", "value", "error"]


class TooManyFailures(RuntimeError):
    """More items failed than `max_failure_rate` allows; the shards written so far are kept.
    `failures` (unit, key, error) lists every failed item, for the stage's failures.csv."""

    def __init__(self, message: str, failures: pd.DataFrame):
        super().__init__(message)
        self.failures = failures


@dataclass
class Unit:
    """What one batch of questions is about: an image, or a class (tag-based)."""

    id: str
    images: list[str]  # image_ids that receive the unit's answers
    # the answers to the keys at the given positions: per key an answer, a failure, or None (no ground truth)
    ask: Callable[[list[int]], list[str | BackendError | None]]


@dataclass
class Extraction:
    values: pd.DataFrame  # image_id, key, value
    failures: pd.DataFrame  # unit, key, error
    stats: dict[str, float] = field(default_factory=dict)


def questions(keys: list[AttributeKey], super_category: str, category: str | None = None) -> list[str]:
    """The VQA prompt per key (tag-based prompts name the class and carry no image)."""
    if category is None:
        return [
            EXTRACT_GENERAL if k.general else EXTRACT.format(attribute=k.key, super_category=super_category)
            for k in keys
        ]
    return [
        EXTRACT_TAG_GENERAL.format(super_category=super_category, category=category)
        if k.general
        else EXTRACT_TAG.format(attribute=k.key, super_category=super_category, category=category)
        for k in keys
    ]


def scene_sentence(super_category: str, scene: dict[str, str]) -> str:
    return f"A {super_category} facing {scene['facing']} on a {scene['background']} background with {scene['clutter']}."


def _lookup(truth: dict[str, str], key: str) -> str | None:
    lowered = {k.lower(): v for k, v in truth.items()}
    return lowered.get(key.lower())


def oracle_answers(
    keys: list[AttributeKey], super_category: str, attributes: dict[str, str], scene: dict[str, str] | None
) -> list[str | None]:
    """Ground truth per key; None where the source has none (an LLM-discovered key it lacks)."""
    out: list[str | None] = []
    for k in keys:
        if k.general:
            out.append(scene_sentence(super_category, scene) if scene else None)
        else:
            out.append(_lookup(attributes, k.key))
    return out


def class_truth(dataset: PreparedDataset) -> dict[int, dict[str, str]]:
    """Class-level ground truth: the world's profiles, else each key's most common train value."""
    profiles = {c.label: c.profile for c in dataset.categories if c.profile is not None}
    if profiles:
        return profiles
    truth: dict[int, dict[str, str]] = {}
    for label, rows in dataset.train.groupby("label"):
        counts: dict[str, Counter] = {}
        for attrs in rows.attributes:
            for k, v in (json.loads(attrs) if attrs else {}).items():
                counts.setdefault(k, Counter())[v] += 1
        truth[int(label)] = {k: c.most_common(1)[0][0] for k, c in counts.items()}
    return truth


def has_ground_truth(manifest: pd.DataFrame) -> bool:
    return bool((manifest.attributes != "").any())


def plan_units(
    dataset: PreparedDataset, keys: list[AttributeKey], construction: str, backend: VQABackend | None
) -> list[Unit]:
    """The units of work for a construction mode; `backend` None means the oracle."""
    super_category, train = dataset.super_category, dataset.train
    if construction == "tag-based":
        truth = class_truth(dataset) if backend is None else {}
        units = []
        for c in dataset.categories:
            images = list(train.loc[train.label == c.label, "image_id"])
            if backend is None:
                ask = lambda idx, t=truth.get(c.label, {}): _at(oracle_answers(keys, super_category, t, None), idx)  # noqa: E731
            else:
                ask = lambda idx, qs=questions(keys, super_category, c.name): backend.answer_text(_at(qs, idx))  # noqa: E731
            units.append(Unit(f"class:{c.label}", images, ask))
        return units
    asked = questions(keys, super_category)
    units = []
    for row in train.itertuples():
        if backend is None:
            attrs = json.loads(row.attributes) if row.attributes else {}
            scene = json.loads(row.scene) if row.scene else None
            ask = lambda idx, a=attrs, s=scene: _at(oracle_answers(keys, super_category, a, s), idx)  # noqa: E731
        else:
            ask = lambda idx, path=row.path: backend.answer(Image.open(path).convert("RGB"), _at(asked, idx))  # noqa: E731
        units.append(Unit(row.image_id, [row.image_id], ask))
    return units


def _at(items: list, positions: list[int]) -> list:
    return [items[i] for i in positions]


def fingerprint(
    train: pd.DataFrame, keys: list[AttributeKey], construction: str, cfg: ExtractConfig, oracle: bool
) -> str:
    """A hash of everything that decides the answers (not of how they are batched or sharded)."""
    decisive = {
        "images": list(zip(train.image_id, train.sha1)),
        "keys": [k.to_dict() for k in keys],
        "construction": construction,
        "backend": "oracle"
        if oracle
        else cfg.model_dump(exclude={"shard_size", "concurrency", "max_failure_rate", "retries", "timeout_s"}),
        "prompts": [EXTRACT, EXTRACT_GENERAL, EXTRACT_TAG, EXTRACT_TAG_GENERAL],
    }
    return hashlib.sha1(json.dumps(decisive, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _load_shards(folder: Path) -> tuple[dict[str, dict[str, tuple[str, str]]], int]:
    answers: dict[str, dict[str, tuple[str, str]]] = {}
    shards = sorted(folder.glob("shard-*.parquet"))
    for shard in shards:
        for row in pd.read_parquet(shard).itertuples():
            answers.setdefault(row.unit, {})[row.key] = (row.value, row.error)
    return answers, len(shards)


FAILURE_COLUMNS = ["unit", "key", "error"]


def failed_items(units: list[Unit], names: list[str], answers: dict) -> pd.DataFrame:
    """unit, key, error of every item whose latest answer is a failure, in unit and key order."""
    rows = [
        {"unit": u.id, "key": k, "error": answers[u.id][k][1]}
        for u in units
        for k in names
        if k in answers.get(u.id, {}) and answers[u.id][k][1]
    ]
    return pd.DataFrame(rows, columns=FAILURE_COLUMNS)


def run_units(
    units: list[Unit], keys: list[AttributeKey], folder: Path, cfg: ExtractConfig, desc: str
) -> tuple[dict, dict]:
    """Answer every unit's questions, resuming from and appending to the shards in `folder`.
    Whatever ends the run (an exception, Ctrl-C), the answers received so far are written first."""
    folder.mkdir(parents=True, exist_ok=True)
    answers, next_shard = _load_shards(folder)
    names = [k.key for k in keys]
    failed = sum(1 for got in answers.values() for _, err in got.values() if err)

    def pending(unit_id: str) -> list[int]:
        """The positions of the keys the unit has no answer to yet (never asked, or failed)."""
        got = answers.get(unit_id, {})
        return [i for i, k in enumerate(names) if k not in got or got[k][1]]

    total = len(units) * len(names)
    resumed = total - sum(len(pending(u.id)) for u in units)
    budget = cfg.max_failure_rate * total
    buffer: list[dict] = []

    def flush() -> None:
        nonlocal next_shard, buffer
        if buffer:
            with atomic_path(folder / f"shard-{next_shard:06d}.parquet") as tmp:
                pd.DataFrame(buffer, columns=SHARD_COLUMNS).to_parquet(tmp, index=False)
            next_shard += 1
            buffer = []

    started = time.time()
    bar = tqdm(total=total, initial=resumed, desc=desc, unit="item", smoothing=0.1)
    units_in_buffer = 0
    try:
        for unit in units:
            todo = pending(unit.id)
            if not todo:
                continue
            got = answers.setdefault(unit.id, {})
            for key, result in zip(_at(names, todo), unit.ask(todo)):
                if result is None:
                    value, error = None, ""
                elif isinstance(result, BaseException):
                    value, error = "", str(result) or type(result).__name__
                else:
                    value, error = result, ""
                failed += bool(error) - bool(got.get(key, ("", ""))[1])
                got[key] = (value, error)
                buffer.append({"unit": unit.id, "key": key, "value": value, "error": error})
            bar.update(len(todo))
            units_in_buffer += 1
            if units_in_buffer >= cfg.shard_size:
                flush()
                units_in_buffer = 0
            if failed > budget:
                failures = failed_items(units, names, answers)
                common = Counter(failures.error).most_common(1)
                why = f"most often ({common[0][1]} of {len(failures)}): {common[0][0]}; " if common else ""
                raise TooManyFailures(
                    f"{failed} of {total} answers failed (more than {cfg.max_failure_rate:.0%}); {why}"
                    f"the answers so far are kept in {folder}; fix the backend and run again to continue",
                    failures,
                )
    finally:  # the answers received reach disk before the exception goes on
        flush()
        bar.close()
    elapsed = time.time() - started
    computed = total - resumed
    stats = {
        "resumed_items": resumed,
        "computed_items": computed,
        "seconds": elapsed,
        "items_per_s": computed / elapsed if elapsed > 0 else 0.0,
    }
    return answers, stats


def extract(
    dataset: PreparedDataset,
    keys: list[AttributeKey],
    construction: str,
    cfg: ExtractConfig,
    backend: VQABackend | None,
    resume_root: Path,
) -> Extraction:
    """Values per train image and key; `backend` None answers with the ground truth."""
    if backend is None and not has_ground_truth(dataset.images):
        raise ValueError(
            f"{dataset.name}: no ground-truth attributes for the oracle "
            f"({'construction ground-truth' if construction == 'ground-truth' else 'backend oracle'}); "
            "only the world and bird-200 (CUB) have them"
        )
    units = plan_units(dataset, keys, construction, backend)
    folder = resume_root / fingerprint(dataset.train, keys, construction, cfg, backend is None)
    answers, stats = run_units(units, keys, folder, cfg, desc=f"extract {dataset.name}")
    rows, missing = [], 0
    for unit in units:
        for key in (k.key for k in keys):
            value, error = answers[unit.id][key]
            if error:
                continue  # listed by failed_items
            if value is None:
                missing += 1
            else:
                rows.extend({"image_id": i, "key": key, "value": value} for i in unit.images)
    failures = failed_items(units, [k.key for k in keys], answers)
    n_items = len(units) * len(keys)
    stats.update(
        {
            "units": len(units),
            "n_keys": len(keys),  # not `keys` / `values`: DVC's metrics table has attributes of those names
            "n_values": len(rows),
            "failed_items": len(failures),
            "failure_rate": len(failures) / n_items if n_items else 0.0,
            "items_without_ground_truth": missing,
        }
    )
    values = pd.DataFrame(rows, columns=list(VALUES.columns))
    return Extraction(values, failures, stats)
