"""The experiment ledger: what it stores, how it appends, and that the reports are a pure function of it."""

import json
import shutil

import numpy as np
import pytest
from conftest import REPO
from test_report import exp, show
from typer.testing import CliRunner

from finedefics.cli import app
from finedefics.reporting import ledger

FIXTURE = REPO / "tests" / "fixtures" / "ledger"


def results_file(right: list[list[bool]], unseen: tuple[str, ...] = ()) -> dict:
    """A FOCI results file: image k answered in len(right[k]) option orders, right or wrong as given."""
    predictions = []
    for k, orders in enumerate(right):
        correct = f"class{k % 3}"
        for ok in orders:
            predictions.append({"image": f"img{k}", "predicted": correct if ok else "other", "correct": correct})
    return {"config": {"unseen_classes": list(unseen)}, "predictions": predictions}


def test_outcome_rows_keep_each_option_order_and_the_unseen_classes():
    rows = ledger.outcome_rows("r" * 40, "base", "toy-bird", results_file([[1, 0, 1], [0, 0, 0]], ("class1",)))
    assert list(rows.image) == ["img0", "img1"] and list(rows.unseen) == [False, True]
    assert [list(c) for c in rows.correct] == [[True, False, True], [False, False, False]]


def fake_results(files: dict[tuple[str, str], dict]):
    def read(e, model, dataset):
        return files.get((e.name, model))

    return read


def test_collect_appends_finished_experiments_with_their_predictions_once(tmp_path):
    shown = show(exp("a", {}, 0.5, "t1"), exp("b", {"negatives": "simple"}, 0.5, "t2"), exp("gone", {}, 0.5, "t3"))
    files = {
        ("a", "finedefics"): results_file([[1, 1, 0]] * 4),
        ("a", "base"): results_file([[0, 0, 0]] * 4),
        ("b", "finedefics"): results_file([[1, 1, 1]] * 4),
    }
    book, notes = ledger.collect(ledger.empty(), shown, fake_results(files))
    assert [e.name for e in book.experiments] == ["b", "a"]  # newest first; `gone` has no final predictions
    assert "gone: left out, its final model's predictions are not in DVC's cache" in notes
    assert "a: added (finedefics, base)" in notes
    ledger.write(book, tmp_path)
    again = ledger.read(tmp_path)
    assert again.experiments == book.experiments
    again, notes = ledger.collect(again, shown, fake_results(files))
    assert len(again.experiments) == 2 and len(again.outcomes) == len(book.outcomes)  # nothing twice
    scores = again.scores(["toy-bird", "toy-flower"])
    a = next(e for e in again.experiments if e.name == "a")
    assert scores(a, "finedefics") == [{f"img{k}": pytest.approx(2 / 3) for k in range(4)}] * 2
    assert scores(a, "clip/mining") is None


def test_an_experiment_without_params_is_left_out_not_taken_for_the_default():
    """`dvc exp show` gives no params for an experiment whose params.yaml it cannot read: found by no switch,
    it would pass for the default's seed 0."""
    shown = show(exp("a", {}, 0.5, "t1"), exp("broken", {}, 0.5, "t2"))
    shown[1]["experiments"][1]["revs"][0]["data"]["params"] = {}
    files = {(name, "finedefics"): results_file([[1, 0, 1]]) for name in ("a", "broken")}
    book, notes = ledger.collect(ledger.empty(), shown, fake_results(files))
    assert [e.name for e in book.experiments] == ["a"]
    assert "broken: left out, `dvc exp show` gives no params (datasets) for it" in notes


def test_a_malformed_results_file_is_an_error_not_a_missing_row():
    shown = show(exp("a", {}, 0.5, "t1"))

    def broken(e, model, dataset):
        raise json.JSONDecodeError("Expecting value", "", 0)

    with pytest.raises(json.JSONDecodeError):
        ledger.collect(ledger.empty(), shown, broken)


def test_unseen_scores_keep_only_the_unseen_classes_images():
    shown = show(exp("a", {}, 0.5, "t1"))
    files = {("a", "finedefics"): results_file([[1], [0], [1]], ("class1",))}
    book, _ = ledger.collect(ledger.empty(), shown, fake_results(files))
    (a,) = book.experiments
    assert book.scores(["toy-bird"], unseen=True)(a, "finedefics") == [{"img1": 0.0}]
    assert book.scores(["toy-bird"], unseen=False)(a, "finedefics") == [{"img0": 1.0, "img2": 1.0}]


def test_a_few_hundred_experiments_stay_under_a_few_megabytes(tmp_path):
    """Outcomes are bits: 300 experiments x 4 models x 1,200 test images x 3 option orders."""
    rng = np.random.default_rng(0)
    shown = show(*(exp(f"e{k}", {"train.seed": k}, 0.5, f"t{k:03d}") for k in range(300)))
    files = {}
    for k in range(300):
        for model in ledger.MODELS:
            right = (rng.uniform(size=(600, 3)) < 0.45).tolist()
            files[(f"e{k}", model)] = results_file(right)
    book, _ = ledger.collect(ledger.empty(), shown, fake_results(files))
    ledger.write(book, tmp_path)
    size = sum(p.stat().st_size for p in tmp_path.iterdir())
    assert len(book.outcomes) == 300 * 4 * 2 * 600 and size < 8e6, size


@pytest.mark.parametrize("regimes", [False, True])
def test_the_committed_reports_regenerate_byte_for_byte_from_the_committed_ledger(tmp_path, regimes):
    """What a fresh clone has (no DVC experiments, no cache) is enough: the reports read only the ledger."""
    name = "regimes.md" if regimes else "results.md"
    out = tmp_path / name
    args = ["report", "--ledger", str(REPO / "reports" / "ledger"), "--out", str(out)]
    args += ["--params", str(REPO / "params.yaml"), *(["--regimes"] if regimes else [])]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert out.read_text() == (REPO / "reports" / name).read_text()


@pytest.mark.parametrize("regimes", [False, True])
def test_a_fixture_ledger_regenerates_its_reports_byte_for_byte(tmp_path, regimes):
    """A small committed slice of the ledger (tests/fixtures/ledger) and the reports it gave."""
    name = "regimes.md" if regimes else "results.md"
    copy = tmp_path / "ledger"
    shutil.copytree(FIXTURE, copy)
    out = tmp_path / name
    args = ["report", "--ledger", str(copy), "--out", str(out), "--params", str(REPO / "params.yaml")]
    result = CliRunner().invoke(app, [*args, *(["--regimes"] if regimes else [])])
    assert result.exit_code == 0, result.output
    assert out.read_text() == (FIXTURE.parent / name).read_text()


def test_compare_tests_named_experiments_over_their_seeds(tmp_path):
    rng = np.random.default_rng(3)
    shown, files = [], {}
    for s in range(3):
        for name, overrides, rate in (
            ("d", {}, 0.4),
            ("r", {"negatives": "simple"}, 0.6),
            ("l", {"model.base": "tiny-llava"}, 0.4),
        ):
            shown.append(exp(f"{name}-s{s}", overrides | {"train.seed": s}, rate, f"t{s}"))
            files[(f"{name}-s{s}", "finedefics")] = results_file(
                (rng.uniform(size=(300, 3)) < rate + 0.03 * s).tolist()
            )
    book, _ = ledger.collect(ledger.empty(), show(*shown), fake_results(files))
    ledger.write(book, tmp_path / "ledger")
    base = ["compare", "--ledger", str(tmp_path / "ledger"), "--params", str(REPO / "params.yaml")]
    against = ["--against", "d-s0", "--against", "d-s1", "--against", "d-s2"]
    result = CliRunner().invoke(app, [*base, "r-s0", "r-s1", "r-s2", *against])
    assert result.exit_code == 0, result.output
    assert "switches: negatives" in result.output and "test: paired t (seeds 0, 1, 2)" in result.output
    difference = float(next(x for x in result.output.splitlines() if x.startswith("difference")).split()[2])
    assert 15 < difference < 25 and "resolved (alpha 0.05, uncorrected): yes" in result.output
    welch = CliRunner().invoke(app, [*base, "l-s0", "l-s1", "l-s2", *against])
    assert welch.exit_code == 0 and "test: Welch t" in welch.output and "model.base" in welch.output
    unknown = CliRunner().invoke(app, [*base, "nope", *against])
    assert unknown.exit_code == 2 and "not in" in unknown.output and "nope" in unknown.output
