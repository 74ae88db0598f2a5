"""FOCI evaluation, scoring, the representation analyses and `finedefics predict`."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import stage_env, wilson_by_hand
from PIL import Image

from finedefics.evaluate import analysis as an
from finedefics.evaluate.mc import (
    UNREADABLE,
    Item,
    evaluate,
    items,
    normalise,
    positions,
    score,
    score_results,
    seen_unseen,
)
from finedefics.models.mllm import MLLM
from finedefics.protocol import foci_answer, mc_question, parse_choice, query


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
    "family,output,want",
    [
        # FOCI's Idefics2 wrapper removes "Answer: " before reading the first letter
        ("idefics2", "Answer: C", "C"),
        ("idefics2", "C.", "C"),
        ("idefics2", "(C)", None),  # FOCI reads the first character only
        ("idefics2", " c", "C"),
        ("idefics2", "Assistant: B", None),  # FOCI keeps the text before a repeated marker: nothing
        ("idefics2", "B\nAssistant: C", "B"),
        ("idefics2", "answer: C", "A"),  # the removal is case-sensitive, as in FOCI
        ("idefics2", "The answer is B", None),
        ("idefics2", "E", None),
        ("idefics2", "", None),
        # LLaVA-1.5: FOCI keeps what follows "ASSISTANT:" and does not remove "Answer: "
        ("llava", "Answer: C", "A"),
        ("llava", "C.", "C"),
        ("llava", "(C)", None),
        ("llava", " c", "C"),
        ("llava", "Assistant: B", "A"),  # not LLaVA's marker: the first letter, literally
        ("llava", "D ASSISTANT: A", "D"),
        ("llava", "ASSISTANT: B", None),
        ("llava", "1", None),
        # Qwen2.5-VL: FOCI keeps what precedes a repeated "assistant" marker
        ("qwen2_5_vl", "B", "B"),
        ("qwen2_5_vl", "C. Sooty_Albatross", "C"),
        ("qwen2_5_vl", "Answer: C", "A"),
        ("qwen2_5_vl", "D\nassistant\nA", "D"),
        ("qwen2_5_vl", "assistant\nB", None),
    ],
)
def test_parser_reads_answers_as_foci_does_per_family(family, output, want):
    assert parse_choice(output, family) == want


def test_parser_respects_the_number_of_options():
    assert parse_choice("C", "idefics2", n_options=2) is None and parse_choice("B", "idefics2", n_options=2) == "B"


def foci_file(predictions: list[dict], **metrics) -> dict:
    """A results file as FOCI's `benchmark/evaluate.py` writes it."""
    config = {"dataset": "cub", "model": "x", "prompt_query": "Which of these birds is shown in the image?"}
    config |= {"choice_enumeration": "ABCD", "task": "mc"}
    return {"metrics": metrics, "predictions": predictions, "config": config}


def foci_prediction(image: str, shown: list[str], truth: str, raw: str) -> dict:
    """One entry as FOCI writes it: the chosen name, or "NA ### " and the raw output."""
    letter = parse_choice(raw, "idefics2")
    predicted = shown["ABCD".index(letter)] if letter else f"NA ### {raw}"
    return {"image": image, "predicted": predicted, "predicted_raw": raw, "correct": truth, "options": shown}


def test_score_reads_a_results_file_written_by_foci(tmp_path):
    shown = ["Laysan_Albatross", "Sooty_Albatross", "Crested_Auklet", "Black_footed_Albatross"]
    answers = {"a.jpg": "A", "b.jpg": "Answer: D", "c.jpg": "I think it is", "d.jpg": "B", "e.jpg": "(A)"}
    truths = {"a.jpg": "Laysan_Albatross", "b.jpg": "Black_footed_Albatross", "c.jpg": "Crested_Auklet"}
    truths |= {"d.jpg": "Crested_Auklet", "e.jpg": "Laysan_Albatross"}
    predictions = [foci_prediction(i, shown, truths[i], raw) for i, raw in answers.items()]
    assert predictions[2]["predicted"] == "NA ### I think it is" and predictions[1]["predicted"] == shown[3]
    f = tmp_path / "cub--HuggingFaceM4_idefics2-8b.json"
    f.write_text(json.dumps(foci_file(predictions, generation_failures=0.4, accuracy=0.4), indent=4))
    proc = cli("score", str(f))
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    low, high = wilson_by_hand(2, 5)
    assert got == {
        "accuracy": 0.4,
        "failure_rate": 0.4,
        "n": 5,
        "predictions": 5,
        "ci_low": pytest.approx(low),
        "ci_high": pytest.approx(high),
    }
    assert proc.stderr == ""  # its own metrics block agrees
    f.write_text("{not json")
    proc = cli("score", str(f))
    assert proc.returncode == 2 and "not a FOCI results file" in proc.stderr


def test_score_takes_several_files_and_warns_when_a_metrics_block_disagrees(tmp_path):
    shown = list("abcd")
    one = [foci_prediction("x.jpg", shown, "a", "A"), foci_prediction("y.jpg", shown, "b", "A")]
    (tmp_path / "one.json").write_text(json.dumps(foci_file(one, generation_failures=0.0, accuracy=0.9)))
    (tmp_path / "two.json").write_text(json.dumps(foci_file(one[:1], generation_failures=0.0, accuracy=1.0)))
    proc = cli("score", str(tmp_path / "one.json"), str(tmp_path / "two.json"))
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got[str(tmp_path / "one.json")]["accuracy"] == 0.5 and got[str(tmp_path / "two.json")]["accuracy"] == 1.0
    assert "metrics block says accuracy 0.9" in proc.stderr


def test_score_rejects_booleans_in_correct_and_other_tasks():
    with pytest.raises(ValueError, match="'correct' \\(the ground-truth class name\\)"):
        score([{"image": "a", "predicted": "x", "correct": True}])
    with pytest.raises(ValueError, match="only FOCI's multiple-choice task"):
        score_results({"predictions": [], "config": {"task": "yn"}})
    with pytest.raises(ValueError, match="no predictions"):
        score([])


def test_score_results_reads_a_foci_file_its_list_or_a_config_without_a_task():
    shown = list("abcd")
    predictions = [foci_prediction("x", shown, "a", "A"), foci_prediction("y", shown, "b", "C")]
    want = score(predictions)
    assert (want.accuracy, want.failure_rate, want.n, want.predictions) == (0.5, 0.0, 2, 2)
    assert score_results(foci_file(predictions)) == want
    assert score_results(predictions) == want
    assert score_results({"predictions": predictions, "config": {"dataset": "cub"}}) == want  # FOCI's default task
    assert score_results({"predictions": predictions, "config": "mc?"}) == want


FILE = "expected an object with a list 'predictions' (or that list), got "
ENTRY = (
    "expected an object with 'image', 'predicted' (a class name, or 'NA ### ' and the raw output) and "
    "'correct' (the ground-truth class name) as strings, got "
)


@pytest.mark.parametrize(
    "data,message",
    [
        ({"predictions": {"a": 1}}, FILE + 'an object {"predictions": {"a": 1}}'),
        ("x" * 100, FILE + 'a string "' + "x" * 79 + "..."),  # cut at 80 characters
        ("y" * 78, FILE + 'a string "' + "y" * 78 + '"'),  # 80 characters: whole
        (None, FILE + "null"),
        (True, FILE + "a boolean true"),
        (3.5, FILE + "a number 3.5"),
        ([[1]], "prediction 0: " + ENTRY + "a list [1]"),
        ([{"image": "a", "predicted": "x", "correct": "y"}, 7], "prediction 1: " + ENTRY + "a number 7"),
        (
            {"predictions": [], "config": {"task": "yn"}},
            "config.task is 'yn': only FOCI's multiple-choice task ('mc') is scored",
        ),
        ({"predictions": []}, "no predictions to score"),
    ],
)
def test_an_unreadable_results_file_is_one_line_naming_what_it_got(data, message):
    with pytest.raises(ValueError) as info:
        score_results(data)
    assert str(info.value) == message


def test_score_takes_a_list_only():
    with pytest.raises(ValueError) as info:
        score({"predictions": []})
    assert str(info.value) == 'expected a list of predictions, got an object {"predictions": []}'


def test_the_parser_of_an_unknown_family_keeps_the_whole_answer():
    assert foci_answer("  C. Sooty Albatross ", "other") == "C. Sooty Albatross"
    assert foci_answer("Answer: C", "llava") == "Answer: C" and foci_answer("Answer: C", "idefics2") == "C"


def test_an_image_in_several_option_orders_counts_once_in_n():
    shown = list("abcd")
    predictions = [foci_prediction("x", shown, "a", "A"), foci_prediction("x", shown[::-1], "a", "A")]
    predictions.append(foci_prediction("y", shown, "b", "B"))
    s = score(predictions)
    assert (s.accuracy, s.n, s.predictions) == (pytest.approx(2 / 3), 2, 3)
    assert (s.ci_low, s.ci_high) == pytest.approx(wilson_by_hand(1.5, 2))


def test_accuracy_is_split_between_seen_and_unseen_classes_by_ground_truth():
    shown = list("abcd")
    predictions = [
        foci_prediction("x", shown, "a", "A"),  # seen, right
        foci_prediction("y", shown, "b", "A"),  # seen, wrong
        foci_prediction("z", shown, "c", "C"),  # unseen, right
        foci_prediction("w", shown, "c", "D"),  # unseen, wrong
        foci_prediction("v", shown, "d", "D"),  # unseen, right
    ]
    split = seen_unseen(predictions, {"c", "d"})
    assert split == {"seen_accuracy": pytest.approx(1 / 2), "unseen_accuracy": pytest.approx(2 / 3)}
    assert seen_unseen(predictions, set()) == {}


def test_position_audit_shows_a_model_that_always_answers_a():
    shown = [list("abcd"), list("bacd"), list("bcad"), list("bcda")]  # the truth "a" at A, B, C, D
    always_a = [foci_prediction(f"i{k}", s, "a", "A") for k, s in enumerate(shown)]
    audit = positions(always_a * 2)
    assert [audit[letter]["chosen"] for letter in "ABCD"] == [1.0, 0.0, 0.0, 0.0]
    assert [audit[letter]["truth"] for letter in "ABCD"] == [0.25] * 4
    assert [audit[letter]["accuracy"] for letter in "ABCD"] == [1.0, 0.0, 0.0, 0.0]
    failed = positions([foci_prediction("i", list("abcd"), "a", "no idea")])
    assert failed["A"] == {"truth": 1.0, "chosen": 0.0, "accuracy": 0.0} and failed["B"]["accuracy"] is None


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
    partial = items(
        {"a": [{"image": "i1", "options": ["a", "e"], "groundtruth": "a"}]}, {}, list("ab"), 0, partial=True
    )
    assert sorted(partial[0].options) == ["a", "e"]  # a real dataset with some of its classes: FOCI's set as given
    with pytest.raises(ValueError, match="'e', which is not a class of this dataset"):
        items({"e": [{"image": "i1", "options": ["e", "a"], "groundtruth": "e"}]}, {}, list("ab"), 0, partial=True)


def test_each_image_is_shown_in_k_seeded_orders_the_first_independent_of_k():
    options = {"a": [{"image": f"i{n}", "options": list("abcd"), "groundtruth": "a"} for n in range(50)]}
    three = items(options, {}, list("abcd"), seed=0, permutations=3)
    assert [(i.image, i.permutation) for i in three[:4]] == [("i0", 0), ("i0", 1), ("i0", 2), ("i1", 0)]
    assert [i for i in three if i.permutation == 0] == items(options, {}, list("abcd"), seed=0, permutations=1)
    assert sum(a.options != b.options for a, b in zip(three[::3], three[1::3])) > 30  # orders differ
    assert items(options, {}, list("abcd"), seed=0, permutations=3) == three  # and are seeded


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
    assert all(r["predicted"] == f"NA ### {UNREADABLE}" and r["correct"] == "a" for r in results[1:3])
    assert results[0]["predicted_raw"] == results[3]["predicted_raw"]  # batching and padding do not change answers
    assert score(results).failure_rate >= 0.5


@pytest.mark.parametrize("ends", ["at once", "after one token", "model's own", "ties"])
def test_one_pass_scoring_writes_what_generation_writes(tiny_models, tmp_path, monkeypatch, ends):
    """Multiple-choice answers scored in one pass (`MLLM.one_token_answers`) against generating every
    answer: identical FOCI predictions. The turn ends "at once" (every token ends it), "after one
    token" (every token but the first answers' ends it: the cached second step decides), at the
    tiny model's own end token (its answers run on: generated), or every arg-max is a "tie" (every
    batch generated)."""
    paths = []
    for colour in ("red", "green", "blue", "white", "black"):
        paths.append(tmp_path / f"{colour}.png")
        Image.new("RGB", (64, 64), colour).save(paths[-1])
    options = {p.stem: [{"image": p.stem, "groundtruth": "a", "options": list("abcd")}] for p in paths}
    entries = items(options, {p.stem: str(p) for p in paths}, list("abcd"), seed=0, permutations=3)
    mllm = MLLM.load(tiny_models["vlm"])
    vocab = range(len(mllm.tokenizer))
    if ends == "at once":
        mllm.model.generation_config.eos_token_id = list(vocab)
    if ends == "after one token":
        prompts = [mllm.prompt(mc_question(query("birds"), e.options)) for e in entries]
        inputs = mllm.processor(
            text=prompts, images=[[Image.open(e.path)] for e in entries], return_tensors="pt", padding=True
        )
        firsts = set(mllm.model.generate(**inputs, max_new_tokens=1, do_sample=False)[:, -1].tolist())
        mllm.model.generation_config.eos_token_id = [i for i in vocab if i not in firsts]
    if ends == "ties":
        monkeypatch.setattr("finedefics.models.mllm.MARGIN", float("inf"))
    generated = []
    generate = mllm.generate
    monkeypatch.setattr(mllm, "generate", lambda *a: generated.append(1) or generate(*a))
    fast = evaluate(mllm, "birds", entries, batch_size=4)
    batches = len(generated)
    assert evaluate(mllm, "birds", entries, batch_size=4, one_pass=False) == fast
    assert len(generated) == batches + 4  # generating only: all 4 batches
    if ends == "after one token":
        assert batches < 4 and all(r["predicted_raw"] for r in fast)  # some batches in one pass; no empty answer
    else:
        assert batches == {"at once": 0, "model's own": 4, "ties": 4}[ends]


def test_qwen_answers_its_chat_template_and_writes_foci_predictions(tiny_models, tmp_path):
    """The tiny Qwen2.5-VL evaluates through its ChatML template (the FOCI question in the user turn
    after the image, the answer after "assistant\\n"); every prediction is an option or a failure."""
    image = tmp_path / "a.png"
    Image.new("RGB", (64, 64), "red").save(image)
    mllm = MLLM.load(tiny_models["qwen"])
    prompt = mllm.prompt(mc_question(query("birds"), ["a", "b", "c", "d"]))
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert "<|vision_start|><|image_pad|><|vision_end|>Which of these birds" in prompt
    entries = [Item(f"img{i}", str(image), "a", options) for i, options in enumerate([list("abcd"), list("dcba")])]
    results = evaluate(mllm, "birds", entries, batch_size=2)
    for r in results:
        letter = parse_choice(r["predicted_raw"], "qwen2_5_vl")
        assert r["predicted"] == (r["options"]["ABCD".index(letter)] if letter else "NA ### " + r["predicted_raw"])
    assert score(results).n == 2


def test_normalised_names():
    assert normalise("Black_footed_Albatross") == normalise("black-footed albatross ") == "black footed albatross"


class Scripted:
    """An MLLM stand-in whose greedy answers are given: one per prompt, in order."""

    family = "idefics2"
    answers_in_one_pass = False

    def __init__(self, answers: list[str]):
        self.answers = list(answers)
        self.asked: list[str] = []

    def prompt(self, question: str) -> str:
        return question

    def generate(self, prompts, images, max_new_tokens):
        self.asked += prompts
        self.max_new_tokens = max_new_tokens
        return [self.answers.pop(0) for _ in prompts]


def test_open_set_answers_are_right_only_when_they_name_the_ground_truth(tmp_path):
    """Open-set recognition is scored against each image's own class: a name differing only in
    case, punctuation or underscores is right; another class, a longer answer, an empty one or an
    unreadable image is wrong."""
    from finedefics.evaluate.mc import open_set

    image = tmp_path / "bird.png"
    Image.new("RGB", (64, 64), "red").save(image)
    truths = ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross", "Crested_Auklet", "Least_Auklet"]
    answers = ["black-footed albatross", "Sooty Albatross", "sooty  albatross.", "a crested auklet", ""]
    paths = [str(image)] * 5 + [str(tmp_path / "missing.png")]
    mllm = Scripted(answers)
    results = open_set(mllm, "bird", paths, [*truths, "Least_Auklet"], batch_size=2)
    assert [r["correct"] for r in results] == [True, False, True, False, False, False]
    assert [r["groundtruth"] for r in results] == [*truths, "Least_Auklet"]
    assert [r["predicted_raw"] for r in results] == [*answers, UNREADABLE]
    assert mllm.asked == ["What is the name of the bird in the image?"] * 5  # the unreadable image is not asked
    assert mllm.max_new_tokens == 12  # room for a class name


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
    m = an.confusion(["a", "a", "b", "b"], ["a", "b", "b", "NA ### hmm"], ["a", "b"])
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
