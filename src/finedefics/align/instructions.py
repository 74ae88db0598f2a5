"""Training data of both stages (paper §3.2), built from descriptions and mined negatives.

Stage I: per train image the triple (image, description, category) with its negatives'
descriptions and categories. Stage II: open-set QA ("What is the name of the {superclass} in
the image?" -> the name) and closed-set multiple choice in FOCI's format, whose options are the
ground truth and its 3 most CLIP-similar wrong classes whatever `negatives` says.
"""

from __future__ import annotations

import zlib

import numpy as np
import pandas as pd

from finedefics.evaluate.foci import LETTERS, mc_question, query, shuffled


def open_question(superclass: str) -> str:
    return f"What is the name of the {superclass} in the image?"


def describe_question(superclass: str) -> str:
    """The prompt of the attribute description generation task (L_G^att)."""
    return f"Describe this {superclass} in detail."


def stage1_frame(
    dataset: str, manifest: pd.DataFrame, classes: dict, descriptions: pd.DataFrame, negatives: pd.DataFrame
) -> pd.DataFrame:
    paths = dict(zip(manifest.image_id, manifest.path))
    text = dict(zip(descriptions.image_id, descriptions.description))
    rows = []
    for n in negatives.itertuples():
        if n.image_id not in text:
            continue  # no description (failed extraction): no attribute to align through
        rows.append(
            {
                "dataset": dataset,
                "image_id": n.image_id,
                "path": paths[n.image_id],
                "superclass": classes["super_category"],
                "category": classes["classes"][n.label]["name"],
                "description": text[n.image_id],
                "negative_categories": list(n.negative_classes),
                "negative_descriptions": list(n.negative_descriptions),
            }
        )
    return pd.DataFrame(rows)


def stage2_frame(
    dataset: str, manifest: pd.DataFrame, classes: dict, negatives: pd.DataFrame, mode: str, seed: int
) -> pd.DataFrame:
    paths = dict(zip(manifest.image_id, manifest.path))
    names = [c["name"] for c in classes["classes"]]
    superclass, question = classes["super_category"], query(classes["plural"])
    rows = []
    for n in negatives.itertuples():
        base = {"dataset": dataset, "image_id": n.image_id, "path": paths[n.image_id], "superclass": superclass}
        rows.append({**base, "kind": "open", "question": open_question(superclass), "answer": names[n.label]})
        if mode == "open+closed":
            rng = np.random.default_rng([seed, zlib.crc32(f"{dataset}/{n.image_id}".encode())])
            options = shuffled([names[n.label], *n.distractor_classes], rng)
            rows.append(
                {
                    **base,
                    "kind": "closed",
                    "question": mc_question(question, options),
                    "answer": LETTERS[options.index(names[n.label])],
                }
            )
    return pd.DataFrame(rows)
