"""Hard-negative mining with CLIP (paper §3.2) and the evaluation option sets (FOCI format).

For each train image: `hard` takes the 3 wrong classes whose text embedding is most similar to
the image's, `simple` 3 wrong classes drawn uniformly at random, `none` none; for each negative
class, the train image of that class most similar to the anchor image and its description.
Whatever the strategy, the 3 most similar wrong classes are also kept as the multiple-choice
distractors of Stage II. Test images get FOCI option sets: the ground truth, then its 3 most
similar wrong classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from finedefics.artefacts import NEGATIVES

K = 3


@dataclass
class Embeddings:
    """CLIP embeddings of a dataset: every image (manifest order) and every class prompt."""

    image_ids: list[str]
    images: np.ndarray  # (n_images, d), L2-normalised
    classes: np.ndarray  # (n_classes, d), L2-normalised

    def save(self, path) -> None:
        np.savez(path, image_ids=np.asarray(self.image_ids), images=self.images, classes=self.classes)

    @classmethod
    def load(cls, path) -> Embeddings:
        with np.load(path) as z:
            return cls(list(z["image_ids"]), z["images"], z["classes"])

    def rows(self, image_ids) -> np.ndarray:
        index = {i: n for n, i in enumerate(self.image_ids)}
        return self.images[[index[i] for i in image_ids]]


def top_wrong(similarity: np.ndarray, labels: np.ndarray, k: int = K) -> np.ndarray:
    """The k classes of highest similarity other than each row's label, best first (ties: lower index)."""
    masked = similarity.astype(np.float64).copy()
    masked[np.arange(len(labels)), labels] = -np.inf
    order = np.argsort(-masked, axis=1, kind="stable")
    return order[:, :k]


def random_wrong(labels: np.ndarray, n_classes: int, rng: np.random.Generator, k: int = K) -> np.ndarray:
    """k distinct wrong classes per row, uniformly at random."""
    out = np.empty((len(labels), k), dtype=np.int64)
    for i, label in enumerate(labels):
        candidates = np.delete(np.arange(n_classes), label)
        out[i] = rng.choice(candidates, size=k, replace=False)
    return out


def mine(
    train: pd.DataFrame,
    names: list[str],
    descriptions: dict[str, str],
    emb: Embeddings,
    strategy: str,
    seed: int,
) -> pd.DataFrame:
    """Negatives per train image, as the `negatives` strategy says, plus the MC distractors."""
    if len(names) <= K:
        raise ValueError(f"mining needs more than {K} classes, got {len(names)}")
    labels = train.label.to_numpy()
    images = emb.rows(train.image_id)
    distractors = top_wrong(images @ emb.classes.T, labels)
    if strategy == "hard":
        negatives = distractors
    elif strategy == "simple":
        negatives = random_wrong(labels, len(names), np.random.default_rng([seed, 5]))
    elif strategy == "none":
        negatives = np.zeros((len(labels), 0), dtype=np.int64)
    else:
        raise ValueError(f"negatives = {strategy!r}; allowed: hard, simple, none")
    ids = train.image_id.to_numpy()
    described = np.array([i in descriptions for i in ids])
    rows = []
    for a in range(len(ids)):
        picks = []
        for neg in negatives[a]:
            pool = np.flatnonzero((labels == neg) & described)
            if len(pool) == 0:
                pool = np.flatnonzero(labels == neg)
            picks.append(ids[pool[np.argmax(images[pool] @ images[a])]])
        rows.append(
            {
                "image_id": ids[a],
                "label": int(labels[a]),
                "negatives": [int(n) for n in negatives[a]],
                "negative_categories": [names[n] for n in negatives[a]],
                "negative_image_ids": picks,
                "negative_descriptions": [descriptions.get(p, "") for p in picks],
                "distractors": [int(d) for d in distractors[a]],
                "distractor_categories": [names[d] for d in distractors[a]],
            }
        )
    return pd.DataFrame(rows, columns=list(NEGATIVES.columns))


def eval_options(test: pd.DataFrame, names: list[str], emb: Embeddings) -> dict[str, list[dict]]:
    """FOCI-format option sets: {class: [{image, options: [gt, n1, n2, n3], groundtruth}]}."""
    labels = test.label.to_numpy()
    wrong = top_wrong(emb.rows(test.image_id) @ emb.classes.T, labels)
    options: dict[str, list[dict]] = {}
    for key, label, negs in zip(test.foci_key, labels, wrong):
        gt = names[label]
        options.setdefault(gt, []).append({"image": key, "options": [gt, *(names[n] for n in negs)], "groundtruth": gt})
    return options


def check_options(options: dict[str, list[dict]], names: list[str]) -> None:
    """Every entry has 4 distinct known options, ground truth first and equal to its key."""
    known = set(names)
    for cls, entries in options.items():
        for e in entries:
            opts = e["options"]
            if e["groundtruth"] != cls or opts[0] != cls or len(opts) != K + 1 or len(set(opts)) != len(opts):
                raise ValueError(f"bad option set for {e['image']}: {opts} (ground truth {e['groundtruth']!r})")
            unknown = [o for o in opts if o not in known]
            if unknown:
                raise ValueError(f"option set for {e['image']} names classes the dataset lacks: {unknown}")
