"""`finedefics report`: experiments matched to the paper's rows by their switches."""

import json
import re
import shlex

import yaml
from conftest import REPO
from typer.testing import CliRunner

from finedefics.cli import app
from finedefics.report import EXTRA, TABLES, committed_params, experiments, find

DEFAULT_TREE = yaml.safe_load((REPO / "params.yaml").read_text())


def exp(name, overrides, accuracy, timestamp, state="success"):
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
                "average": {"accuracy": accuracy},
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
    assert find(runs, default, {"negatives": "simple"}).name == "new"
    assert find(runs, default, {"attributes.types": ["shape", "texture", "size"]}).name == "types"
    assert find(runs, default, {"attributes.types": ["color", "texture", "size"]}) is None
    assert find(runs, default, {}) is None
    shorter = experiments(show(exp("shorter", {"train.stage2.epochs": 6}, 0.5, "t")))
    assert find(shorter, default, {}) is None  # any other param differing keeps it out of the rows


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
    assert row("Simple Neg.") == "| Simple Neg. | 37.5 | 37.5 | 37.5 | 74.26 | `simple` |"
    assert row("**Hard Neg. (ours)**") == "| **Hard Neg. (ours)** | 50.0 | 50.0 | 50.0 | 76.84 | `default` |"
    assert row("Original (base model, zero-shot)").endswith("| 25.0 | 65.95 | `default` (base model) |")
    assert row("One stage") == "| One stage | missing | missing | missing | 25.42 | missing |"


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
    assert len(queued) == 20 and {} in queued
    for table in (*TABLES, *EXTRA):
        for row in table.rows:
            assert row.overrides in queued, (table.title, row.label)
