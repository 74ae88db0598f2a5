import json
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from conftest import REPO, stage_env
from real_fixtures import MAKERS, make_flat

from finedefics.data.manifest import EmptyClassError, LeakageError
from finedefics.data.prepare import prepare_real
from finedefics.data.real import REAL_DATASETS, DatasetNotFound, load_real


@pytest.mark.parametrize("name", list(MAKERS))
def test_loader_reads_published_layout_with_foci_names_and_keys(tmp_path, name):
    root = tmp_path / name
    root.mkdir()
    fx = MAKERS[name](root)
    prepared = prepare_real(name, root)
    m = prepared.dataset.images
    assert prepared.dataset.names == fx.classes
    test = prepared.dataset.test
    assert dict(zip(test.foci_key, test.category)) == fx.test_keys
    assert len(prepared.dataset.train) == fx.train_count
    assert m.image_id.is_unique and (m.category == [fx.classes[i] for i in m.label]).all()
    assert all((REPO / p).exists() or (tmp_path / p).exists() or __import__("os").path.exists(p) for p in m.path)
    # every FOCI entry of the fixture's images maps; all other reference entries are reported
    reference = json.loads(REAL_DATASETS[name].foci_file.read_text())
    entries = [e["image"] for v in reference.values() for e in v]  # dog-120 lists one image twice
    assert len(prepared.unmapped) == sum(key not in fx.test_keys for key in entries)
    assert not set(prepared.unmapped.image) & set(fx.test_keys)
    assert set(prepared.unmapped.reason) == {"no prepared test image"}
    assert prepared.dataset.super_category == REAL_DATASETS[name].super_category


def test_archive_subfolder_layout_is_found(tmp_path):
    fx = MAKERS["pet-37"](tmp_path / "pet-37" / "oxford-iiit-pet")
    source = load_real("pet-37", tmp_path / "pet-37")
    assert source.classes == fx.classes and source.base == tmp_path / "pet-37" / "oxford-iiit-pet"


def test_flat_layout_of_the_authors_release(tmp_path):
    fx = make_flat(tmp_path / "pet-37", "pet-37")
    prepared = prepare_real("pet-37", tmp_path / "pet-37")
    test = prepared.dataset.test
    assert dict(zip(test.foci_key, test.category)) == fx.test_keys
    assert len(prepared.dataset.train) == fx.train_count
    assert len(prepared.unmapped) == 0 and len(prepared.rejected) == 0


def test_cub_per_image_attributes_are_kept(tmp_path):
    MAKERS["bird-200"](tmp_path / "bird-200")
    m = prepare_real("bird-200", tmp_path / "bird-200").dataset.images
    attrs = [json.loads(a) for a in m.attributes]
    assert all(a["wing color"] in ("blue and white", "blue") for a in attrs)
    assert {a["bill shape"] for a in attrs if "bill shape" in a} <= {"curved (up or down)", "dagger"}


def test_foci_entry_with_a_wrong_class_is_reported(tmp_path):
    root = tmp_path / "aircraft-102"
    fx = MAKERS["aircraft-102"](root)
    listing = root / "data" / "images_variant_test.txt"
    rows = listing.read_text().splitlines()
    first_id, first_cls = rows[0].split(" ", 1)
    other = next(c for c in fx.classes if c != first_cls)
    listing.write_text("\n".join([f"{first_id} {other}", *rows[1:]]) + "\n")
    unmapped = prepare_real("aircraft-102", root).unmapped
    row = unmapped[unmapped.image == f"images/{first_id}.jpg"].iloc[0]
    assert row.reason == f"prepared as class {other!r}" and row.groundtruth == first_cls


def test_missing_dataset_is_one_line_naming_dataset_path_and_files(tmp_path):
    with pytest.raises(DatasetNotFound) as info:
        load_real("car-196", tmp_path / "car-196")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("car-196:") and str(tmp_path / "car-196") in msg
    assert "devkit/cars_meta.mat" in msg and "cars_test_annos_withlabels.mat" in msg and "train.csv" in msg


def test_incomplete_dataset_is_refused(tmp_path):
    root = tmp_path / "bird-200"
    MAKERS["bird-200"](root)
    (root / "train_test_split.txt").unlink()
    with pytest.raises(DatasetNotFound, match="train_test_split.txt"):
        load_real("bird-200", root)


def test_same_name_other_bytes_is_fine_same_bytes_is_leakage(tmp_path):
    root = tmp_path / "car-196"
    MAKERS["car-196"](root)
    test_name = sorted(p.name for p in (root / "cars_test").iterdir())[0]
    train_name = sorted(p.name for p in (root / "cars_train").iterdir())[0]
    # Stanford Cars reuses file names across splits: equal names with other bytes are fine
    shutil.move(root / "cars_train" / train_name, root / "cars_train" / test_name)
    import scipy.io as sio

    annos = sio.loadmat(root / "devkit" / "cars_train_annos.mat")["annotations"]
    for a in annos.ravel():
        if a["fname"].item() == train_name:
            a["fname"] = test_name
    sio.savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": annos})
    m = prepare_real("car-196", root).dataset.images
    assert set(m[m.foci_key == f"images/{test_name}"].split) == {"train", "test"}
    # the same bytes in both splits stop the stage with both file names
    shutil.copy(root / "cars_test" / test_name, root / "cars_train" / test_name)
    with pytest.raises(LeakageError) as info:
        prepare_real("car-196", root)
    assert f"cars_train/{test_name}" in str(info.value) and f"cars_test/{test_name}" in str(info.value)


def test_corrupt_and_missing_images_are_rejected_and_listed(tmp_path):
    root = tmp_path / "dog-120"
    MAKERS["dog-120"](root)
    files = [sorted(folder.glob("*_train*.jpg"))[0] for folder in sorted((root / "Images").iterdir())]
    files[0].write_bytes(b"not a jpeg")
    files[1].write_bytes(files[1].read_bytes()[:40])  # truncated
    files[2].unlink()
    prepared = prepare_real("dog-120", root)
    rejected = prepared.rejected.set_index("image_id")
    rel = lambda f: str(f.relative_to(root))  # noqa: E731
    assert rejected.loc[rel(files[0]), "reason"].startswith("unreadable image")
    assert rejected.loc[rel(files[1]), "reason"].startswith("unreadable image")
    assert rejected.loc[rel(files[2]), "reason"] == "missing file"
    assert len(prepared.dataset.images) + len(rejected) == 3 * 4
    assert not set(rejected.index) & set(prepared.dataset.images.image_id)


def test_an_image_listed_twice_in_a_split_is_kept_once(tmp_path):
    """FOCI's dog-120 set lists n02085620_1235.jpg twice; a split list may repeat an image too."""
    import numpy as np
    import scipy.io as sio

    root = tmp_path / "dog-120"
    MAKERS["dog-120"](root)
    lists = sio.loadmat(root / "test_list.mat")
    files, labels = lists["file_list"], lists["labels"]
    sio.savemat(
        root / "test_list.mat", {"file_list": np.vstack([files, files[:1]]), "labels": np.vstack([labels, labels[:1]])}
    )
    prepared = prepare_real("dog-120", root)
    assert prepared.dataset.images.image_id.is_unique
    assert list(prepared.rejected.reason) == ["listed more than once in the test split"]


def test_a_class_left_empty_is_an_error(tmp_path):
    root = tmp_path / "pet-37"
    fx = MAKERS["pet-37"](root)
    victim = fx.classes[1]  # American Bulldog
    for f in (root / "images").glob("american_bulldog_9*.jpg"):
        f.write_bytes(b"broken")
    with pytest.raises(EmptyClassError, match=f"no usable train image: '{victim}'"):
        prepare_real("pet-37", root)


def test_prepare_stage_on_real_data_writes_outputs_and_reports(tmp_path):
    """The stage entry end to end: manifest, rejected.csv, FOCI report, metrics, contact sheet."""
    root = tmp_path / "data" / "raw" / "flower-102"
    MAKERS["flower-102"](root)
    import scipy.io as sio

    first_val = int(sio.loadmat(root / "setid.mat", squeeze_me=True)["valid"][0])
    broken = root / "jpg" / f"image_{first_val:05d}.jpg"  # a val (= train) image; its class keeps one
    broken.write_bytes(b"junk")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["datasets"] = {"flower-102": "data/raw/flower-102"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run(
        [sys.executable, str(REPO / "stages/prepare.py"), "flower-102"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=stage_env(),
    )
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "data" / "prepared" / "flower-102"
    rejected = pd.read_csv(out / "rejected.csv")
    assert list(rejected.image_id) == [f"jpg/{broken.name}"]
    assert "1 image(s) rejected" in proc.stdout and "FOCI test entries" in proc.stdout
    metrics = json.loads((tmp_path / "metrics" / "prepare" / "flower-102.json").read_text())
    assert metrics["classes"] == 102 and metrics["rejected_images"] == 1
    assert metrics["foci_unmapped"] == len(pd.read_csv(out / "foci_unmapped.csv"))
    manifest = pd.read_parquet(out / "images.parquet")
    assert metrics["train_images"] + metrics["test_images"] == len(manifest)
    assert (tmp_path / "plots" / "prepare" / "flower-102.png").stat().st_size > 0


def test_prepare_stage_fails_on_missing_dataset_with_one_line(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["datasets"] = {"bird-200": "data/raw/bird-200"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run(
        [sys.executable, str(REPO / "stages/prepare.py"), "bird-200"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=stage_env(),
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: bird-200: dataset not found") and "images.txt" in last
    assert not (tmp_path / "data" / "prepared" / "bird-200").exists()
