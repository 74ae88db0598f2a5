"""Attribute description summarisation (eq. 4), with the ablations of Tables 5 and 6c-d.

Before summarising: keys of dropped types leave (`attributes.types`), and with
`quality: noisy` a share of the values is replaced by values that images of other categories
have for the same key. The `template` backend writes deterministic sentences; `hf` and `openai`
ask an LLM with the paper's prompt. Category names are scrubbed from every description.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from tqdm import tqdm

from finedefics.artefacts import DESCRIPTIONS
from finedefics.attributes.backends import TextBackend
from finedefics.attributes.discover import AttributeKey
from finedefics.attributes.prompts import SENTENCES, SUMMARIZE
from finedefics.config import AttributesConfig
from finedefics.data.prepared import PreparedDataset

ATTRIBUTE_SENTENCES = 4  # plus the general description: five sentences, as the paper asks for


@dataclass
class Summary:
    descriptions: pd.DataFrame  # image_id, description
    stats: dict[str, float] = field(default_factory=dict)


def kept_keys(keys: list[AttributeKey], types: list[str]) -> list[AttributeKey]:
    """Keys of the kept types; `other` keys and the general description always stay."""
    return [k for k in keys if k.general or k.type == "other" or k.type in types]


def add_noise(
    values: pd.DataFrame, labels: dict[str, int], keys: list[AttributeKey], rate: float, seed: int
) -> tuple[pd.DataFrame, int]:
    """Replace a share `rate` of attribute values (not the general description) by a value that an
    image of another category has for the same key, and differs from the current one."""
    general = {k.key for k in keys if k.general}
    pool: dict[str, list[tuple[int, str]]] = {}
    for row in values.itertuples():
        if row.key not in general:
            pool.setdefault(row.key, []).append((labels[row.image_id], row.value))
    rng = np.random.default_rng([seed, 6])
    out, replaced = values.copy(), 0
    for i, row in enumerate(values.itertuples()):
        if row.key in general or rng.random() >= rate:
            continue
        candidates = sorted({v for label, v in pool[row.key] if label != labels[row.image_id] and v != row.value})
        if candidates:
            out.iat[i, out.columns.get_loc("value")] = candidates[int(rng.integers(len(candidates)))]
            replaced += 1
    return out, replaced


def _article(phrase: str) -> str:
    return "an" if phrase[:1].lower() in "aeiou" else "a"


_OPENERS = ["Its {k} is {v}", "The {k} is {v}", "This {s} has {a} {v} {k}", "It shows {a} {v} {k}"]


def template_description(
    super_category: str, general: str | None, pairs: list[tuple[str, str]], level: str, salt: int
) -> str:
    """Deterministic sentences from (key, value) pairs; `salt` picks the phrasing."""
    if level == "short":
        parts = [f"whose {k} is {v}" for k, v in pairs[:2]]
        return f"A {super_category}" + (" " + " and ".join(parts) if parts else "") + "."
    sentences = [general.rstrip(".") + "."] if general else []
    groups = [pairs[i::ATTRIBUTE_SENTENCES] for i in range(min(ATTRIBUTE_SENTENCES, len(pairs)))]
    for j, group in enumerate(groups):
        clauses = [
            _OPENERS[(salt + j + n) % len(_OPENERS)].format(k=k, v=v, s=super_category, a=_article(v))
            if n == 0
            else f"its {k} is {v}"
            for n, (k, v) in enumerate(group)
        ]
        sentences.append(", and ".join(clauses) + ".")
    return " ".join(s[0].upper() + s[1:] for s in sentences)


def llm_prompt(super_category: str, general: str | None, pairs: list[tuple[str, str]], level: str) -> str:
    attributes = "\n".join(f"- {k}: {v}" for k, v in pairs) or "- (none)"
    return SUMMARIZE.format(
        general=general or "(none)", attributes=attributes, super_category=super_category, sentences=SENTENCES[level]
    )


def name_pattern(names: list[str]) -> re.Pattern:
    """Any category name, case-insensitive, with spaces, underscores and hyphens interchangeable."""
    variants = sorted({n for n in names if n.strip()}, key=len, reverse=True)
    parts = [r"[\s_\-]+".join(re.escape(w) for w in re.split(r"[\s_\-]+", n.strip())) for n in variants]
    return re.compile(r"(?<!\w)(?:" + "|".join(parts) + r")(?!\w)", re.IGNORECASE)


def scrub(text: str, pattern: re.Pattern, super_category: str) -> tuple[str, int]:
    return pattern.subn(f"this {super_category}", text)


def summarize(
    values: pd.DataFrame,
    dataset: PreparedDataset,
    keys: list[AttributeKey],
    cfg: AttributesConfig,
    seed: int,
    backend: TextBackend | None,
) -> Summary:
    """A description per train image with values; `backend` None uses the template."""
    super_category = dataset.super_category
    kept = kept_keys(keys, cfg.types)
    order = {k.key: i for i, k in enumerate(kept)}
    general_key = next((k.key for k in kept if k.general), None)
    train = dataset.train
    labels = dict(zip(train.image_id, train.label))
    values = values[values.key.isin(order) & values.image_id.isin(labels)]
    replaced = 0
    if cfg.quality == "noisy":
        values, replaced = add_noise(values, labels, kept, cfg.noise_rate, seed)
    by_image = {i: g for i, g in values.groupby("image_id", sort=False)}
    image_ids = [i for i in train.image_id if i in by_image]
    inputs = []
    for image_id in image_ids:
        rows = sorted(by_image[image_id].itertuples(), key=lambda r: order[r.key])
        general = next((r.value for r in rows if r.key == general_key), None)
        inputs.append((general, [(r.key, r.value) for r in rows if r.key != general_key]))
    if backend is None:
        texts = [
            template_description(super_category, g, p, cfg.level, zlib.crc32(i.encode()) + seed)
            for i, (g, p) in zip(image_ids, inputs)
        ]
    else:
        prompts = [llm_prompt(super_category, g, p, cfg.level) for g, p in inputs]
        size = cfg.summarize.batch_size
        texts = []
        for start in tqdm(range(0, len(prompts), size), desc=f"summarize {dataset.name}", unit="batch"):
            texts += backend.complete(prompts[start : start + size])
    pattern = name_pattern(dataset.names)
    scrubbed, descriptions = 0, []
    for text in texts:
        clean, n = scrub(text, pattern, super_category)
        scrubbed += n
        descriptions.append(clean)
    frame = pd.DataFrame({"image_id": image_ids, "description": descriptions}, columns=list(DESCRIPTIONS.columns))
    words = frame.description.str.split().str.len()
    stats = {
        "descriptions": len(frame),
        "train_images_without_values": len(train) - len(frame),
        "keys_kept": len(kept),
        "names_scrubbed": scrubbed,
        "values_replaced": replaced,
        "mean_words": float(words.mean()) if len(frame) else 0.0,
    }
    return Summary(frame, stats)
