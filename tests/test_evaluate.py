"""FOCI evaluation, scoring, the representation analyses and `finedefics predict`."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import stage_env
from PIL import Image

from finedefics.evaluate import analysis as an
from finedefics.evaluate.mc import UNREADABLE, Item, evaluate, items, normalise, score
from finedefics.models.mllm import MLLM
from finedefics.protocol import mc_question, parse_choice, query


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "finedefics.cli", *args], capture_output=True, text=True, env=stage_env()
    )


def test_prompt_is_byte_equal_to_foci():
    want = (
        "Which of these birds is shown in the image?\nChoices:\nA. Black_footed_Albatross\nB. Laysan_Albatross\n"
        "C. Sooty_Albatross\nD. Crested_Auklet\nAnswer with the letter from the given choices directly."
    )
    assert (
        mc_question(query("birds"), ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross", "Crested_Auklet"])
        == want
    )
    assert query("aircrafts") == "Which of these aircrafts is shown in the image?"


@pytest.mark.parametrize(
    "output,want",
    [
        ("A", "A"),
        ("b", "B"),
        ("  C. Sooty_Albatross", "C"),
        ("D)", "D"),
        ("d is right", "D"),
        ("E", None),
        ("", None),
        ("Answer: C", "A"),
        ("The answer is B", None),
        ("1", None),  # the first letter, literally
    ],
)
def test_parser_takes_the_first_letter_only(output, want):
    assert parse_choice(output) == want


def test_parser_respects_the_number_of_options():
    assert parse_choice("C", n_options=2) is None and parse_choice("B", n_options=2) == "B"


def test_score_on_hand_made_predictions():
    p = [
        {"predicted": "x", "correct": True},
        {"predicted": "y", "correct": False},
        {"predicted": None, "correct": False},
        {"predicted": "x", "correct": True},
    ]
    assert score(p) == {"accuracy": 0.5, "failure_rate": 0.25, "n": 4}
    with pytest.raises(ValueError):
        score([])


def test_score_command_recomputes_a_foci_results_file(tmp_path):
    predictions = [
        {
            "image": "a.jpg",
            "predicted": "cat",
            "predicted_raw": "A",
            "correct": True,
            "options": ["cat", "dog"],
            "groundtruth": "cat",
        },
        {
            "image": "b.jpg",
            "predicted": "cat",
            "predicted_raw": "A",
            "correct": True,
            "options": ["cat", "dog"],
            "groundtruth": "dog",
        },  # flag wrong
        {
            "image": "c.jpg",
            "predicted": None,
            "predicted_raw": "zzz",
            "correct": False,
            "options": ["cat", "dog"],
            "groundtruth": "dog",
        },
    ]
    f = tmp_path / "results.json"
    f.write_text(json.dumps({"metrics": {}, "predictions": predictions, "config": {}}))
    proc = cli("score", str(f))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"accuracy": pytest.approx(1 / 3), "failure_rate": pytest.approx(1 / 3), "n": 3}
    f.write_text("{not json")
    proc = cli("score", str(f))
    assert proc.returncode == 2 and "not a FOCI results file" in proc.stderr


def test_items_are_shuffled_by_seed_and_checked_against_the_classes():
    options = {
        "b": [{"image": "i2", "options": ["b", "a", "c", "d"], "groundtruth": "b"}],
        "a": [{"image": "i1", "options": ["a", "b", "c", "d"], "groundtruth": "a"}],
    }
    one, again = items(options, {"i1": "p1"}, list("abcd"), seed=0), items(options, {"i1": "p1"}, list("abcd"), seed=0)
    assert one == again and [i.image for i in one] == ["i1", "i2"]
    assert all(sorted(i.options) == list("abcd") for i in one)
    shown = {tuple(items(options, {}, list("abcd"), seed=s)[0].options) for s in range(20)}
    assert len(shown) > 5  # the ground truth is not always first
    with pytest.raises(ValueError, match="'e', which is not a class of this dataset"):
        items({"a": [{"image": "i1", "options": ["a", "e"], "groundtruth": "a"}]}, {}, list("abcd"), seed=0)


def test_unreadable_images_are_counted_as_failures_not_skipped(tiny_models, tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), "red").save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    mllm = MLLM.load(tiny_models["vlm"])
    entries = [
        Item(f"img{i}", str(p), "a", ["a", "b", "c", "d"])
        for i, p in enumerate([good, bad, tmp_path / "missing.png", good])
    ]
    results = evaluate(mllm, "birds", entries, batch_size=2)
    assert [r["image"] for r in results] == ["img0", "img1", "img2", "img3"]
    assert [r["predicted_raw"] == UNREADABLE for r in results] == [False, True, True, False]
    assert all(r["predicted"] is None and not r["correct"] for r in results[1:3])
    assert results[0]["predicted_raw"] == results[3]["predicted_raw"]  # batching and padding do not change answers
    assert score(results)["failure_rate"] >= 0.5


def test_normalised_names():
    assert normalise("Black_footed_Albatross") == normalise("black-footed albatross ") == "black footed albatross"


def clusters(n_classes=4, per_class=20, d=16, spread=0.05, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.eye(d)[:n_classes] * 3
    labels = np.repeat(np.arange(n_classes), per_class)
    return centres[labels] + spread * rng.normal(size=(len(labels), d)), labels, centres


def test_probe_separates_separable_clusters_and_not_noise():
    x, y, _ = clusters()
    assert an.probe_accuracy(x[::2], y[::2], x[1::2], y[1::2]) == 1.0
    noise = np.random.default_rng(1).normal(size=x.shape)
    assert an.probe_accuracy(noise[::2], y[::2], noise[1::2], y[1::2]) < 0.6


def test_alignment_and_gap_of_known_embeddings():
    x, y, centres = clusters(spread=0.0)
    assert an.alignment_quality(x, y, centres) == pytest.approx(1.0)
    assert an.modality_gap(x, x) == pytest.approx(0.0)
    assert an.alignment_quality(x, y, np.roll(centres, 1, axis=0)) == pytest.approx(0.0)  # orthogonal names
    assert an.modality_gap(np.array([[1.0, 0]]), np.array([[0, 1.0]])) == pytest.approx(np.sqrt(2))


def test_distances_and_variances_of_known_embeddings():
    x, y, _ = clusters(spread=0.0)
    assert an.inter_class_distance(x, y) == pytest.approx(1.0)  # orthogonal centroids
    assert an.intra_class_variance(x, y) == pytest.approx(0.0)
    spread, _, _ = clusters(spread=0.5)
    assert an.intra_class_variance(spread, y) > 0.1
    assert an.inter_class_distance(np.ones_like(x), y) == pytest.approx(0.0, abs=1e-12)  # every class in one place


def test_confusion_matrix_counts_failures_apart():
    m = an.confusion(["a", "a", "b", "b"], ["a", "b", "b", None], ["a", "b"])
    assert m.tolist() == [[1, 1, 0], [0, 1, 1]]


def test_plots_are_written(tmp_path):
    x, y, centres = clusters()
    an.plot_tsne({"objects": (x, y), "categories": (centres, np.arange(4))}, "t", tmp_path / "t.png")
    an.plot_confusion(an.confusion(["a"], ["a"], ["a", "b"]), ["a", "b"], "c", tmp_path / "c.png")
    assert Image.open(tmp_path / "t.png").size[0] > 100 and Image.open(tmp_path / "c.png").size[0] > 100


def test_predict_end_to_end(tiny_models, tmp_path):
    img = tmp_path / "bird.png"
    Image.new("RGB", (64, 64), "blue").save(img)
    proc = cli(
        "predict",
        "--model",
        str(tiny_models["vlm"]),
        str(img),
        str(img),
        "--choices",
        "red bird,blue bird,green bird",
        "--json",
        "--super-category",
        "bird",
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["image"] for line in lines] == [str(img)] * 2
    assert all(line["predicted"] in (None, "red bird", "blue bird", "green bird") for line in lines)
    assert lines[0] == lines[1]
    proc = cli("predict", "--model", str(tiny_models["vlm"]), str(img), "--open")
    assert proc.returncode == 0 and proc.stdout.startswith(str(img))


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "{missing}", "{img}", "--choices", "a,b"], "no model folder"),
        (["--model", "{vlm}", "{bad}", "--choices", "a,b"], "cannot read this image"),
        (["--model", "{vlm}", "{img}", "--choices", "a"], "at least two --choices"),
    ],
)
def test_predict_errors_are_one_line(tiny_models, tmp_path, args, message):
    img, bad = tmp_path / "x.png", tmp_path / "bad.png"
    Image.new("RGB", (64, 64)).save(img)
    bad.write_text("no")
    names = {"missing": tmp_path / "nope", "img": img, "bad": bad, "vlm": tiny_models["vlm"]}
    proc = cli("predict", *[a.format(**names) for a in args])
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr
