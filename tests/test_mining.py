import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import chisquare

from finedefics.mining import (
    Embeddings,
    check_options,
    description_coverage,
    eval_options,
    mine,
    random_wrong,
    top_wrong,
)


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
        assert row.label not in row.negative_labels and len(set(row.negative_labels)) == 3
        assert row.label not in row.distractors and len(set(row.distractors)) == 3
        assert [labels[i] for i in row.negative_image_ids] == list(row.negative_labels)
        assert row.negative_descriptions == [descriptions[i] for i in row.negative_image_ids]
        assert row.negative_categories == [names[n] for n in row.negative_labels]
        anchor = emb.rows([row.image_id])[0]
        for neg, pick in zip(row.negative_labels, row.negative_image_ids):  # the most similar image of the class
            pool = train[train.label == neg].image_id
            assert pick == max(pool, key=lambda i: float(emb.rows([i])[0] @ anchor))


def test_hard_top_k_equals_a_brute_force_ranking():
    manifest, names, descriptions, emb = toy(n_classes=12)
    train = manifest[manifest.split == "train"]
    out = mine(train, names, descriptions, emb, "hard", seed=0)
    for row in out.itertuples():
        sims = emb.rows([row.image_id])[0] @ emb.classes.T
        ranked = sorted((c for c in range(len(names)) if c != row.label), key=lambda c: -sims[c])
        assert list(row.negative_labels) == ranked[:3] == list(row.distractors)


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
    assert not a.negative_labels.equals(c.negative_labels)
    none = mine(train, names, descriptions, emb, "none", seed=3)
    assert none.negative_labels.str.len().eq(0).all() and none.distractors.str.len().eq(3).all()
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


def test_a_partial_real_dataset_may_be_offered_absent_classes_but_never_as_the_truth():
    names = ["a", "b", "c", "d", "e"]
    sets = {
        "a": [{"image": "x", "options": ["a", "b", "c", "zz"], "groundtruth": "a"}],
        "b": [{"image": "y", "options": ["b", "a", "c", "d"], "groundtruth": "b"}],
    }
    assert check_options(sets, names, partial=True) == 1
    assert check_options({"b": sets["b"]}, names) == 0
    with pytest.raises(ValueError, match=r"lacks: \['zz'\]"):
        check_options(
            {"zz": [{"image": "z", "options": ["zz", "a", "b", "c"], "groundtruth": "zz"}]}, names, partial=True
        )


def test_the_published_foci_sets_are_valid(tmp_path):
    from finedefics.data.real import REAL_DATASETS

    for spec in REAL_DATASETS.values():
        options = json.loads(spec.foci_file.read_text())
        check_options(
            options,
            list(options) + sorted({o for v in options.values() for e in v for o in e["options"]} - set(options)),
        )


def _undescribed(descriptions: dict[str, str], *image_ids: str) -> dict[str, str]:
    return {i: d for i, d in descriptions.items() if i not in image_ids}


@pytest.mark.parametrize("strategy", ["hard", "simple"])
def test_images_without_a_description_stay_anchors_but_never_serve_as_negatives(strategy):
    """Issue 15.8: failed attribute extraction leaves some train images without a description."""
    manifest, names, descriptions, emb = toy(n_classes=8, per_class=4)
    train = manifest[manifest.split == "train"]
    missing = ["train/0_0", "train/0_1", "train/2_3", "train/5_0"]
    partial = _undescribed(descriptions, *missing)
    out = mine(train, names, partial, emb, strategy, seed=0)
    assert list(out.image_id) == list(train.image_id)  # every train image is still an anchor (Stage II)
    picked = {i for ids in out.negative_image_ids for i in ids}
    assert not picked & set(missing)  # their classes have described images, which are used instead
    assert all(d for ds in out.negative_descriptions for d in ds)
    assert description_coverage(train, partial, out) == {
        "train_images_without_description": 4,
        "classes_without_description": 0,
        "negatives_without_description": 0,
    }
    if strategy == "hard":  # nothing to avoid: the same negatives as with every description
        full = mine(train, names, descriptions, emb, strategy, seed=0)
        assert out.negative_labels.tolist() == full.negative_labels.tolist()


def test_a_class_without_a_described_image_is_not_a_negative_and_distractors_do_not_change():
    manifest, names, descriptions, emb = toy(n_classes=8, per_class=3)
    train = manifest[manifest.split == "train"]
    silent = [f"train/3_{i}" for i in range(3)]  # class 3 lost every description
    partial = _undescribed(descriptions, *silent)
    hard = mine(train, names, partial, emb, "hard", seed=0)
    full = mine(train, names, descriptions, emb, "hard", seed=0)
    for row, before in zip(hard.itertuples(), full.itertuples()):
        sims = emb.rows([row.image_id])[0] @ emb.classes.T
        ranked = sorted((c for c in range(len(names)) if c not in (row.label, 3)), key=lambda c: -sims[c])
        assert list(row.negative_labels) == ranked[:3]  # the next most similar class takes class 3's place
        assert list(row.distractors) == list(before.distractors)  # Stage II's options use every class
    assert 3 in {d for ds in hard.distractors for d in ds}  # (it was a distractor somewhere)
    simple = mine(train, names, partial, emb, "simple", seed=0)
    assert 3 not in {n for ns in simple.negative_labels for n in ns}
    coverage = description_coverage(train, partial, hard)
    assert coverage == {
        "train_images_without_description": 3,
        "classes_without_description": 1,
        "negatives_without_description": 0,
    }


def test_with_fewer_than_three_described_wrong_classes_a_negative_keeps_an_empty_description():
    manifest, names, descriptions, emb = toy(n_classes=5, per_class=2)
    train = manifest[manifest.split == "train"]
    partial = {i: d for i, d in descriptions.items() if i.startswith(("train/0_", "train/1_", "train/2_"))}
    out = mine(train, names, partial, emb, "hard", seed=0)
    assert out.negative_labels.str.len().eq(3).all()  # still 3 negatives per image, as Stage I's batches need
    coverage = description_coverage(train, partial, out)
    assert coverage["classes_without_description"] == 2 and coverage["train_images_without_description"] == 4
    empty = sum(d == "" for ds in out.negative_descriptions for d in ds)
    assert coverage["negatives_without_description"] == empty > 0


def _world(tmp_path):
    from conftest import make_world_workdir

    from finedefics.data.prepared import load_prepared

    root = make_world_workdir(tmp_path)
    dataset = load_prepared("toy-bird", root / "data" / "prepared")
    return root, dataset


def test_stage1_leaves_out_images_without_a_description_and_stage2_keeps_them(tmp_path):
    from finedefics.align.instructions import stage1_frame, stage1_skipped, stage2_frame

    _, dataset = _world(tmp_path)
    train = dataset.train
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    emb = Embeddings(
        list(dataset.images.image_id),
        unit(rng.normal(size=(len(dataset.images), 8))),
        unit(rng.normal(size=(len(dataset.names), 8))),
    )
    missing = list(train.image_id[:2])
    described = {i: f"a description of {i}" for i in train.image_id if i not in missing}
    negatives = mine(train, dataset.names, described, emb, "hard", seed=0)
    descriptions = pd.DataFrame({"image_id": list(described), "description": list(described.values())})
    s1 = stage1_frame(dataset, descriptions, negatives)
    s2 = stage2_frame(dataset, negatives, "open+closed", seed=0)
    assert set(s1.image_id) == set(train.image_id) - set(missing)
    assert stage1_skipped(descriptions, negatives) == len(missing) == len(train) - len(s1)
    assert set(s2.image_id) == set(train.image_id) and len(s2) == 2 * len(train)
    assert all(d for ds in s1.negative_descriptions for d in ds)


def test_mine_and_build_instructions_stages_count_images_without_a_description(tmp_path):
    from conftest import run_stage

    from finedefics.artefacts import DESCRIPTIONS

    root, dataset = _world(tmp_path)
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    (root / "data" / "embeddings").mkdir(parents=True)
    Embeddings(
        list(dataset.images.image_id),
        unit(rng.normal(size=(len(dataset.images), 8))),
        unit(rng.normal(size=(len(dataset.names), 8))),
    ).save(root / "data" / "embeddings" / "toy-bird.npz")
    kept = list(dataset.train.image_id[3:])  # the first three lost their description
    (root / "data" / "descriptions").mkdir(parents=True)
    DESCRIPTIONS.write(
        root / "data" / "descriptions" / "toy-bird.parquet",
        pd.DataFrame({"image_id": kept, "description": [f"a bird {i}" for i in kept]}),
    )
    for light in (("check_params.py",), ("mine.py", "toy-bird")):  # neither may import torch
        proc = run_stage(root, *light, torch_free=True)
        assert proc.returncode == 0, proc.stderr
    metrics = json.loads((root / "metrics" / "mine" / "toy-bird.json").read_text())
    assert metrics["train_images_without_description"] == 3 and metrics["negatives_without_description"] == 0
    proc = run_stage(root, "build_instructions.py", torch_free=True)
    assert proc.returncode == 0, proc.stderr
    assert "stage I: left out 3 train images without a description (toy-bird 3)" in proc.stdout
    s1 = pd.read_parquet(root / "data" / "instructions" / "stage1.parquet")
    s2 = pd.read_parquet(root / "data" / "instructions" / "stage2.parquet")
    assert len(s1) == len(dataset.train) - 3 and set(s2.image_id) == set(dataset.train.image_id)
    assert "a light stage imported torch" in run_stage(root, "embed.py", "toy-bird", torch_free=True).stderr


def test_unseen_classes_are_never_anchors_negatives_or_distractors():
    manifest, names, descriptions, emb = toy(n_classes=10)
    train = manifest[manifest.split == "train"]
    unseen = [2, 7]
    labels = dict(zip(manifest.image_id, manifest.label))
    for strategy in ("hard", "simple"):
        out = mine(train, names, descriptions, emb, strategy, seed=0, unseen=unseen)
        assert set(out.label) == set(range(10)) - set(unseen)
        assert len(out) == (~train.label.isin(unseen)).sum()
        for row in out.itertuples():
            assert not set(row.negative_labels) & set(unseen) and not set(row.distractors) & set(unseen)
            assert not {labels[i] for i in row.negative_image_ids} & set(unseen)
            assert len(set(row.distractors)) == 3 and row.label not in row.distractors
        # most classes without a described image: the fallbacks still keep to the seen classes
        few = {i: d for i, d in descriptions.items() if labels[i] in (0, 1)}
        for row in mine(train, names, few, emb, strategy, seed=0, unseen=unseen).itertuples():
            assert not (set(row.negative_labels) | set(row.distractors)) & set(unseen)
            assert not {labels[i] for i in row.negative_image_ids} & set(unseen)
    with pytest.raises(ValueError, match="more than 3 seen classes"):
        mine(train, names, descriptions, emb, "hard", seed=0, unseen=list(range(7)))


def test_unseen_categories_spread_over_clusters_and_are_seeded(tmp_path):
    from conftest import make_world_workdir

    from finedefics.data.prepared import load_prepared

    root = make_world_workdir(tmp_path, categories=12, cluster_size=3)
    dataset = load_prepared("toy-bird", root / "data" / "prepared")
    cluster = {c.label: c.cluster for c in dataset.categories}
    four = dataset.unseen(4, seed=0)
    assert len(four) == 4 and len({cluster[u] for u in four}) == 4  # one per cluster of siblings
    assert dataset.unseen(4, seed=0) == four and set(dataset.unseen(2, seed=0)) < set(four)
    assert dataset.unseen(0, seed=0) == []
    with pytest.raises(ValueError, match="fewer than 4 seen"):
        dataset.unseen(9, seed=0)


def test_prepared_options_keep_foci_sets_of_held_test_images_only():
    from finedefics.mining import check_options, prepared_options

    reference = {
        "a": [{"image": "x.jpg", "options": ["a", "b", "c", "d"], "groundtruth": "a"}],
        "b": [
            {"image": "y.jpg", "options": ["b", "a", "c", "d"], "groundtruth": "b"},
            {"image": "gone.jpg", "options": ["b", "e", "f", "g"], "groundtruth": "b"},
        ],
        "e": [{"image": "gone2.jpg", "options": ["e", "a", "b", "c"], "groundtruth": "e"}],
    }
    kept = prepared_options(reference, {"x.jpg", "y.jpg"})
    assert kept == {"a": reference["a"], "b": reference["b"][:1]}
    check_options(kept, ["a", "b", "c", "d"])  # the left-out sets named classes the dataset lacks
    with pytest.raises(ValueError, match="lacks"):
        check_options(reference, ["a", "b", "c", "d"])
