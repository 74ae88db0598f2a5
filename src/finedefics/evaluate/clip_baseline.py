"""The CLIP baseline of Table 2: each test image's FOCI options scored by CLIP image-text similarity,
the most similar option chosen, written in FOCI's results format like the MLLM evaluations.

A CLIP that mined the options scores them with a bias: they are its own hardest wrong classes, so
its 4-way accuracy equals its top-1 over every class (when it mined with the same prompt). The stage
also scores a CLIP that did not pick them (`model.clip_baseline`), as FOCI's published baselines do.
"""

from __future__ import annotations

import numpy as np

from finedefics.evaluate.mc import FAILURE, UNREADABLE, Item, open_image
from finedefics.models.clip import Clip, class_prompt
from finedefics.protocol import LETTERS


def choose(clip: Clip, entries: list[Item], template: str) -> list[dict]:
    """One FOCI prediction per entry: the option whose class prompt (`template`, model.clip_prompt)
    is most similar to the image; `predicted_raw` its letter, `similarities` the options' cosines
    in the order shown. An unreadable image is a generation failure."""
    paths = sorted({e.path for e in entries})
    readable = [p for p in paths if open_image(p) is not None]
    images = dict(zip(readable, clip.embed_images(readable, desc="CLIP images"))) if readable else {}
    names = sorted({o for e in entries for o in e.options})
    texts = dict(zip(names, clip.embed_texts([class_prompt(n, template) for n in names])))
    out = []
    for e in entries:
        prediction = {"image": e.image, "correct": e.groundtruth, "options": e.options, "permutation": e.permutation}
        if e.path not in images:
            out.append({**prediction, "predicted": FAILURE + UNREADABLE, "predicted_raw": UNREADABLE})
            continue
        sims = np.array([float(images[e.path] @ texts[o]) for o in e.options])
        best = int(sims.argmax())
        out.append(
            {
                **prediction,
                "predicted": e.options[best],
                "predicted_raw": LETTERS[best],
                "similarities": sims.round(6).tolist(),
            }
        )
    return out
