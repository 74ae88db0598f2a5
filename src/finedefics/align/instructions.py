"""Training data of both stages (paper §3.2), built from descriptions and mined negatives.

Stage I: per train image the triple (image, description, category) with its negatives'
descriptions and categories. Stage II: open-set QA ("What is the name of the {super_category} in
the image?" -> the name) and closed-set multiple choice in FOCI's format, whose options are the
ground truth and its 3 most CLIP-similar wrong classes whatever `negatives` says.

A train image without a description (its attribute extraction failed, below the allowed failure
rate) has no attribute text to align through or to generate, so Stage I leaves it out
(`stage1_skipped` counts them; the stage logs the count); Stage II keeps it, since its questions
need only the class name. Its negatives, and the images it serves as a negative for, are as
`mine` chose them (see `finedefics.mining`).
"""

from __future__ import annotations

import zlib

import numpy as np
import pandas as pd

from finedefics.artefacts import STAGE1, STAGE2
from finedefics.data.prepared import PreparedDataset
from finedefics.protocol import LETTERS, mc_question, open_question, query, shuffled


def stage1_frame(dataset: PreparedDataset, descriptions: pd.DataFrame, mined: pd.DataFrame) -> pd.DataFrame:
    paths = dict(zip(dataset.images.image_id, dataset.images.path))
    text = dict(zip(descriptions.image_id, descriptions.description))
    rows = []
    for n in mined.itertuples():
        if n.image_id not in text:
            continue  # no description (failed extraction): no attribute to align through
        rows.append(
            {
                "dataset": dataset.name,
                "image_id": n.image_id,
                "path": paths[n.image_id],
                "super_category": dataset.super_category,
                "category": dataset.names[n.label],
                "description": text[n.image_id],
                "negative_categories": list(n.negative_categories),
                "negative_descriptions": list(n.negative_descriptions),
            }
        )
    return pd.DataFrame(rows, columns=list(STAGE1.columns))


def stage1_skipped(descriptions: pd.DataFrame, mined: pd.DataFrame) -> int:
    """Train images `stage1_frame` leaves out because they have no description."""
    return int((~mined.image_id.isin(set(descriptions.image_id))).sum())


def stage2_frame(dataset: PreparedDataset, mined: pd.DataFrame, mode: str, seed: int) -> pd.DataFrame:
    paths = dict(zip(dataset.images.image_id, dataset.images.path))
    names = dataset.names
    super_category, question = dataset.super_category, query(dataset.plural)
    rows = []
    for n in mined.itertuples():
        base = {
            "dataset": dataset.name,
            "image_id": n.image_id,
            "path": paths[n.image_id],
            "super_category": super_category,
        }
        rows.append({**base, "kind": "open", "question": open_question(super_category), "answer": names[n.label]})
        if mode == "open+closed":
            rng = np.random.default_rng([seed, zlib.crc32(f"{dataset.name}/{n.image_id}".encode())])
            options = shuffled([names[n.label], *n.distractor_categories], rng)
            rows.append(
                {
                    **base,
                    "kind": "closed",
                    "question": mc_question(question, options),
                    "answer": LETTERS[options.index(names[n.label])],
                }
            )
    return pd.DataFrame(rows, columns=list(STAGE2.columns))
