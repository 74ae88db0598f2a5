"""Hard-negative mining with CLIP (paper §3.2) and the evaluation option sets (FOCI format).

For each train image: `hard` takes the 3 wrong classes whose text embedding is most similar to
the image's, `simple` 3 wrong classes drawn uniformly at random, `none` none; for each negative
class, the train image of that class most similar to the anchor image and its description.
Whatever the strategy, the 3 most similar wrong classes are also kept as the multiple-choice
distractors of Stage II. Test images get FOCI option sets: the ground truth, then its 3 most
similar wrong classes.

Train images without a description (their attribute extraction failed, below the allowed
failure rate, so `summarize` wrote none) are handled so that Stage I never aligns through an
empty text: they stay anchors here (Stage II needs only their class name; `build_instructions`
leaves them out of Stage I), but never serve as a negative image while their class has a
described one, and a class with no described train image is not picked as a `hard` or `simple`
negative (the next most similar, or another random, class is) as long as each image keeps 3
wrong classes with a described image. Only when fewer than 3 such classes exist does a negative
carry an empty description; `description_coverage` counts all three cases for the metrics.
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


def random_wrong(
    labels: np.ndarray,
    n_classes: int,
    rng: np.random.Generator,
    k: int = K,
    allowed: np.ndarray | None = None,
    among: np.ndarray | None = None,
) -> np.ndarray:
    """k distinct wrong classes per row, uniformly at random, never outside `among` (a mask); among
    the `allowed` classes (a mask) for a row where at least k of them are wrong classes."""
    out = np.empty((len(labels), k), dtype=np.int64)
    for i, label in enumerate(labels):
        candidates = np.delete(np.arange(n_classes), label)
        if among is not None:
            candidates = candidates[among[candidates]]
        if allowed is not None and allowed[candidates].sum() >= k:
            candidates = candidates[allowed[candidates]]
        out[i] = rng.choice(candidates, size=k, replace=False)
    return out


def _only_allowed(similarity: np.ndarray, labels: np.ndarray, allowed: np.ndarray, k: int = K) -> np.ndarray:
    """`similarity` with the classes not `allowed` at -inf, in each row where k allowed wrong classes remain."""
    if allowed.all():
        return similarity
    enough = allowed.sum() - allowed[labels] >= k
    masked = similarity.astype(np.float64).copy()
    masked[np.ix_(enough, ~allowed)] = -np.inf
    return masked


def mine(
    train: pd.DataFrame,
    names: list[str],
    descriptions: dict[str, str],
    emb: Embeddings,
    strategy: str,
    seed: int,
    unseen: list[int] | None = None,
) -> pd.DataFrame:
    """Negatives per train image, as the `negatives` strategy says, plus the MC distractors. The
    `unseen` classes (`world.unseen`) are left out: none of their images is an anchor or a
    negative, and neither their names nor their descriptions are negatives or distractors."""
    seen = np.ones(len(names), dtype=bool)
    seen[list(unseen or [])] = False
    if seen.sum() <= K:
        raise ValueError(
            f"mining needs more than {K} seen classes ({K} negatives per image, 4-way multiple choice), got {int(seen.sum())}"
        )
    train = train[seen[train.label.to_numpy()]]
    labels = train.label.to_numpy()
    images = emb.rows(train.image_id)
    similarity = images @ emb.classes.T
    similarity = _only_allowed(similarity, labels, seen)  # seen >= K + 1: every row keeps K wrong classes
    distractors = top_wrong(similarity, labels)
    ids = train.image_id.to_numpy()
    described = np.array([i in descriptions for i in ids], dtype=bool)
    has_description = np.zeros(len(names), dtype=bool)  # classes with a described train image
    has_description[labels[described]] = True
    if strategy == "hard":
        negative_labels = top_wrong(_only_allowed(similarity, labels, has_description), labels)
    elif strategy == "simple":
        negative_labels = random_wrong(
            labels, len(names), np.random.default_rng([seed, 5]), allowed=has_description, among=seen
        )
    elif strategy == "none":
        negative_labels = np.zeros((len(labels), 0), dtype=np.int64)
    else:
        raise ValueError(f"negatives = {strategy!r}; allowed: hard, simple, none")
    rows = []
    for a in range(len(ids)):
        picks = []
        for neg in negative_labels[a]:
            pool = np.flatnonzero((labels == neg) & described)
            if len(pool) == 0:
                pool = np.flatnonzero(labels == neg)
            picks.append(ids[pool[np.argmax(images[pool] @ images[a])]])
        rows.append(
            {
                "image_id": ids[a],
                "label": int(labels[a]),
                "negative_labels": [int(n) for n in negative_labels[a]],
                "negative_categories": [names[n] for n in negative_labels[a]],
                "negative_image_ids": picks,
                "negative_descriptions": [descriptions.get(p, "") for p in picks],
                "distractors": [int(d) for d in distractors[a]],
                "distractor_categories": [names[d] for d in distractors[a]],
            }
        )
    return pd.DataFrame(rows, columns=list(NEGATIVES.columns))


def description_coverage(train: pd.DataFrame, descriptions: dict[str, str], mined: pd.DataFrame) -> dict[str, int]:
    """What `mine` did with the train images without a description, for metrics/mine/<name>.json."""
    described = set(descriptions)
    labels = set(train.label[train.image_id.isin(described)])
    return {
        "train_images_without_description": int((~train.image_id.isin(described)).sum()),
        "classes_without_description": int(train.label.nunique() - len(labels)),
        "negatives_without_description": int(sum(d == "" for ds in mined.negative_descriptions for d in ds)),
    }


def eval_options(test: pd.DataFrame, names: list[str], emb: Embeddings) -> dict[str, list[dict]]:
    """FOCI-format option sets: {class: [{image, options: [gt, n1, n2, n3], groundtruth}]}."""
    labels = test.label.to_numpy()
    wrong = top_wrong(emb.rows(test.image_id) @ emb.classes.T, labels)
    options: dict[str, list[dict]] = {}
    for key, label, negs in zip(test.foci_key, labels, wrong):
        gt = names[label]
        options.setdefault(gt, []).append({"image": key, "options": [gt, *(names[n] for n in negs)], "groundtruth": gt})
    return options


def prepared_options(reference: dict[str, list[dict]], keys: set[str]) -> dict[str, list[dict]]:
    """FOCI's published option sets of the test images this dataset holds (`keys`: their FOCI keys). The
    entries of other images, which `prepare` reports as unmapped (foci_unmapped.csv), are left out: they
    have no image to evaluate, and they may name classes a partial dataset lacks."""
    kept = {cls: [e for e in entries if e["image"] in keys] for cls, entries in reference.items()}
    return {cls: entries for cls, entries in kept.items() if entries}


def check_options(options: dict[str, list[dict]], names: list[str], partial: bool = False) -> int:
    """Every entry has 4 distinct options, ground truth first, equal to its key and a class of the
    dataset; so are the other options unless `partial` (a real dataset of which only some classes are
    here: FOCI's distractors may be others). Returns how many entries name a class the dataset lacks."""
    known = set(names)
    naming_absent = 0
    for cls, entries in options.items():
        for e in entries:
            opts = e["options"]
            if e["groundtruth"] != cls or opts[0] != cls or len(opts) != K + 1 or len(set(opts)) != len(opts):
                raise ValueError(f"bad option set for {e['image']}: {opts} (ground truth {e['groundtruth']!r})")
            unknown = [o for o in opts if o not in known]
            if unknown and (not partial or cls in unknown):
                raise ValueError(f"option set for {e['image']} names classes the dataset lacks: {unknown}")
            naming_absent += bool(unknown)
    return naming_absent
