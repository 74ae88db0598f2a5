import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import scipy.io as sio
import yaml
from conftest import REPO, stage_env
from real_fixtures import MAKERS, make_flat

from finedefics.data.manifest import EmptyClassError, LeakageError
from finedefics.data.prepare import prepare_real
from finedefics.data.real import REAL_DATASETS, AnnotationError, DatasetNotFound, load_real


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


def test_rejection_reasons_are_stable_text_so_rejected_csv_is_reproducible(tmp_path):
    """Issue 15.3: PIL's "cannot identify image file <_io.BytesIO object at 0x7f...>" made the hash vary."""
    root = tmp_path / "dog-120"
    MAKERS["dog-120"](root)
    files = [sorted(folder.glob("*_train*.jpg"))[0] for folder in sorted((root / "Images").iterdir())]
    files[0].write_bytes(b"not an image at all")  # PIL cannot identify it
    files[1].write_bytes(b"")
    files[2].write_bytes(files[2].read_bytes()[:40])  # truncated
    runs = [prepare_real("dog-120", root).rejected.to_csv(index=False).encode() for _ in range(2)]
    assert runs[0] == runs[1]
    reasons = pd.read_csv(io.BytesIO(runs[0])).reason
    assert len(reasons) == 3 and not any("0x" in r for r in reasons)
    assert set(reasons) == {
        "unreadable image: not a recognised image format",
        "unreadable image: empty file",
        "unreadable image: OSError: Truncated File Read",
    }


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


def _append(rel: str, text: str):
    def mutate(root):
        path = root / rel
        path.write_text(path.read_text() + text)

    return mutate


def _savemat(rel: str, **variables):
    return lambda root: sio.savemat(root / rel, variables)


_STRUCT = [("class", "O"), ("fname", "O")]

# (dataset, how the annotations are broken, the file named, the place named, what the message expects)
MALFORMED = {
    "pet short line": (
        "pet-37",
        _append("annotations/test.txt", "Abyssinian_5\n"),
        "annotations/test.txt",
        ":7:",
        "'<image name> <class id>",
    ),
    "pet label outside the classes": (
        "pet-37",
        _append("annotations/test.txt", "Abyssinian_5 99 1 1\n"),
        "annotations/test.txt",
        ":7:",
        "a class id from 1 to 4",
    ),
    "pet label not a number": (
        "pet-37",
        _append("annotations/trainval.txt", "\n# note\nAbyssinian_5 one 1 1\n"),
        "annotations/trainval.txt",
        ":9:",
        "a class id from 1",
    ),
    "pet not utf-8": (
        "pet-37",
        lambda r: (r / "annotations/test.txt").write_bytes(b"Abyssinian_1 1 1 1\n\xff 2\n"),
        "annotations/test.txt",
        ":2:",
        "UTF-8 text",
    ),
    "cub short line": ("bird-200", _append("images.txt", "99\n"), "images.txt", ":13:", "'<image id> <image path>'"),
    "cub label outside the classes": (
        "bird-200",
        lambda r: (r / "image_class_labels.txt").write_text("1 1\n2 4\n"),
        "image_class_labels.txt",
        ":2:",
        "a class id from 1 to 3",
    ),
    "cub image without a label": (
        "bird-200",
        lambda r: (r / "image_class_labels.txt").write_text("1 1\n"),
        "image_class_labels.txt",
        "line 2 of images.txt",
        "a line for image id 2",
    ),
    "cub split not 0 or 1": (
        "bird-200",
        lambda r: (r / "train_test_split.txt").write_text("1 train\n"),
        "train_test_split.txt",
        ":1:",
        "1 (train) or 0 (test)",
    ),
    "cub image id twice": (
        "bird-200",
        _append("image_class_labels.txt", "3 1\n"),
        "image_class_labels.txt",
        ":13:",
        "each image id once (3 is already on line 3)",
    ),
    "cub class name without number": (
        "bird-200",
        _append("classes.txt", "4 Nothing\n"),
        "classes.txt",
        ":4:",
        "'4 <number>.<class name>'",
    ),
    "cub unknown attribute": (
        "bird-200",
        _append("attributes/image_attribute_labels.txt", "1 77 1 3 1.0\n"),
        "image_attribute_labels.txt",
        ":49:",
        "an attribute id listed in",
    ),
    "aircraft short line": (
        "aircraft-102",
        _append("data/images_variant_test.txt", "1234567\n"),
        "images_variant_test.txt",
        ":7:",
        "'<image id> <variant>'",
    ),
    "aircraft unknown variant": (
        "aircraft-102",
        _append("data/images_variant_test.txt", "1234567 747-999\n"),
        "images_variant_test.txt",
        ":7:",
        "a variant listed in variants.txt",
    ),
    "cars not a mat file": (
        "car-196",
        lambda r: (r / "devkit/cars_meta.mat").write_bytes(b"not matlab"),
        "devkit/cars_meta.mat",
        ": ",
        "a MATLAB .mat file",
    ),
    "cars variable missing": (
        "car-196",
        _savemat("devkit/cars_meta.mat", names=np.array(["a"], dtype=object)),
        "devkit/cars_meta.mat",
        ": ",
        "the variable(s) class_names, got names",
    ),
    "cars label outside the classes": (
        "car-196",
        _savemat("cars_test_annos_withlabels.mat", annotations=np.array([(1, "a.jpg"), (4, "b.jpg")], dtype=_STRUCT)),
        "cars_test_annos_withlabels.mat",
        "annotations entry 2:",
        "a class from 1 to 3",
    ),
    "cars annotations not structs": (
        "car-196",
        _savemat("devkit/cars_train_annos.mat", annotations=np.array([1.0, 2.0])),
        "cars_train_annos.mat",
        ": ",
        "annotations to be a list of structs with fields fname, class",
    ),
    "dogs label outside the classes": (
        "dog-120",
        _savemat(
            "test_list.mat", file_list=np.array(["n02085620-Chihuahua/a.jpg"], dtype=object), labels=np.array([9])
        ),
        "test_list.mat",
        "file_list entry 1:",
        "a class id from 1 to 4",
    ),
    "dogs lists of other lengths": (
        "dog-120",
        _savemat(
            "test_list.mat", file_list=np.array(["n02085620-Chihuahua/a.jpg"], dtype=object), labels=np.array([1, 1])
        ),
        "test_list.mat",
        ": ",
        "as many labels as files",
    ),
    "flowers image id outside imagelabels": (
        "flower-102",
        _savemat("setid.mat", trnid=np.array([1]), valid=np.array([2]), tstid=np.array([9000])),
        "setid.mat",
        "tstid entry 1:",
        "an image id from 1 to 8189",
    ),
    "flowers label outside the classes": (
        "flower-102",
        _savemat("imagelabels.mat", labels=np.array([1, 103])),
        "imagelabels.mat",
        "labels entry 2:",
        "a class from 1 to 102",
    ),
    "flat csv short row": ("pet-37", None, "train.csv", ":3:", "'<image path>,<class name>'"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_annotation_file_is_one_line_naming_file_line_and_expectation(tmp_path, case):
    """Issue 15.4: a short line gave "not enough values to unpack", a label outside the classes a KeyError."""
    name, mutate, file, place, expected = MALFORMED[case]
    root = tmp_path / name
    if mutate is None:  # the flat layout's train.csv
        make_flat(root, name)
        (root / "train.csv").write_text('image,class_name\ntrain/1.jpg,"Abyssinian"\ntrain/2.jpg\n')
    else:
        MAKERS[name](root)
        mutate(root)
    with pytest.raises(AnnotationError) as info:
        load_real(name, root)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(root)), msg
    assert file in msg and place in msg and f"expected {expected}" in msg, msg


def test_prepare_stage_on_a_malformed_annotation_file_fails_with_one_line(tmp_path, mlflow_uri):
    """The stage entry turns the parse error into exactly one stderr line and exit code 1."""
    root = tmp_path / "data" / "raw" / "pet-37"
    MAKERS["pet-37"](root)
    listing = root / "annotations" / "test.txt"
    listing.write_text(listing.read_text() + "Abyssinian_5\n")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["datasets"] = {"pet-37": "data/raw/pet-37"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = stage_env() | {"MLFLOW_TRACKING_URI": mlflow_uri}
    # a store MLflow has already set up: creating one logs its own lines, which this test is not about
    import mlflow

    mlflow.MlflowClient(mlflow_uri).search_experiments()
    proc = subprocess.run(
        [sys.executable, str(REPO / "stages/prepare.py"), "pet-37"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "error: data/raw/pet-37/annotations/test.txt:7: expected '<image name> <class id> <species> <breed id>', "
        "got 'Abyssinian_5'"
    ]
    assert not (tmp_path / "data" / "prepared" / "pet-37").exists()


def test_per_class_keeps_the_first_images_of_each_class_and_split(tmp_path):
    root = tmp_path / "bird-200"
    MAKERS["bird-200"](root)  # 3 classes, 2 train and 2 test images each
    full = prepare_real("bird-200", root).dataset.images
    one = prepare_real("bird-200", root, per_class=1).dataset.images
    assert len(full) == 12 and len(one) == 6
    for (split, label), group in full.groupby(["split", "label"]):
        kept = one[(one.split == split) & (one.label == label)]
        assert list(kept.image_id) == sorted(group.image_id)[:1]
    assert len(prepare_real("bird-200", root, per_class=5).dataset.images) == 12  # a cap above the count keeps all
