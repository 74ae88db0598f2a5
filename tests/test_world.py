import hashlib
import json

import numpy as np
import pytest
from conftest import REPO

from finedefics.artefacts import IMAGES
from finedefics.config import WorldConfig
from finedefics.data import world
from finedefics.data.prepare import prepare_world

SMALL = WorldConfig(
    categories=6, cluster_size=3, train_per_class=3, test_per_class=2, image_size=48, deviation_rate=0.2
)
BIRD = REPO / "world" / "toy-bird.yaml"
FLOWER = REPO / "world" / "toy-flower.yaml"


def digest(folder):
    return {
        p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def world_final(name):
    from pathlib import Path

    return Path("data/prepared") / name


def run(tmp, name="toy-bird", spec=BIRD, cfg=SMALL, seed=0):
    out = tmp / name
    out.mkdir(parents=True)
    prepared = prepare_world(name, spec, cfg, seed, out, world_final(name))
    IMAGES.write(out / "images.parquet", prepared.dataset.images)
    return prepared, out


def test_same_params_same_bytes(tmp_path):
    a, out_a = run(tmp_path / "a")
    b, out_b = run(tmp_path / "b")
    assert digest(out_a) == digest(out_b) and len(digest(out_a)) == 6 * 5 + 1
    assert a.dataset.to_json() == b.dataset.to_json()
    c, out_c = run(tmp_path / "c", seed=1)
    assert digest(out_c) != digest(out_a) and c.dataset.categories != a.dataset.categories


def test_drawing_on_several_cores_gives_the_same_bytes(tmp_path, monkeypatch):
    import finedefics.data.prepare as prepare

    a, out_a = run(tmp_path / "a")  # 30 images: drawn in this process
    monkeypatch.setattr(prepare, "IMAGES_PER_WORKER", 8)
    monkeypatch.setattr(prepare.os, "cpu_count", lambda: 3)
    b, out_b = run(tmp_path / "b")  # 3 worker processes
    assert digest(out_a) == digest(out_b)
    assert a.dataset.images.equals(b.dataset.images)


def test_manifest_has_ground_truth_and_splits(tmp_path):
    prepared, _ = run(tmp_path, "toy-flower", FLOWER)
    m = prepared.dataset.images
    assert len(prepared.dataset.train) == 18 and len(prepared.dataset.test) == 12
    spec = world.WorldSpec.load(FLOWER)
    profiles = {c.label: c.profile for c in prepared.dataset.categories}
    for row in m.itertuples():
        attrs = json.loads(row.attributes)
        assert set(attrs) == set(spec.attributes)
        differing = [k for k in attrs if attrs[k] != profiles[row.label][k]]
        assert differing == ([row.deviation] if row.deviation else [])
    assert prepared.dataset.super_category == "flower"


def test_clusters_are_confusable_and_names_opaque():
    spec = world.WorldSpec.load(BIRD)
    cfg = WorldConfig(categories=12, cluster_size=3)
    classes = world.make_classes(spec, cfg, world.dataset_rng(0, "toy-bird", 0))
    assert len({c.name for c in classes}) == 12 and len({tuple(c.profile.items()) for c in classes}) == 12
    vocabulary = {w for k, a in spec.attributes.items() for w in (*k.split(), *" ".join(a.values).split())}
    for a in classes:
        assert not {w.lower() for w in a.name.split()} & vocabulary
        for b in classes:
            if a.label < b.label:
                d = sum(a.profile[k] != b.profile[k] for k in spec.attributes)
                assert (1 <= d <= 2) if a.cluster == b.cluster else d >= 1
        siblings = [b for b in classes if b.cluster == a.cluster]
        assert len({b.name.split()[1] for b in siblings}) == 1  # siblings share a genus word


@pytest.mark.parametrize("gap", [1, 3])
def test_sibling_distance_bounds_how_many_attributes_separate_siblings(gap):
    spec = world.WorldSpec.load(BIRD)
    cfg = WorldConfig(categories=12, cluster_size=3, sibling_distance=gap)
    classes = world.make_classes(spec, cfg, world.dataset_rng(0, "toy-bird", 0))
    gaps = [
        sum(a.profile[k] != b.profile[k] for k in spec.attributes)
        for a in classes
        for b in classes
        if a.label < b.label and a.cluster == b.cluster
    ]
    assert len(gaps) == 12 and all(1 <= d <= gap for d in gaps)
    if gap == 1:
        assert set(gaps) == {1}
    with pytest.raises(ValueError, match="sibling_distance 99 exceeds"):
        world.make_classes(spec, cfg.model_copy(update={"sibling_distance": 99}), world.dataset_rng(0, "toy-bird", 0))


def test_test_shift_changes_test_images_only_tilting_and_darkening_them():
    spec = world.WorldSpec.load(BIRD)
    classes = world.make_classes(spec, SMALL, world.dataset_rng(0, "toy-bird", 0))
    plan = world.image_plan(spec, classes, SMALL, 0, "toy-bird")
    shifted = SMALL.model_copy(update={"test_shift": 1.0})
    for item in plan[:4] + [i for i in plan if i.split == "test"][:4]:
        a, _ = world.draw_image(spec, item, SMALL, 0, "toy-bird")
        b, _ = world.draw_image(spec, item, shifted, 0, "toy-bird")
        same = np.array_equal(np.asarray(a), np.asarray(b))
        assert same == (item.split == "train")
        if item.split == "test":  # the corners are background
            corners = lambda im: np.asarray(im)[[0, 0, -1, -1], [0, -1, 0, -1]].mean()  # noqa: E731
            assert corners(b) < corners(a) - 20
    profile = classes[0].profile
    tilts = [world.render(spec, profile, 64, np.random.default_rng(i), shift=1.0)[1]["object"] for i in range(2)]
    assert all(m.any() for m in tilts)


def test_deviation_rate_is_respected():
    spec = world.WorldSpec.load(BIRD)
    classes = world.make_classes(spec, SMALL, world.dataset_rng(0, "toy-bird", 0))
    never = world.image_plan(spec, classes, SMALL.model_copy(update={"deviation_rate": 0.0}), 0, "toy-bird")
    always = world.image_plan(spec, classes, SMALL.model_copy(update={"deviation_rate": 1.0}), 0, "toy-bird")
    assert all(i.deviation == "" for i in never) and all(i.deviation for i in always)


def render_pair(spec, profile, **change):
    other = {**profile, **change}
    img_a, masks_a, scene_a = world.render(spec, profile, 64, np.random.default_rng(7))
    img_b, masks_b, scene_b = world.render(spec, other, 64, np.random.default_rng(7))
    assert scene_a == scene_b  # pose and background do not depend on the profile
    return np.asarray(img_a, float), masks_a, np.asarray(img_b, float), masks_b


BIRD_PROFILE = {
    "body color": "green",
    "head color": "red",
    "wing color": "yellow",
    "wing pattern": "plain",
    "beak shape": "short",
    "tail shape": "fan",
    "body size": "medium",
}


def test_wing_colour_shows_in_the_wing_region_only():
    spec = world.WorldSpec.load(BIRD)
    a, ma, b, mb = render_pair(spec, BIRD_PROFILE, **{"wing color": "blue"})
    wing = ma["wing"] & mb["wing"]
    from scipy.ndimage import binary_dilation

    body_only = ma["body"] & ~binary_dilation(ma["wing"], iterations=2)  # away from anti-aliased edges
    assert (ma["wing"] == mb["wing"]).all()
    mean_a, mean_b = a[wing].mean(0), b[wing].mean(0)
    assert mean_a[0] - mean_b[0] > 100 and mean_b[2] - mean_a[2] > 100  # yellow -> blue
    assert np.abs(a[body_only].mean(0) - b[body_only].mean(0)).max() < 1


def test_size_attribute_changes_object_area():
    spec = world.WorldSpec.load(FLOWER)
    profile = {
        "petal color": "red",
        "center color": "yellow",
        "leaf color": "green",
        "petal pattern": "plain",
        "petal shape": "round",
        "leaf shape": "round",
        "flower size": "small",
    }
    areas = [
        world.render(spec, {**profile, "flower size": s}, 64, np.random.default_rng(3))[1]["object"].sum()
        for s in ("small", "medium", "large")
    ]
    assert areas[0] < areas[1] < areas[2] and areas[2] > 1.8 * areas[0]


def test_texture_and_shape_attributes_are_visible():
    spec = world.WorldSpec.load(BIRD)
    a, ma, b, mb = render_pair(spec, BIRD_PROFILE, **{"wing pattern": "striped"})
    from scipy.ndimage import binary_erosion

    inner = binary_erosion(ma["wing"], iterations=2)  # inside the outline
    assert b[inner].std(0).mean() > 20 > 5 > a[inner].std(0).mean()
    _, ms, _, ml = render_pair(spec, BIRD_PROFILE, **{"beak shape": "long"})

    def reach(mask):  # the largest distance between two pixels of a part
        pts = np.argwhere(mask)
        return max(np.linalg.norm(p - q) for p in pts for q in pts)

    assert reach(ml["beak"]) > 1.6 * reach(ms["beak"])


def test_spec_must_match_its_glyph(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BIRD.read_text().replace("beak shape", "bill shape"))
    with pytest.raises(ValueError, match="glyph 'bird' draws exactly"):
        world.WorldSpec.load(bad)
    bad.write_text(BIRD.read_text().replace("[short, long, hooked]", "[short, curly]"))
    with pytest.raises(ValueError, match="beak shape values"):
        world.WorldSpec.load(bad)
