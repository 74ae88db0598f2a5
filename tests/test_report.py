"""`finedefics report`: experiments matched to the paper's rows by their switches."""

import json
import re
import shlex

import numpy as np
import yaml
from conftest import REPO
from typer.testing import CliRunner

from finedefics.cli import app
from finedefics.report import (
    EXTRA,
    OTHER_BASES,
    TABLES,
    Row,
    Table,
    committed_params,
    experiments,
    family_gains,
    find,
    main_table,
    table_md,
    used_commits,
)

DEFAULT_TREE = yaml.safe_load((REPO / "params.yaml").read_text())


def exp(name, overrides, accuracy, timestamp, state="success", low=None, high=None):
    params = json.loads(json.dumps(DEFAULT_TREE))
    for dotted, value in overrides.items():
        *path, last = dotted.split(".")
        node = params
        for key in path:
            node = node[key]
        node[last] = value
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


def test_find_takes_the_newest_finished_experiment_with_exactly_those_switches():
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
    assert [e.name for e in runs] == ["both", "new", "old", "types"]  # running ones are left out
    assert [e.name for e in find(runs, default, {"negatives": "simple"})] == ["new"]
    assert [e.name for e in find(runs, default, {"attributes.types": ["shape", "texture", "size"]})] == ["types"]
    assert find(runs, default, {"attributes.types": ["color", "texture", "size"]}) == []
    assert find(runs, default, {}) == []
    shorter = experiments(show(exp("shorter", {"train.stage2.epochs": 2}, 0.5, "t")))
    assert find(shorter, default, {}) == []  # any other param differing keeps it out of the rows


def test_find_gives_one_experiment_per_training_seed_newest_first_ordered_by_seed():
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
    assert [e.name for e in find(runs, default, {})] == ["s0", "s1", "s2"]
    assert [e.name for e in find(runs, default, {"negatives": "simple"})] == ["simple-s1"]


def test_the_commits_listed_are_those_of_the_experiments_the_rows_read():
    default = committed_params(REPO / "params.yaml")
    other = {"rev": "b" * 40, "name": "old", "experiments": [exp("x", {"negatives": "simple"}, 0.5, "t2")]}
    unused = {"rev": "c" * 40, "name": "older", "experiments": [exp("y", {"world.categories": 5}, 0.5, "t3")]}
    runs = experiments([*show(exp("d", {}, 0.5, "t1")), other, unused])
    assert used_commits(runs, default, [{}]) == ["aaaaaaa"]
    assert used_commits(runs, default, [{}, {"negatives": "simple"}]) == ["aaaaaaa", "bbbbbbb"]


def seeded_scores(offsets: dict[str, float], n: int = 400):
    """Per-image scores per experiment: a shared base rate per image, shifted per experiment."""
    base = np.random.default_rng(0).uniform(0.2, 0.8, n)
    rng = np.random.default_rng(1)
    drawn = {name: (rng.uniform(size=n) < base + shift).astype(float) for name, shift in offsets.items()}

    def scores(e, model_dir):
        key = e.name if model_dir == "finedefics" else model_dir
        return [{f"i{k}": v for k, v in enumerate(drawn[key])}] * 2

    return scores


def test_a_row_is_resolved_only_when_its_paired_difference_survives_holm_with_seeds():
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
    lines = table_md(table, runs, default, ["toy-bird", "toy-flower"], seeded_scores(offsets)).splitlines()
    row = lambda label: [c.strip() for c in next(x for x in lines if x.startswith(f"| {label} |")).split("|")[1:-1]]  # noqa: E731
    far, near, one, base, ours = (row(label) for label in ("far", "near", "one seed", "base", "ours"))
    assert far[3] == "70.0 [70.0, 70.0]" and far[4] == "3" and far[7].startswith("yes (Holm p")
    low, high = (float(v) for v in far[5].split(" ", 1)[1].strip("[]").split(", "))
    assert 0 < low < 20 < high  # the +20 points drawn, paired
    low, high = (float(v) for v in near[5].split(" ", 1)[1].strip("[]").split(", "))
    assert near[7].startswith("no (Holm p") and low < 0 < high  # independent draws of one rate
    assert one[3] == "70.0 [66.0, 74.0]" and one[4] == "1" and one[7] == "no (one seed)"
    assert base[7].startswith("yes") and base[5].startswith("-") and base[9] == "`d0` (base model)"
    assert ours[5] == "(the reference)" and ours[9] == "`d0`, `d1`, `d2`"


def test_table2_pairs_the_base_and_both_clips_with_the_final_model():
    """Table 2's CLIP rows come from the one default experiment that has `metrics/eval_clip.json` (the
    CLIPs do not depend on the training seed) and are paired with every seed of the final model."""
    default = committed_params(REPO / "params.yaml")
    runs = [exp(f"d{s}", {"train.seed": s}, 0.5, f"t{s}") for s in range(3)]
    clip = {"toy-bird": {"accuracy": 0.7}, "toy-flower": {"accuracy": 0.7}, "average": {"accuracy": 0.7}}
    weak = {"toy-bird": {"accuracy": 0.5}, "toy-flower": {"accuracy": 0.5}, "average": {"accuracy": 0.5}}
    runs[2]["revs"][0]["data"]["metrics"]["metrics/eval_clip.json"] = {"data": {"mining": clip, "baseline": weak}}
    offsets = {f"d{s}": 0.0 for s in range(3)} | {"base": -0.3, "clip/mining": 0.2, "clip/baseline": -0.2}
    text = main_table(experiments(show(*runs)), default, ["toy-bird", "toy-flower"], seeded_scores(offsets))
    lines = text.splitlines()
    row = lambda label: [c.strip() for c in next(x for x in lines if x.startswith(f"| {label}")).split("|")[1:-1]]  # noqa: E731
    mining, baseline = row("CLIP that mined"), row("CLIP (zero-shot")
    assert mining[3] == "70.0" and mining[4] == "1" and mining[7].startswith("yes (Holm p")
    assert float(mining[5].split(" ")[0]) > 10  # +20 points drawn, paired with each of the 3 seeds
    assert baseline[3] == "50.0" and baseline[5].startswith("-") and baseline[7].startswith("yes (Holm p")
    assert row("**Finedefics")[5] == "(the reference)" and row("Base model")[7].startswith("yes")


def test_table4_pairs_each_family_with_its_own_zero_shot_base():
    """The paper's Table 4 claim is a gain over the family's own base: each trained seed is paired with
    that base on the same test images, not with the default."""
    default = committed_params(REPO / "params.yaml")
    llava = [exp(f"l{s}", {"train.seed": s, "model.base": "tiny-llava"}, 0.55, f"t{s}") for s in range(3)]
    qwen = [exp(f"q{s}", {"train.seed": s, "model.base": "tiny-qwen2.5-vl"}, 0.25, f"t{s}") for s in range(3)]
    offsets = {f"l{s}": 0.3 for s in range(3)} | {f"q{s}": 0.0 for s in range(3)} | {"base": 0.0}
    runs = experiments(show(*llava, *qwen))
    text = family_gains(OTHER_BASES, runs, default, ["toy-bird", "toy-flower"], seeded_scores(offsets))
    lines = {
        x.split("|")[1].strip(): [c.strip() for c in x.split("|")[1:-1]]
        for x in text.splitlines()
        if x.startswith("| ")
    }
    gained, flat = lines["LLaVA 1.5"], lines["Qwen2.5-VL"]
    assert gained[1:4] == ["25.0", "55.0 [55.0, 55.0]", "3"] and gained[7] == "+13.97"
    low, high = (float(v) for v in gained[4].split(" ", 1)[1].strip("[]").split(", "))
    assert gained[4].startswith("+") and 10 < low < 30 < high and gained[6].startswith("yes (Holm p")
    low, high = (float(v) for v in flat[4].split(" ", 1)[1].strip("[]").split(", "))
    assert low < 0 < high and flat[6].startswith("no (Holm p") and flat[7] == "not in the paper"


def test_report_fills_cells_and_marks_missing_ones(tmp_path):
    saved = tmp_path / "show.json"
    saved.write_text(
        json.dumps(show(exp("default", {}, 0.5, "t1"), exp("simple", {"negatives": "simple"}, 0.375, "t2")))
    )
    out = tmp_path / "results.md"
    result = CliRunner().invoke(
        app, ["report", "--exp-show", str(saved), "--out", str(out), "--params", str(REPO / "params.yaml")]
    )
    assert result.exit_code == 0, result.output
    lines = out.read_text().splitlines()
    row = lambda label: next(line for line in lines if line.startswith(f"| {label} |"))  # noqa: E731
    assert row("Simple Neg.").startswith("| Simple Neg. | 37.5 | 37.5 | 37.5 | 1 | ")
    assert row("Simple Neg.").endswith("| 74.26 | `simple` |")
    assert row("**Hard Neg. (ours)**").startswith("| **Hard Neg. (ours)** | 50.0 | 50.0 | 50.0 | 1 | (the reference) |")
    assert row("Original (base model, zero-shot)").endswith("| 65.95 | `default` (base model) |")
    assert row("One stage") == "| One stage | missing | missing | missing | 0 |  |  |  | 25.42 | missing |"


def test_report_refuses_an_unreadable_exp_show(tmp_path):
    bad = tmp_path / "show.json"
    bad.write_text("not json")
    result = CliRunner().invoke(
        app, ["report", "--exp-show", str(bad), "--out", str(tmp_path / "r.md"), "--params", str(REPO / "params.yaml")]
    )
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
