import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import chisquare

from finedefics.mining import Embeddings, check_options, eval_options, mine, random_wrong, top_wrong


def toy(n_classes=8, per_class=10, dim=16, seed=0):
    """Random embeddings and a manifest: train and test images of n_classes classes."""
    rng = np.random.default_rng(seed)
    rows = [
        {"image_id": f"{s}/{c}_{i}", "label": c, "split": s, "foci_key": f"images/{s}/{c}_{i}.png"}
        for s in ("train", "test")
        for c in range(n_classes)
        for i in range(per_class)
    ]
    manifest = pd.DataFrame(rows)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    emb = Embeddings(
        list(manifest.image_id), unit(rng.normal(size=(len(manifest), dim))), unit(rng.normal(size=(n_classes, dim)))
    )
    names = [f"class {c}" for c in range(n_classes)]
    descriptions = {i: f"description of {i}" for i in manifest.image_id}
    return manifest, names, descriptions, emb


@pytest.mark.parametrize("strategy", ["hard", "simple"])
def test_negatives_are_never_the_positive_and_carry_their_image(strategy):
    manifest, names, descriptions, emb = toy()
    train = manifest[manifest.split == "train"]
    out = mine(train, names, descriptions, emb, strategy, seed=0)
    labels = dict(zip(manifest.image_id, manifest.label))
    for row in out.itertuples():
        assert row.label not in row.negatives and len(set(row.negatives)) == 3
        assert row.label not in row.distractors and len(set(row.distractors)) == 3
        assert [labels[i] for i in row.negative_image_ids] == list(row.negatives)
        assert row.negative_descriptions == [descriptions[i] for i in row.negative_image_ids]
        assert row.negative_categories == [names[n] for n in row.negatives]
        anchor = emb.rows([row.image_id])[0]
        for neg, pick in zip(row.negatives, row.negative_image_ids):  # the most similar image of the class
            pool = train[train.label == neg].image_id
            assert pick == max(pool, key=lambda i: float(emb.rows([i])[0] @ anchor))


def test_hard_top_k_equals_a_brute_force_ranking():
    manifest, names, descriptions, emb = toy(n_classes=12)
    train = manifest[manifest.split == "train"]
    out = mine(train, names, descriptions, emb, "hard", seed=0)
    for row in out.itertuples():
        sims = emb.rows([row.image_id])[0] @ emb.classes.T
        ranked = sorted((c for c in range(len(names)) if c != row.label), key=lambda c: -sims[c])
        assert list(row.negatives) == ranked[:3] == list(row.distractors)


def test_top_wrong_breaks_ties_by_class_index():
    sims = np.array([[0.5, 0.5, 0.5, 0.5, 0.9]])
    assert top_wrong(sims, np.array([4])).tolist() == [[0, 1, 2]]


def test_simple_negatives_are_uniform_over_wrong_classes():
    labels = np.zeros(6000, dtype=int)
    picks = random_wrong(labels, 7, np.random.default_rng(123))
    counts = np.bincount(picks.ravel(), minlength=7)
    assert counts[0] == 0
    assert chisquare(counts[1:]).pvalue > 0.01
    assert all(len(set(p)) == 3 for p in picks[:100])


def test_mining_is_deterministic_by_seed_and_none_takes_none():
    manifest, names, descriptions, emb = toy()
    train = manifest[manifest.split == "train"]
    a = mine(train, names, descriptions, emb, "simple", seed=3)
    b = mine(train, names, descriptions, emb, "simple", seed=3)
    c = mine(train, names, descriptions, emb, "simple", seed=4)
    pd.testing.assert_frame_equal(a, b)
    assert not a.negatives.equals(c.negatives)
    none = mine(train, names, descriptions, emb, "none", seed=3)
    assert none.negatives.str.len().eq(0).all() and none.distractors.str.len().eq(3).all()
    assert none.distractors.tolist() == a.distractors.tolist()  # distractors do not depend on `negatives`


def test_option_sets_are_valid_complete_and_ranked():
    manifest, names, descriptions, emb = toy(n_classes=10)
    test = manifest[manifest.split == "test"]
    options = eval_options(test, names, emb)
    check_options(options, names)
    entries = [e for v in options.values() for e in v]
    assert sorted(e["image"] for e in entries) == sorted(test.foci_key)
    key_to_id = dict(zip(test.foci_key, test.image_id))
    for e in entries:
        label = names.index(e["groundtruth"])
        sims = emb.rows([key_to_id[e["image"]]])[0] @ emb.classes.T
        ranked = sorted((c for c in range(len(names)) if c != label), key=lambda c: -sims[c])
        assert e["options"] == [e["groundtruth"], *(names[c] for c in ranked[:3])]
    json.dumps(options)  # serialisable as the FOCI file


def test_bad_option_sets_are_refused():
    names = ["a", "b", "c", "d", "e"]
    with pytest.raises(ValueError, match="names classes the dataset lacks"):
        check_options({"a": [{"image": "x", "options": ["a", "b", "c", "zz"], "groundtruth": "a"}]}, names)
    with pytest.raises(ValueError, match="bad option set"):
        check_options({"a": [{"image": "x", "options": ["b", "a", "c", "d"], "groundtruth": "a"}]}, names)


def test_the_published_foci_sets_are_valid(tmp_path):
    from finedefics.data.real import REAL_DATASETS

    for spec in REAL_DATASETS.values():
        options = json.loads(spec.foci_file.read_text())
        check_options(
            options,
            list(options) + sorted({o for v in options.values() for e in v for o in e["options"]} - set(options)),
        )
