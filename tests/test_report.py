"""`finedefics report`: experiments matched to the paper's rows by their switches."""

import json
import re
import shlex

import numpy as np
import pytest
import yaml
from conftest import REPO, set_dotted
from typer.testing import CliRunner

from finedefics.cli import app
from finedefics.reporting import ledger
from finedefics.reporting.experiments import committed_params, experiments_with, used
from finedefics.reporting.inference import mcnemar_p
from finedefics.reporting.ledger import experiments
from finedefics.reporting.paper import EXTRA, OTHER_BASES, TABLES, Row, Table
from finedefics.reporting.results import alignment_table, family_gains, main_table, render, table_md

DEFAULT_TREE = yaml.safe_load((REPO / "params.yaml").read_text())


def exp(name, overrides, accuracy, timestamp, state="success", low=None, high=None):
    params = json.loads(json.dumps(DEFAULT_TREE))
    for dotted, value in overrides.items():
        set_dotted(params, dotted, value, create=False)
    metrics = {
        "metrics/eval.json": {
            "data": {
                "toy-bird": {"accuracy": accuracy},
                "toy-flower": {"accuracy": accuracy},
                "average": {"accuracy": accuracy}
                | ({"accuracy_low": low, "accuracy_high": high} if low is not None else {}),
            }
        },
        "metrics/eval_base.json": {"data": {"average": {"accuracy": 0.25}}},
    }
    data = {"timestamp": timestamp, "params": {"params.yaml": {"data": params}}, "metrics": metrics}
    return {
        "name": name,
        "executor": {"state": state},
        "revs": [{"rev": name * 3, "name": name, "data": data, "error": None}],
    }


def show(*exps):
    return [
        {"rev": "workspace", "name": None, "experiments": None},
        {"rev": "a" * 40, "name": "main", "experiments": list(exps)},
    ]


def test_a_row_reads_the_newest_finished_experiment_with_exactly_those_switches():
    default = committed_params(REPO / "params.yaml")
    runs = experiments(
        show(
            exp("old", {"negatives": "simple"}, 0.5, "2026-01-01T00:00:00"),
            exp("new", {"negatives": "simple"}, 0.6, "2026-01-02T00:00:00"),
            exp("both", {"negatives": "simple", "align.objective": "obj-cat"}, 0.7, "2026-01-03T00:00:00"),
            exp("running", {"negatives": "simple"}, 0.9, "2026-01-04T00:00:00", state="running"),
            exp("types", {"attributes.types": ["shape", "texture", "size"]}, 0.4, "2026-01-01T00:00:00"),
        )
    )
    assert [e.name for e in runs] == ["both", "new", "types", "old"]  # running ones left out; ties by rev
    assert [e.name for e in experiments_with(runs, default, {"negatives": "simple"})] == ["new"]
    assert [e.name for e in experiments_with(runs, default, {"attributes.types": ["shape", "texture", "size"]})] == [
        "types"
    ]
    assert experiments_with(runs, default, {"attributes.types": ["color", "texture", "size"]}) == []
    assert experiments_with(runs, default, {}) == []
    shorter = experiments(show(exp("shorter", {"train.stage2.epochs": 2}, 0.5, "t")))
    assert experiments_with(shorter, default, {}) == []  # any other param differing keeps it out of the rows


def test_a_row_reads_one_experiment_per_training_seed_newest_first_ordered_by_seed():
    default = committed_params(REPO / "params.yaml")
    runs = experiments(
        show(
            exp("s2", {"train.seed": 2}, 0.5, "2026-01-01T00:00:00"),
            exp("s0-old", {}, 0.5, "2026-01-01T00:00:00"),
            exp("s0", {}, 0.5, "2026-01-03T00:00:00"),
            exp("s1", {"train.seed": 1}, 0.5, "2026-01-02T00:00:00"),
            exp("simple-s1", {"train.seed": 1, "negatives": "simple"}, 0.5, "2026-01-02T00:00:00"),
        )
    )
    assert [e.name for e in experiments_with(runs, default, {})] == ["s0", "s1", "s2"]
    assert [e.name for e in experiments_with(runs, default, {"negatives": "simple"})] == ["simple-s1"]


def test_the_commits_listed_are_those_of_the_experiments_the_rows_read():
    default = committed_params(REPO / "params.yaml")
    other = {"rev": "b" * 40, "name": "old", "experiments": [exp("x", {"negatives": "simple"}, 0.5, "t2")]}
    unused = {"rev": "c" * 40, "name": "older", "experiments": [exp("y", {"world.categories": 5}, 0.5, "t3")]}
    runs = experiments([*show(exp("d", {}, 0.5, "t1")), other, unused])
    assert [e.commit for e in used(runs, default, [{}])] == ["a" * 40]
    assert [e.commit for e in used(runs, default, [{}, {"negatives": "simple"}])] == ["a" * 40, "b" * 40]


def seeded_scores(offsets: dict[str, float], n: int = 400, seed_sd: float = 0.0):
    """Per-image scores per experiment: a shared base rate per image, shifted per experiment by its offset
    and, with `seed_sd`, by a drawn training-seed effect."""
    base = np.random.default_rng(0).uniform(0.2, 0.8, n)
    rng = np.random.default_rng(1)
    drawn = {
        name: (rng.uniform(size=n) < base + shift + rng.normal(0, seed_sd)).astype(float)
        for name, shift in offsets.items()
    }

    def scores(e, model_dir):
        key = e.name if model_dir == "finedefics" else model_dir
        return [{f"i{k}": v for k, v in enumerate(drawn[key])}] * 2

    scores.drawn = drawn
    return scores


def cells(text: str, label: str) -> list[str]:
    line = next(x for x in text.splitlines() if x.startswith(f"| {label}"))
    return [c.strip() for c in line.split("|")[1:-1]]


def interval(text: str) -> tuple[float, float]:
    low, high = text.split(" ", 1)[1].strip("[]").split(", ")
    return float(low), float(high)


def test_a_row_is_resolved_only_when_its_seed_level_test_survives_holm():
    default = committed_params(REPO / "params.yaml")
    runs = experiments(
        show(
            *(exp(f"d{s}", {"train.seed": s}, 0.5, f"t{s}") for s in range(3)),
            *(exp(f"far{s}", {"train.seed": s, "negatives": "simple"}, 0.7, f"t{s}") for s in range(3)),
            *(exp(f"near{s}", {"train.seed": s, "negatives": "none"}, 0.5, f"t{s}") for s in range(3)),
            exp("one", {"align.objective": "obj-cat"}, 0.7, "t", low=0.66, high=0.74),
        )
    )
    offsets = {f"d{s}": 0.0 for s in range(3)} | {f"far{s}": 0.2 for s in range(3)}
    offsets |= {f"near{s}": 0.0 for s in range(3)} | {"one": 0.2, "base": -0.3}
    table = Table(
        "t",
        (
            Row("far", None, {"negatives": "simple"}),
            Row("near", None, {"negatives": "none"}),
            Row("one seed", None, {"align.objective": "obj-cat"}),
            Row("base", None, model="base"),
            Row("ours", None),
        ),
    )
    scores = seeded_scores(offsets)
    text = table_md(table, runs, default, ["toy-bird", "toy-flower"], scores)
    far, near, one, base, ours = (cells(text, label) for label in ("far", "near", "one seed", "base", "ours"))
    # Method, bird, flower, Avg., seeds, diff, test, resolved, McNemar, paper, experiments
    assert far[3] == "70.0 (identical seeds)" and far[4] == "3" and far[7].startswith("yes (Holm p")
    assert far[6] == "paired t (seeds 0, 1, 2)"
    low, high = interval(far[5])
    assert 0 < low < 20 < high  # the +20 points drawn
    low, high = interval(near[5])
    assert near[7].startswith("no (Holm p") and low < 0 < high  # independent draws of one rate
    assert one[3] == "70.0 [66.0, 74.0]" and one[4] == "1" and one[7] == "no test (one seed)"
    assert base[4] == "1 run" and base[6] == "one-sample t" and base[7].startswith("yes")
    assert base[5].startswith("-") and base[10] == "`d0` (base model)"
    assert ours[5] == "(the reference)" and ours[10] == "`d0`, `d1`, `d2`"
    # McNemar per dataset, a secondary image-level check, on the seed-averaged outcomes of both rows
    row = np.stack([scores.drawn[f"far{s}"] for s in range(3)])
    reference = np.stack([scores.drawn[f"d{s}"] for s in range(3)])
    assert far[8] == ", ".join([f"{mcnemar_p(row, reference):.2g}"] * 2)
    assert "Power: the reference's 3 seeds are identical" in text  # no power from a spread of 0


def test_pairs_by_seed_value_and_says_which_seeds():
    """A row with seeds {0, 2, 5} against the default's {0, 1, 2} is paired on 0 and 2 only."""
    default = committed_params(REPO / "params.yaml")
    runs = experiments(
        show(
            *(exp(f"d{s}", {"train.seed": s}, 0.5, f"t{s}") for s in (0, 1, 2)),
            *(exp(f"r{s}", {"train.seed": s, "negatives": "simple"}, 0.6, f"t{s}") for s in (0, 2, 5)),
        )
    )
    offsets = {"d0": 0.0, "d1": -0.3, "d2": 0.02, "r0": 0.1, "r2": 0.12, "r5": 0.5, "base": 0.0}
    scores = seeded_scores(offsets)
    row = cells(
        table_md(
            Table("t", (Row("r", None, {"negatives": "simple"}), Row("ours", None))),
            runs,
            default,
            ["toy-bird", "toy-flower"],
            scores,
        ),
        "r",
    )
    assert row[6] == "paired t (seeds 0, 2)"
    mean = lambda name: scores.drawn[name].mean()  # noqa: E731
    expected = np.mean([mean("r0") - mean("d0"), mean("r2") - mean("d2")])
    assert float(row[5].split(" ")[0]) == pytest.approx(100 * expected, abs=0.051)


def test_rows_on_other_seed_streams_are_tested_by_welch():
    default = committed_params(REPO / "params.yaml")
    runs = experiments(
        show(
            *(exp(f"d{s}", {"train.seed": s}, 0.5, f"t{s}") for s in range(3)),
            *(exp(f"o{s}", {"train.seed": s, "align.paradigm": "one-stage"}, 0.4, f"t{s}") for s in range(3)),
        )
    )
    offsets = {f"d{s}": 0.05 * s for s in range(3)} | {f"o{s}": -0.1 + 0.04 * s for s in range(3)} | {"base": 0}
    table = Table("t", (Row("one", None, {"align.paradigm": "one-stage"}), Row("ours", None)))
    text = table_md(table, runs, default, ["toy-bird", "toy-flower"], seeded_scores(offsets))
    assert cells(text, "one")[6] == "Welch t"


def test_power_line_reports_the_smallest_resolvable_difference_from_the_reference_spread():
    from finedefics.reporting.inference import ONE_SAMPLE, PAIRED, WELCH, smallest_resolvable

    default = committed_params(REPO / "params.yaml")
    accuracies = [0.482, 0.412, 0.358]
    runs = experiments(show(*(exp(f"d{s}", {"train.seed": s}, a, f"t{s}") for s, a in enumerate(accuracies))))
    table = Table("t", (Row("ours", None),))
    text = table_md(table, runs, default, ["toy-bird", "toy-flower"], lambda e, m: None)
    sd = 100 * np.std(accuracies, ddof=1)
    line = next(x for x in text.splitlines() if x.startswith("Power:"))
    assert f"seed sd is {sd:.1f} points over 3 seeds" in line
    for seeds in (3, 5):
        for design in (PAIRED, WELCH, ONE_SAMPLE):
            assert f"{smallest_resolvable(sd, seeds, design):.1f} ({design})" in line


def test_table2_pairs_the_base_and_both_clips_with_the_final_model():
    """Table 2's CLIP rows come from the one default experiment that has `metrics/eval_clip.json` (the
    CLIPs do not depend on the training seed) and are tested against every seed of the final model."""
    default = committed_params(REPO / "params.yaml")
    runs = [exp(f"d{s}", {"train.seed": s}, 0.5, f"t{s}") for s in range(3)]
    clip = {"toy-bird": {"accuracy": 0.7}, "toy-flower": {"accuracy": 0.7}, "average": {"accuracy": 0.7}}
    weak = {"toy-bird": {"accuracy": 0.5}, "toy-flower": {"accuracy": 0.5}, "average": {"accuracy": 0.5}}
    runs[2]["revs"][0]["data"]["metrics"]["metrics/eval_clip.json"] = {"data": {"mining": clip, "baseline": weak}}
    offsets = {f"d{s}": 0.0 for s in range(3)} | {"base": -0.3, "clip/mining": 0.2, "clip/baseline": -0.2}
    text = main_table(experiments(show(*runs)), default, ["toy-bird", "toy-flower"], seeded_scores(offsets))
    mining, baseline = cells(text, "CLIP that mined"), cells(text, "CLIP (zero-shot")
    assert mining[3] == "70.0" and mining[4] == "1 run" and mining[7].startswith("yes (Holm p")
    assert mining[6] == "one-sample t" and float(mining[5].split(" ")[0]) > 10  # +20 points drawn
    assert baseline[3] == "50.0" and baseline[5].startswith("-") and baseline[7].startswith("yes (Holm p")
    assert cells(text, "**Finedefics")[5] == "(the reference)" and cells(text, "Base model")[7].startswith("yes")


def test_table4_pairs_each_family_with_its_own_zero_shot_base():
    """The paper's Table 4 claim is a gain over the family's own base: each trained seed against that base
    on the same test images, not against the default."""
    default = committed_params(REPO / "params.yaml")
    llava = [exp(f"l{s}", {"train.seed": s, "model.base": "tiny-llava"}, 0.55, f"t{s}") for s in range(3)]
    qwen = [exp(f"q{s}", {"train.seed": s, "model.base": "tiny-qwen2.5-vl"}, 0.25, f"t{s}") for s in range(3)]
    offsets = {f"l{s}": 0.3 for s in range(3)} | {f"q{s}": 0.0 for s in range(3)} | {"base": 0.0}
    runs = experiments(show(*llava, *qwen))
    text = family_gains(OTHER_BASES, runs, default, ["toy-bird", "toy-flower"], seeded_scores(offsets))
    gained, flat = cells(text, "LLaVA 1.5"), cells(text, "Qwen2.5-VL")
    paper = {r.label: r.paper for r in OTHER_BASES.rows}
    assert gained[1:4] == ["25.0", "55.0 (identical seeds)", "3"]
    assert gained[8] == f"{paper['LLaVA 1.5 + A^3'] - paper['LLaVA 1.5']:+.2f}"
    low, high = interval(gained[4])
    assert gained[4].startswith("+") and 10 < low < 30 < high and gained[6].startswith("yes (Holm p")
    assert gained[5] == "one-sample t"
    low, high = interval(flat[4])
    assert low < 0 < high and flat[6].startswith("no (Holm p") and flat[8] == "not in the paper"


def test_table8_shows_the_base_once_and_the_final_model_over_seeds():
    default = committed_params(REPO / "params.yaml")
    shown = [exp(f"d{s}", {"train.seed": s}, 0.5, f"t{s}") for s in range(3)]
    for s, e in enumerate(shown):
        e["revs"][0]["data"]["metrics"]["metrics/analysis.json"] = {
            "data": {
                "base": {"toy-bird": {"alignment": 0.239}, "toy-flower": {"alignment": 0.229}},
                "finedefics": {"toy-bird": {"alignment": 0.2 + 0.1 * s}, "toy-flower": {"alignment": 0.3}},
            }
        }
        e["revs"][0]["data"]["metrics"]["metrics/train_stage1.json"] = {
            "data": {
                f"{k}_{when}": v
                for k in ("alignment", "alignment_margin", "alignment_top1")
                for when, v in (("start", 0.234), ("end", 0.4 + 0.05 * s))
            }
        }
    text = alignment_table(experiments(show(*shown)), default, ["toy-bird", "toy-flower"])
    assert cells(text, "Base model")[1:5] == ["0.239", "0.229", "0.234", "1 run"]  # no [0.239, 0.239]
    ours = cells(text, "**Finedefics")
    assert ours[1].startswith("0.300 [") and ours[4] == "3" and ours[5] == "0.27"
    assert cells(text, "(default)")[2].startswith("0.234 -> 0.450 [")


def test_no_rendered_interval_has_zero_width():
    default = committed_params(REPO / "params.yaml")
    runs = experiments(
        show(
            *(exp(f"d{s}", {"train.seed": s}, 0.5, f"t{s}", low=0.45, high=0.55) for s in range(3)),
            *(exp(f"s{s}", {"train.seed": s, "negatives": "simple"}, 0.5, f"t{s}") for s in range(2)),
        )
    )
    offsets = {f"d{s}": 0.0 for s in range(3)} | {f"s{s}": 0.0 for s in range(2)} | {"base": 0.0}
    offsets |= {"clip/mining": 0.0, "clip/baseline": 0.0}
    text = render(runs, default, ["toy-bird", "toy-flower"], seeded_scores(offsets))
    for low, high in re.findall(r"\[([+-]?\d+\.\d+), ([+-]?\d+\.\d+)\]", text):
        assert low != high, text


def write_ledger(folder, *shown):
    ledger.write(ledger.empty().add(experiments(show(*shown)), []), folder)


def test_report_fills_cells_and_marks_missing_ones(tmp_path):
    write_ledger(
        tmp_path / "ledger", exp("default", {}, 0.5, "t1"), exp("simple", {"negatives": "simple"}, 0.375, "t2")
    )
    out = tmp_path / "results.md"
    args = ["report", "--ledger", str(tmp_path / "ledger"), "--out", str(out), "--params", str(REPO / "params.yaml")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    row = lambda label: next(line for line in lines if line.startswith(f"| {label} |"))  # noqa: E731
    assert row("Simple Neg.").startswith("| Simple Neg. | 37.5 | 37.5 | 37.5 | 1 | missing | ")  # no predictions
    paper = {r.label: f"{r.paper:.2f}" for t in TABLES for r in t.rows if r.paper is not None}  # what the report reads
    assert row("Simple Neg.").endswith(f"| {paper['Simple Neg.']} | `simple` |")
    assert row("**Hard Neg. (ours)**").startswith("| **Hard Neg. (ours)** | 50.0 | 50.0 | 50.0 | 1 | (the reference) |")
    assert row("Original (base model, zero-shot)").endswith(
        f"| {paper['Original (base model, zero-shot)']} | `default` (base model) |"
    )
    assert (
        row("One stage")
        == f"| One stage | missing | missing | missing | 0 |  |  |  |  | {paper['One stage']} | missing |"
    )


def test_report_refuses_a_missing_or_unreadable_ledger(tmp_path):
    args = ["--out", str(tmp_path / "r.md"), "--params", str(REPO / "params.yaml")]
    result = CliRunner().invoke(app, ["report", "--ledger", str(tmp_path / "nowhere"), *args])
    assert result.exit_code == 2 and "not found" in result.output and "finedefics ledger" in result.output
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "experiments.parquet").write_text("not parquet")
    result = CliRunner().invoke(app, ["report", "--ledger", str(tmp_path / "bad"), *args])
    assert result.exit_code == 2 and "error:" in result.output and not (tmp_path / "r.md").exists()


def test_the_queue_covers_every_row_of_the_report():
    queued = []
    for line in (REPO / "scripts" / "ablations.sh").read_text().splitlines():
        if re.match(r"\s*q \S", line):
            words = shlex.split(line, comments=True)
            switches = [w for flag, w in zip(words, words[1:]) if flag == "-S"]
            queued.append({k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in switches)})
    assert len(queued) == 22 and {} in queued
    for table in (*TABLES, *EXTRA):
        for row in table.rows:
            assert row.overrides in queued, (table.title, row.label)


@pytest.mark.parametrize(("p", "text"), [(0.04996, "0.049"), (0.0539, "0.053"), (0.5, "0.500"), (0.00012, "1.2e-04")])
def test_a_printed_p_below_the_threshold_never_reads_as_the_threshold(p, text):
    from finedefics.reporting.markdown import p_text

    assert p_text(p) == text
