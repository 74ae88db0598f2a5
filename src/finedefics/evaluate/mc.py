"""FOCI multiple-choice evaluation: every test image with its option set, batched greedy decoding,
and the results file in FOCI's format (`metrics`, `predictions`, `config`)."""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from finedefics.models.mllm import MLLM
from finedefics.protocol import LETTERS, mc_question, open_question, parse_choice, query

UNREADABLE = "<unreadable image>"


@dataclass(frozen=True)
class Item:
    image: str  # FOCI key
    path: str  # the file
    groundtruth: str
    options: list[str]  # in the order shown, after the seeded shuffle


def items(options: dict[str, list[dict]], paths: dict[str, str], classes: list[str], seed: int) -> list[Item]:
    """The option sets in a fixed order, each shuffled by a permutation seeded per image. An
    option naming a class the dataset lacks is an error (a wrong option file)."""
    known = set(classes)
    out = []
    for cls in sorted(options):
        for e in options[cls]:
            unknown = [o for o in e["options"] if o not in known]
            if unknown:
                raise ValueError(
                    f"option file: {e['image']} offers {unknown[0]!r}, which is not a class of this dataset"
                )
            rng = np.random.default_rng([seed, zlib.crc32(e["image"].encode())])
            shown = [e["options"][i] for i in rng.permutation(len(e["options"]))]
            out.append(Item(e["image"], paths.get(e["image"], ""), e["groundtruth"], shown))
    return out


def open_image(path: str) -> Image.Image | None:
    try:
        with Image.open(Path(path)) as im:
            return im.convert("RGB")
    except (OSError, ValueError):
        return None


def _answers(
    mllm: MLLM, questions: list[str], paths: list[str], batch_size: int, max_new_tokens: int, desc: str
) -> list[str | None]:
    """Greedy answers, batched with left padding; None where the image cannot be read."""
    out: list[str | None] = []
    for start in tqdm(range(0, len(paths), batch_size), desc=desc, unit="batch"):
        images = [open_image(p) for p in paths[start : start + batch_size]]
        ok = [i for i, im in enumerate(images) if im is not None]
        chunk: list[str | None] = [None] * len(images)
        if ok:
            prompts = [mllm.prompt(questions[start + i]) for i in ok]
            for i, text in zip(ok, mllm.generate(prompts, [images[i] for i in ok], max_new_tokens)):
                chunk[i] = text
        out += chunk
    return out


def evaluate(
    mllm: MLLM, plural: str, entries: list[Item], batch_size: int = 32, max_new_tokens: int = 5, desc: str = "evaluate"
) -> list[dict]:
    """One prediction per entry in FOCI's results format; unreadable images count as failures."""
    question = query(plural)
    raw = _answers(
        mllm,
        [mc_question(question, e.options) for e in entries],
        [e.path for e in entries],
        batch_size,
        max_new_tokens,
        desc,
    )
    results = []
    for e, text in zip(entries, raw):
        letter = parse_choice(text, len(e.options)) if text is not None else None
        predicted = e.options[LETTERS.index(letter)] if letter else None
        results.append(
            {
                "image": e.image,
                "predicted": predicted,
                "predicted_raw": UNREADABLE if text is None else text,
                "correct": predicted == e.groundtruth,
                "options": e.options,
                "groundtruth": e.groundtruth,
            }
        )
    return results


def normalise(name: str) -> str:
    """Lower case, punctuation and underscores as spaces, single spaces."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", name.lower()).split())


def open_set(
    mllm: MLLM, super_category: str, paths: list[str], truths: list[str], batch_size: int = 32, max_new_tokens: int = 12
) -> list[dict]:
    """Open-set recognition: the generated name against the class name, normalised."""
    raw = _answers(mllm, [open_question(super_category)] * len(paths), paths, batch_size, max_new_tokens, "open-set")
    return [
        {
            "predicted_raw": UNREADABLE if t is None else t,
            "groundtruth": g,
            "correct": t is not None and normalise(t) == normalise(g),
        }
        for t, g in zip(raw, truths)
    ]


def score(predictions: list[dict]) -> dict[str, float]:
    """Accuracy and generation-failure rate of FOCI-format predictions (each with `predicted`, a
    string or None, and `correct`, a bool); anything else is a ValueError naming the entry."""
    if not isinstance(predictions, list):
        raise ValueError(f"expected a list of predictions, got {_kind(predictions)}")
    n = len(predictions)
    if n == 0:
        raise ValueError("no predictions to score")
    for k, p in enumerate(predictions):
        if not isinstance(p, dict) or not isinstance(p.get("correct"), bool) or not _is_prediction(p):
            raise ValueError(
                f"prediction {k}: expected an object with 'predicted' (a string or null) and 'correct' "
                f"(true or false), got {_kind(p)}"
            )
    return {
        "accuracy": sum(p["correct"] for p in predictions) / n,
        "failure_rate": sum(p["predicted"] is None for p in predictions) / n,
        "n": n,
    }


def score_results(data: object) -> dict[str, float]:
    """`score` of a FOCI results file's parsed JSON: an object with `predictions` (FOCI's
    `metrics` and `config` beside it are ignored) or the list itself. Where an entry stores its
    `groundtruth`, `correct` is recomputed from it rather than taken from the stored flag."""
    predictions = data.get("predictions") if isinstance(data, dict) else data
    if not isinstance(predictions, list):
        raise ValueError(f"expected an object with a list 'predictions' (or that list), got {_kind(data)}")
    recomputed = []
    for k, p in enumerate(predictions):
        if isinstance(p, dict) and "groundtruth" in p:
            if not isinstance(p["groundtruth"], str) or not _is_prediction(p):
                raise ValueError(
                    f"prediction {k}: expected 'predicted' (a string or null) and 'groundtruth' (a string), "
                    f"got {_kind(p)}"
                )
            p = p | {"correct": p["predicted"] == p["groundtruth"]}
        recomputed.append(p)
    return score(recomputed)


def _is_prediction(p: dict) -> bool:
    return "predicted" in p and (p["predicted"] is None or isinstance(p["predicted"], str))


def _kind(value: object, limit: int = 80) -> str:
    """A JSON value as an error message shows it: its type, and the value cut short."""
    kind = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )
    text = json.dumps(value, default=str)
    return f"{kind} {text if len(text) <= limit else text[:limit] + '...'}" if value is not None else kind
