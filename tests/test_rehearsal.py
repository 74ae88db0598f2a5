"""The rehearsal of the paper config (scripts/rehearse.sh): configs/rehearsal.yaml changes only what
cannot exist on this machine, and the whole paper path runs on the six fixture trees."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import leaves
from real_fixtures import MAKERS

from finedefics.config import load_params
from finedefics.data.prepare import prepare_real
from finedefics.data.real import REAL_DATASETS

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from rehearsal import DATASETS  # noqa: E402

# what a rehearsal may change: model identifiers, dataset paths, the LLM server's URL, sizes that
# scale the work, the process count (every other key, every switch of the paper's form, stays)
ALLOWED = [
    r"model\.(base|clip|clip_baseline)",
    r"attributes\.(discover|extract|summarize)\.model",
    r"datasets\..+",
    r"attributes\.(discover|extract|summarize)\.base_url",
    r"real\.per_class",
    r"attributes\.(discover|extract|summarize)\.max_new_tokens",
    r"attributes\.extract\.shard_size",
    r"attributes\.summarize\.batch_size",
    r"train\.stage[12]\.(epochs|batch_size|per_device_batch_size|warmup_steps)",
    r"train\.(per_device_batch_size|checkpoint_every|num_processes)",
    r"evaluate\.max_new_tokens",
]


def changed_keys(overlay: Path, assignments: list[str] = ()) -> set[str]:
    paper = leaves(load_params(REPO / "configs" / "paper.yaml").model_dump(mode="json"))
    rehearsal = leaves(load_params(overlay, assignments).model_dump(mode="json"))
    return {k for k in paper.keys() | rehearsal.keys() if paper.get(k) != rehearsal.get(k)}


def disallowed(keys: set[str]) -> set[str]:
    return {k for k in keys if not any(re.fullmatch(p, k) for p in ALLOWED)}


def script_assignments() -> list[str]:
    """The `--set` values rehearse.sh gives use-config (shell variables as placeholders)."""
    text = (REPO / "scripts" / "rehearse.sh").read_text()
    return [
        a.replace("$url", "http://127.0.0.1:1/v1").replace("$per_class", "1")
        for a in re.findall(r'--set "([^"]+)"', text)
    ]


def test_the_overlay_and_the_script_change_only_what_cannot_exist_here():
    overlay = REPO / "configs" / "rehearsal.yaml"
    assert yaml.safe_load(overlay.read_text())["extends"] == "paper.yaml"
    assignments = script_assignments()
    assert {a.split("=")[0] for a in assignments} == {
        "attributes.discover.base_url",
        "attributes.summarize.base_url",
        "real.per_class",
    }
    changed = changed_keys(overlay, assignments)
    assert disallowed(changed) == set()
    assert {"model.base", "train.num_processes", "real.per_class"} <= changed  # it does rehearse something


def test_the_allowlist_fires_on_a_switch_of_the_papers_form(tmp_path):
    for key, value in [
        ("align", {"ccc": "bounded"}),
        ("evaluate", {"inner_user_prefix": False}),
        ("model", {"prepare_kbit": True}),
    ]:
        sample = tmp_path / f"{key}.yaml"
        sample.write_text(yaml.safe_dump({"extends": str(REPO / "configs" / "rehearsal.yaml"), key: value}))
        assert disallowed(changed_keys(sample)) == {f"{key}.{next(iter(value))}"}


def fixture_counts(tmp_path: Path, per_class: int) -> dict[str, tuple[int, int]]:
    """Per dataset, the test images of the fixture tree kept at `per_class` that FOCI's option sets
    name, and those option sets (dog-120 lists one of its images twice)."""
    out = {}
    for name in DATASETS:
        MAKERS[name](tmp_path / "fixtures" / name, closed=True)
        held = set(prepare_real(name, tmp_path / "fixtures" / name, per_class).dataset.test.foci_key)
        entries = [e["image"] for v in json.loads(REAL_DATASETS[name].foci_file.read_text()).values() for e in v]
        out[name] = len(held & set(entries)), sum(e in held for e in entries)
    return out


def test_rehearsal_of_the_paper_config_on_the_fixture_trees(tmp_path):
    """scripts/rehearse.sh end to end (the committed code: it clones HEAD). Every stage runs, the six
    results files read with `finedefics score`, the merged model loads, and MLflow holds a finished
    run per stage."""
    env = dict(os.environ, TMPDIR=str(tmp_path), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.Popen(
        ["bash", str(REPO / "scripts" / "rehearse.sh")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # on a timeout the whole group goes, the LLM server and training processes too
    )
    try:
        out, err = proc.communicate(timeout=1200)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    clone = Path(out.strip().splitlines()[-1])
    try:
        per_class = load_params(clone / "params.yaml").real.per_class
        check_rehearsal(clone, fixture_counts(tmp_path, per_class), env)
    finally:
        shutil.rmtree(clone.parent)


def check_rehearsal(clone: Path, counts: dict[str, tuple[int, int]], env: dict) -> None:
    from transformers import AutoModelForImageTextToText

    from finedefics.models.paths import resolve

    status = subprocess.run(["dvc", "status", "-q"], cwd=clone, env=env, capture_output=True, text=True)
    assert status.returncode == 0 and status.stdout.strip() == "", status.stdout  # every stage ran, none is stale
    listed = subprocess.run(["dvc", "stage", "list", "--name-only"], cwd=clone, env=env, capture_output=True, text=True)
    stages = set(listed.stdout.split())
    assert len(stages) == 6 + 6 * 6 + 3  # six single stages, six per dataset, three evaluations
    results = [clone / "results" / "predictions" / "finedefics" / f"{name}.json" for name in DATASETS]
    scored = subprocess.run(
        [sys.executable, "-m", "finedefics.cli", "score", *map(str, results)],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
    )
    assert scored.returncode == 0, scored.stderr
    orders = load_params(clone / "params.yaml").evaluate.permutations
    found = {Path(p).stem: (s["n"], s["predictions"]) for p, s in json.loads(scored.stdout).items()}
    assert found == {name: (images, sets * orders) for name, (images, sets) in counts.items()}
    model = AutoModelForImageTextToText.from_pretrained(resolve(clone / "models" / "finedefics"))
    assert model.config.model_type == "idefics2"
    with sqlite3.connect(clone / "mlflow.db") as db:
        runs = list(db.execute("select name, status from runs"))
    assert sorted(name for name, _ in runs) == sorted(stages - {"check_params"})  # one run per stage, not per process
    assert {status for _, status in runs} == {"FINISHED"}
