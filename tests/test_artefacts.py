"""Typed artefacts: a prepared dataset as one object, parquet columns checked on write and on read."""

import json

import pandas as pd
import pyarrow as pa
import pytest
from conftest import make_world_workdir, run_stage

from finedefics.artefacts import IMAGES, NEGATIVES
from finedefics.data.prepared import PreparedDataset, load_prepared
from finedefics.io import ArtefactError, Table

PAIRS = Table({"image_id": pa.string(), "label": pa.int64(), "negatives": pa.list_(pa.string())})


def test_a_table_round_trips_and_names_the_file_and_column_at_fault(tmp_path):
    good = pd.DataFrame({"image_id": ["a", "b"], "label": [0, 1], "negatives": [["x"], []]})
    PAIRS.write(tmp_path / "t.parquet", good)
    back = PAIRS.read(tmp_path / "t.parquet")
    assert list(back.image_id) == ["a", "b"] and [list(n) for n in back.negatives] == [["x"], []]
    bad = {
        "column 'label' is missing (expected int64)": good.drop(columns="label"),
        "column 'label' is large_string, expected int64": good.assign(label=["0", "1"]),
        "column 'extra' is not declared": good.assign(extra=1),
    }
    for message, frame in bad.items():
        with pytest.raises(ArtefactError) as err:
            PAIRS.write(tmp_path / "bad.parquet", frame)
        assert str(err.value).startswith(f"{tmp_path / 'bad.parquet'}: {message}")
        assert not (tmp_path / "bad.parquet").exists()  # nothing half-written
    good.drop(columns="label").to_parquet(tmp_path / "old.parquet")  # written by something else
    with pytest.raises(ArtefactError, match=r"old.parquet: column 'label' is missing"):
        PAIRS.read(tmp_path / "old.parquet")


def test_negatives_with_no_negatives_at_all_fit_their_declaration(tmp_path):
    row = {c: [] for c in NEGATIVES.columns if c.startswith(("negative", "distractor"))}
    frame = pd.DataFrame([{"image_id": "a", "label": 0, **row}])  # negatives: none gives empty lists only
    NEGATIVES.write(tmp_path / "n.parquet", frame)
    assert NEGATIVES.read(tmp_path / "n.parquet").negative_labels.iloc[0].tolist() == []


def test_a_prepared_dataset_is_typed_and_writes_back_its_classes_json(tmp_path):
    root = make_world_workdir(tmp_path)
    folder = root / "data" / "prepared" / "toy-bird"
    ds = load_prepared("toy-bird", root / "data" / "prepared")
    assert ds.super_category == "bird" and ds.plural == "birds" and len(ds.names) == 6
    assert set(ds.train.split) == {"train"} and set(ds.test.split) == {"test"}
    assert len(ds.train) == 12 and len(ds.test) == 6
    assert all(c.profile is not None and set(c.profile) == set(ds.keys) for c in ds.categories)
    assert ds.to_json() == json.loads((folder / "classes.json").read_text())
    again = PreparedDataset.from_json(ds.to_json(), ds.images)
    assert again.categories == ds.categories and again.attributes == ds.attributes
    assert load_prepared("toy-bird", root / "data" / "prepared", images=False).images.empty


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda m: m.drop(columns="category"), "column 'category' is missing (expected string)"),
        (lambda m: m.assign(label=m.label.astype(str)), "column 'label' is large_string, expected int64"),
    ],
)
def test_a_stage_given_a_bad_table_fails_in_one_line(tmp_path, change, message):
    root = make_world_workdir(tmp_path)
    images = root / "data" / "prepared" / "toy-bird" / "images.parquet"
    change(IMAGES.read(images)).to_parquet(images, index=False)
    proc = run_stage(root, "extract.py", "toy-bird")
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: {images.relative_to(root)}: {message}"
    assert not (root / "data" / "attributes" / "toy-bird" / "values.parquet").exists()
