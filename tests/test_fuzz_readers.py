"""Property-based tests of the readers of outside input (issue 15, "fuzz the parsers").

Each real dataset's annotation reader gets arbitrary bytes, or its valid files with lines
replaced, inserted or deleted (MATLAB files: variables replaced by arbitrary arrays), and must
give a dataset whose labels all name a class, or one `AnnotationError` line that starts with the
path of a file it read. The FOCI results reader behind `finedefics score` gets arbitrary JSON and
must give metrics in [0, 1] or one `ValueError` line.
"""

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
import typer
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from real_fixtures import MAKERS, make_flat

from finedefics.data.real import AnnotationError, Source, load_real
from finedefics.evaluate.mc import score_results

FUZZ = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)

# (dataset, layout, the file fuzzed relative to the folder holding the dataset folder)
TEXT_FILES = [
    ("bird-200", "published", "bird-200/classes.txt"),
    ("bird-200", "published", "bird-200/images.txt"),
    ("bird-200", "published", "bird-200/image_class_labels.txt"),
    ("bird-200", "published", "bird-200/train_test_split.txt"),
    ("bird-200", "published", "bird-200/attributes/image_attribute_labels.txt"),
    ("bird-200", "published", "attributes.txt"),
    ("pet-37", "published", "pet-37/annotations/trainval.txt"),
    ("pet-37", "published", "pet-37/annotations/test.txt"),
    ("aircraft-102", "published", "aircraft-102/data/variants.txt"),
    ("aircraft-102", "published", "aircraft-102/data/images_variant_trainval.txt"),
    ("aircraft-102", "published", "aircraft-102/data/images_variant_test.txt"),
    ("pet-37", "flat", "pet-37/train.csv"),
]
MAT_FILES = [
    ("car-196", "car-196/devkit/cars_meta.mat"),
    ("car-196", "car-196/devkit/cars_train_annos.mat"),
    ("car-196", "car-196/cars_test_annos_withlabels.mat"),
    ("dog-120", "dog-120/train_list.mat"),
    ("dog-120", "dog-120/test_list.mat"),
    ("flower-102", "flower-102/imagelabels.mat"),
    ("flower-102", "flower-102/setid.mat"),
]


class Tree:
    """A dataset's annotation files and folders (no images: the readers never open them)."""

    def __init__(self, built: Path, name: str):
        self.name = name
        self.files = {p.relative_to(built): p.read_bytes() for p in built.rglob("*") if p.is_file()}
        self.files = {rel: data for rel, data in self.files.items() if rel.suffix != ".jpg"}
        self.dirs = [p.relative_to(built) for p in built.rglob("*") if p.is_dir()]

    def load(self, rel: str, content: bytes | None = None, write=None) -> tuple[Path, Source | AnnotationError]:
        """Write the tree with `rel` replaced (by bytes, or by `write(path)`) and read it."""
        folder = Path(tempfile.mkdtemp(prefix="fuzz-"))
        try:
            for d in self.dirs:
                (folder / d).mkdir(parents=True, exist_ok=True)
            for f, data in self.files.items():
                (folder / f).write_bytes(data)
            if write is not None:
                write(folder / rel)
            else:
                (folder / rel).write_bytes(content)
            try:
                return folder, load_real(self.name, folder / self.name)
            except AnnotationError as err:
                return folder, err
        finally:
            shutil.rmtree(folder)


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    built = {}
    for name, layout in {(n, layout) for n, layout, _ in TEXT_FILES} | {(n, "published") for n, _ in MAT_FILES}:
        top = tmp_path_factory.mktemp(f"{name}-{layout}")
        fixture = make_flat(top / name, name) if layout == "flat" else MAKERS[name](top / name)
        built[name, layout] = Tree(top, name)
        built[name, layout].fixture = fixture
    return built


def check(folder: Path, outcome: Source | AnnotationError) -> None:
    """A dataset whose every label names a class, or one error line naming a file it read."""
    if isinstance(outcome, AnnotationError):
        msg = str(outcome)
        assert "\n" not in msg and "\r" not in msg, msg
        assert msg.startswith(f"{folder}/"), msg
        assert "expected" in msg, msg
        return
    assert all(isinstance(c, str) for c in outcome.classes)
    for img in outcome.images:
        assert img.split in ("train", "test")
        assert 0 <= img.label < len(outcome.classes), img
        assert isinstance(img.image_id, str) and isinstance(img.foci_key, str)


# --- text annotation files ------------------------------------------------------------------

token = st.one_of(
    st.integers(-3, 400).map(str),
    st.sampled_from(["0", "1", "#", "::", "has_x::y", ".", "a.b", "Abyssinian_1", "707-320", ",", '"']),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=8),
)
fuzzed_line = st.lists(token, max_size=6).map(" ".join)


@st.composite
def edited(draw, lines: list[str]) -> bytes:
    """The file's lines with a few replaced, inserted or deleted."""
    lines = list(lines)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["replace", "insert", "delete"]))
        at = draw(st.integers(0, len(lines)))
        if op == "insert" or not lines:
            lines.insert(at, draw(fuzzed_line))
        elif op == "replace":
            lines[min(at, len(lines) - 1)] = draw(fuzzed_line)
        else:
            del lines[min(at, len(lines) - 1)]
    return "\n".join(lines).encode()


@pytest.mark.parametrize(("name", "layout", "rel"), TEXT_FILES, ids=[f[2] for f in TEXT_FILES])
@FUZZ
@given(data=st.data())
def test_text_annotation_readers_give_a_dataset_or_one_error_line(trees, name, layout, rel, data):
    tree = trees[name, layout]
    lines = tree.files[Path(rel)].decode().splitlines()
    content = data.draw(st.one_of(st.binary(max_size=200), edited(lines)), label="content")
    check(*tree.load(rel, content))


# --- MATLAB annotation files ----------------------------------------------------------------

scalar = st.one_of(
    st.integers(-3, 9000),
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.text(st.characters(codec="ascii", blacklist_categories=("Cc",)), max_size=12),
    st.sampled_from(["n02085620-Chihuahua/a.jpg", "00001.jpg", "x/y", "-", "a-"]),
)


@st.composite
def mat_value(draw):
    kind = draw(st.sampled_from(["numbers", "integers", "strings", "mixed", "struct", "matrix", "empty"]))
    if kind == "numbers":
        return np.array(draw(st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=6)), dtype=float)
    if kind == "integers":
        return np.array(draw(st.lists(st.integers(-3, 9000), min_size=1, max_size=6)))
    if kind == "strings" or kind == "mixed":
        items = draw(st.lists(scalar if kind == "mixed" else scalar.filter(lambda v: isinstance(v, str)), max_size=5))
        cell = np.empty((len(items), 1), dtype=object)
        for i, item in enumerate(items):
            cell[i, 0] = item
        return cell
    if kind == "struct":
        fields = draw(st.lists(st.sampled_from(["fname", "class", "bbox_x1", "other"]), min_size=1, unique=True))
        rows = draw(st.lists(st.tuples(*[scalar] * len(fields)), max_size=4))
        return np.array(rows, dtype=[(f, "O") for f in fields])
    if kind == "matrix":
        return np.arange(draw(st.integers(1, 3)) * 2).reshape(-1, 2) + draw(st.integers(-1, 3))
    return np.zeros((0,))


@st.composite
def mat_file(draw, original: dict) -> dict:
    """The file's variables with some replaced by arbitrary arrays, removed or added."""
    variables = {k: v for k, v in original.items() if not k.startswith("__")}
    for _ in range(draw(st.integers(1, 2))):
        key = draw(st.sampled_from([*variables, "extra"]))
        if draw(st.booleans()) and key in variables and len(variables) > 1:
            del variables[key]
        else:
            variables[key] = draw(mat_value())
    return variables


def _header(data: bytes) -> bytes:
    """A MAT 5 header, so that scipy reads on into the arbitrary bytes."""
    return b"MATLAB 5.0 MAT-file".ljust(116, b" ") + b"\0" * 8 + b"\0\x01IM" + data


@pytest.mark.parametrize(("name", "rel"), MAT_FILES, ids=[f[1] for f in MAT_FILES])
@FUZZ
@given(data=st.data())
def test_matlab_annotation_readers_give_a_dataset_or_one_error_line(trees, name, rel, data):
    tree = trees[name, "published"]
    if data.draw(st.integers(0, 3), label="bytes?") == 0:
        raw = data.draw(st.binary(max_size=200), label="bytes")
        content = _header(raw) if data.draw(st.booleans(), label="with header") else raw
        check(*tree.load(rel, content))
        return
    with tempfile.TemporaryDirectory() as d:
        original = Path(d) / "original.mat"
        original.write_bytes(tree.files[Path(rel)])
        variables = data.draw(mat_file(sio.loadmat(original)), label="variables")
        try:
            sio.savemat(Path(d) / "fuzzed.mat", variables)
        except Exception:  # a value scipy cannot write is not a test of the reader
            assume(False)
        content = (Path(d) / "fuzzed.mat").read_bytes()
    check(*tree.load(rel, content))


def test_a_fuzzed_file_that_is_valid_reads_as_before(trees):
    """The harness itself: the unchanged files read to the fixture's dataset, its classes in label
    order, its train images and its test images under their FOCI keys and classes."""
    for (name, layout), tree in trees.items():
        rel = next(iter(tree.files))
        folder, outcome = tree.load(str(rel), tree.files[rel])
        assert isinstance(outcome, Source), (name, outcome)
        fx = tree.fixture
        assert outcome.classes == fx.classes, (name, layout)
        assert sum(img.split == "train" for img in outcome.images) == fx.train_count, (name, layout)
        test = {img.foci_key: outcome.classes[img.label] for img in outcome.images if img.split == "test"}
        assert test == fx.test_keys, (name, layout, set(test.items()) ^ set(fx.test_keys.items()))


# --- the FOCI results file (`finedefics score`) ---------------------------------------------

json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
answer = st.one_of(st.sampled_from(["cat", "dog", "NA ### hmm"]), json_value)
name = st.sampled_from(["cat", "dog"])
prediction = st.one_of(
    st.fixed_dictionaries(
        {"image": st.sampled_from(["a.jpg", "b.jpg"]), "predicted": name | st.just("NA ### "), "correct": name},
        optional={"predicted_raw": st.text(max_size=6), "options": json_value, "permutation": json_value},
    ),
    st.fixed_dictionaries(
        {},
        optional={
            "image": answer,
            "predicted": answer,
            "predicted_raw": answer,
            "correct": st.one_of(st.booleans(), answer),
            "options": json_value,
        },
    ),
    json_value,
)
results = st.one_of(
    json_value,
    st.lists(prediction, max_size=5),
    st.fixed_dictionaries(
        {"predictions": st.one_of(st.lists(prediction, max_size=5), json_value)},
        optional={"metrics": json_value, "config": json_value},
    ),
)


@FUZZ
@given(data=results)
def test_the_foci_results_reader_gives_metrics_or_one_error_line(data):
    try:
        metrics = score_results(data)
    except ValueError as err:
        assert "\n" not in str(err), str(err)
        return
    assert 0 <= metrics.accuracy <= 1 and 0 <= metrics.failure_rate <= 1 and 1 <= metrics.n <= metrics.predictions
    assert 0 <= metrics.ci_low <= metrics.ci_high <= 1


@FUZZ
@given(content=st.one_of(st.binary(max_size=120), results.map(lambda v: json.dumps(v).encode())))
def test_the_score_command_prints_metrics_or_exits_2_with_one_line(content, capsys):
    from finedefics.cli import score

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "results.json"
        path.write_bytes(content)
        capsys.readouterr()
        try:
            score([path])
        except typer.Exit as exit:
            assert exit.exit_code == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and err.startswith(f"error: {path}: not a FOCI results file"), err
            return
        got = json.loads(capsys.readouterr().out)
        assert set(got) == {"accuracy", "failure_rate", "n", "predictions", "ci_low", "ci_high"}
