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
from finedefics.protocol import LETTERS, foci_user_text, mc_question, open_question, parse_choice, query
from finedefics.stats import wilson

UNREADABLE = "<unreadable image>"


FAILURE = "NA ### "  # FOCI's `predicted` for an answer without a letter: this, then the raw output


@dataclass(frozen=True)
class Item:
    image: str  # FOCI key
    path: str  # the file
    groundtruth: str
    options: list[str]  # in the order shown, after the seeded shuffle
    permutation: int = 0  # which of the image's seeded option orders


def items(
    options: dict[str, list[dict]],
    paths: dict[str, str],
    classes: list[str],
    seed: int,
    permutations: int = 1,
    partial: bool = False,
) -> list[Item]:
    """The option sets in a fixed order, each image's options shown in `permutations` orders, order k
    seeded by (seed, k, image). An option naming a class the dataset lacks is an error (a wrong option
    file), unless `partial` (a real dataset of which only some classes are here) and it is not the
    ground truth."""
    known = set(classes)
    out = []
    for cls in sorted(options):
        for e in options[cls]:
            unknown = [o for o in e["options"] if o not in known and (not partial or o == e["groundtruth"])]
            if unknown:
                raise ValueError(
                    f"option file: {e['image']} offers {unknown[0]!r}, which is not a class of this dataset"
                )
            for k in range(permutations):
                rng = np.random.default_rng([seed, k, zlib.crc32(e["image"].encode())])
                shown = [e["options"][i] for i in rng.permutation(len(e["options"]))]
                out.append(Item(e["image"], paths.get(e["image"], ""), e["groundtruth"], shown, k))
    return out


def open_image(path: str) -> Image.Image | None:
    try:
        with Image.open(Path(path)) as im:
            return im.convert("RGB")
    except (OSError, ValueError):
        return None


def _answers(
    mllm: MLLM,
    questions: list[str],
    paths: list[str],
    batch_size: int,
    max_new_tokens: int,
    desc: str,
    one_pass: bool = False,
) -> list[str | None]:
    """Greedy answers, batched with left padding; None where the image cannot be read. `one_pass`:
    a batch whose answers are all one token (letters) is scored in one forward pass with each image
    encoded once (`MLLM.one_token_answers`), any other batch generated: the same answers."""
    one_pass = one_pass and mllm.answers_in_one_pass and max_new_tokens > 1
    out: list[str | None] = []
    opened: dict[str, Image.Image | None] = {}
    for start in tqdm(range(0, len(paths), batch_size), desc=desc, unit="batch"):
        batch = paths[start : start + batch_size]
        opened = {p: opened[p] if p in opened else open_image(p) for p in dict.fromkeys(batch)}  # each file once
        ok = [i for i, p in enumerate(batch) if opened[p] is not None]
        chunk: list[str | None] = [None] * len(batch)
        if ok:
            prompts = [mllm.prompt(questions[start + i]) for i in ok]
            texts = None
            if one_pass:
                unique = list(dict.fromkeys(batch[i] for i in ok))
                texts = mllm.one_token_answers(
                    prompts, [opened[p] for p in unique], [unique.index(batch[i]) for i in ok]
                )
            if texts is None or None in texts:
                texts = mllm.generate(prompts, [opened[batch[i]] for i in ok], max_new_tokens)
            for i, text in zip(ok, texts):
                chunk[i] = text
        out += chunk
    return out


def evaluate(
    mllm: MLLM,
    plural: str,
    entries: list[Item],
    inner_user_prefix: bool = False,
    batch_size: int = 32,
    max_new_tokens: int = 5,
    desc: str = "evaluate",
    one_pass: bool = True,
) -> list[dict]:
    """One prediction per entry in FOCI's results format: `predicted` the chosen class name (or
    "NA ### <raw output>", a generation failure), `correct` the ground-truth class name; the
    option order's index as the extra key `permutation`. Unreadable images count as failures.
    `inner_user_prefix`: FOCI's extra "User: " for Idefics2 (`protocol.foci_user_text`). `one_pass`
    False: generate every answer (`_answers`), the reference the one-pass scoring is tested against."""
    question = query(plural)
    raw = _answers(
        mllm,
        [foci_user_text(mc_question(question, e.options), mllm.family, inner_user_prefix) for e in entries],
        [e.path for e in entries],
        batch_size,
        max_new_tokens,
        desc,
        one_pass,
    )
    results = []
    for e, text in zip(entries, raw):
        text = UNREADABLE if text is None else text
        letter = parse_choice(text, mllm.family, len(e.options)) if text != UNREADABLE else None
        results.append(
            {
                "image": e.image,
                "predicted": e.options[LETTERS.index(letter)] if letter else FAILURE + text,
                "predicted_raw": text,
                "correct": e.groundtruth,
                "options": e.options,
                "permutation": e.permutation,
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


@dataclass(frozen=True)
class Score:
    """A results file's numbers: accuracy and failure rate over its predictions, and the Wilson 95%
    interval over its `n` images (an image shown in several option orders counts once, with its
    mean)."""

    accuracy: float
    failure_rate: float
    n: int
    predictions: int
    ci_low: float
    ci_high: float


def per_image(predictions: list[dict]) -> dict[str, float]:
    """Each image's accuracy, averaged over the option orders it was shown in, in first-seen order."""
    right: dict[str, list[bool]] = {}
    for p in predictions:
        right.setdefault(p["image"], []).append(p["predicted"] == p["correct"])
    return {image: float(np.mean(r)) for image, r in right.items()}


def score(predictions: list[dict]) -> Score:
    """FOCI's accuracy (`predicted` equals `correct`, the ground-truth class name; failures count as
    wrong) and failure rate (`predicted` starting "NA ### ") of FOCI-format predictions. Anything
    else is a ValueError naming the entry."""
    if not isinstance(predictions, list):
        raise ValueError(f"expected a list of predictions, got {_kind(predictions)}")
    if not predictions:
        raise ValueError("no predictions to score")
    for k, p in enumerate(predictions):
        if not (isinstance(p, dict) and all(isinstance(p.get(key), str) for key in ("image", "predicted", "correct"))):
            raise ValueError(
                f"prediction {k}: expected an object with 'image', 'predicted' (a class name, or 'NA ### ' and "
                f"the raw output) and 'correct' (the ground-truth class name) as strings, got {_kind(p)}"
            )
    images = per_image(predictions)
    low, high = wilson(sum(images.values()), len(images))
    return Score(
        accuracy=float(np.mean([p["predicted"] == p["correct"] for p in predictions])),
        failure_rate=float(np.mean([p["predicted"].startswith(FAILURE) for p in predictions])),
        n=len(images),
        predictions=len(predictions),
        ci_low=low,
        ci_high=high,
    )


def positions(predictions: list[dict]) -> dict[str, dict[str, float]]:
    """The position-bias audit, per answer letter: the share of predictions whose ground truth sits
    there (`truth`), the share that chose it (`chosen`; failures choose none), and the accuracy
    when the ground truth sits there (`accuracy`; null where it never does). A model that always
    answers "A" shows `chosen` 1.0 at A and accuracy 1.0 at A, 0.0 elsewhere."""
    n_letters = max(len(p["options"]) for p in predictions)
    truth = np.array([p["options"].index(p["correct"]) for p in predictions])
    chosen = np.array(
        [p["options"].index(p["predicted"]) if p["predicted"] in p["options"] else -1 for p in predictions]
    )
    out = {}
    for i, letter in enumerate(LETTERS[:n_letters]):
        there = truth == i
        out[letter] = {
            "truth": float(there.mean()),
            "chosen": float((chosen == i).mean()),
            "accuracy": float((chosen[there] == i).mean()) if there.any() else None,
        }
    return out


def seen_unseen(predictions: list[dict], unseen: set[str]) -> dict[str, float]:
    """`score`'s accuracy on the test images of the classes training showed and of the `unseen` ones
    (`world.unseen`, by ground-truth name); nothing without unseen classes."""
    if not unseen:
        return {}
    return {
        f"{key}_accuracy": score([p for p in predictions if (p["correct"] in unseen) == part]).accuracy
        for key, part in (("seen", False), ("unseen", True))
    }


def score_results(data: object) -> Score:
    """`score` of a FOCI results file's parsed JSON: an object with `predictions` (and FOCI's
    `metrics` and `config` beside it) or the list itself. Only the multiple-choice task (`config.task`
    "mc", FOCI's default) is scored."""
    predictions = data.get("predictions") if isinstance(data, dict) else data
    if not isinstance(predictions, list):
        raise ValueError(f"expected an object with a list 'predictions' (or that list), got {_kind(data)}")
    config = data.get("config") if isinstance(data, dict) else None
    task = config.get("task", "mc") if isinstance(config, dict) else "mc"
    if task != "mc":
        raise ValueError(f"config.task is {task!r}: only FOCI's multiple-choice task ('mc') is scored")
    return score(predictions)


def _kind(value: object, limit: int = 80) -> str:
    """A JSON value as an error message shows it: its type, and the value cut short."""
    kind = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )
    text = json.dumps(value, default=str)
    return f"{kind} {text if len(text) <= limit else text[:limit] + '...'}" if value is not None else kind
