"""`dvc repro` end to end in a temporary copy of this working tree, on a tiny world.

`dvc repro` runs once per module (`reproduced`); every test gets its own copy of that repository
(`fresh`), so a test that runs experiments or changes params cannot change what another one sees,
whatever their order."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import REPO, stage_env

TINY_WORLD = {
    "categories": 5,
    "cluster_size": 2,
    "train_per_class": 3,
    "test_per_class": 2,
    "image_size": 32,
    "deviation_rate": 0.1,
}
TINY_BOOTSTRAP = {
    "mllm": {
        "vocab_size": 400,
        "hidden": 32,
        "layers": 1,
        "heads": 2,
        "kv_heads": 1,
        "vision_hidden": 32,
        "vision_layers": 1,
        "latents": 4,
        "epochs": 1,
        "batch_size": 16,
    },
    "clip": {"embed_dim": 16, "width": 32, "layers": 1, "epochs": 1, "batch_size": 8},
}
TINY_TRAIN = {
    "stage1": {"epochs": 1, "lr": 5e-4, "warmup_steps": 1, "batch_size": 8},
    "stage2": {"epochs": 1, "lr": 5e-4, "warmup_steps": 1, "batch_size": 8},
    "per_device_batch_size": 8,
}


def ran(output: str) -> set[str]:
    """The stages a `dvc repro` / `dvc exp run` output says it ran."""
    return set(re.findall(r"Running stage '([^']+)'", output))


def sh(cmd, cwd, check=True):
    proc = subprocess.run(cmd, cwd=cwd, shell=True, capture_output=True, text=True, env=stage_env())
    if check and proc.returncode:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """The tracked and untracked-but-not-ignored files of this tree, committed in a new repo."""
    dest = tmp_path_factory.mktemp("clone") / "repo"
    files = sh("git ls-files -co --exclude-standard -z", REPO).stdout.split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["world"] |= TINY_WORLD
    params["bootstrap"] = TINY_BOOTSTRAP
    params["train"].update(TINY_TRAIN)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git init -q && git add -A && git -c user.name=t -c user.email=t@t commit -qm init", dest)
    return dest


@pytest.fixture(scope="module")
def reproduced(clone) -> tuple[Path, str]:
    """The clone after one `dvc repro`, and what that repro printed. Tests read it through `fresh`."""
    return clone, sh("dvc repro", clone).stdout


@pytest.fixture
def fresh(reproduced, tmp_path) -> Path:
    """A private copy of the reproduced clone (its git repo, DVC cache and outputs) for one test."""
    dest = tmp_path / "repo"
    shutil.copytree(reproduced[0], dest, symlinks=True)
    return dest


DATASETS = ("toy-bird", "toy-flower")
METRICS = {
    f"metrics/{stage}/{name}.json" for stage in ("prepare", "extract", "summarize", "mine") for name in DATASETS
} | {
    f"metrics/{name}.json"
    for name in ("bootstrap", "train_stage1", "train_stage2", "eval_base", "eval", "eval_clip", "analysis")
}


@pytest.mark.slow
def test_dvc_repro_prepares_the_default_datasets(reproduced, fresh):
    clone = fresh
    assert "Running stage 'prepare@toy-bird'" in reproduced[1]
    for name in DATASETS:
        out = clone / "data" / "prepared" / name
        manifest = pd.read_parquet(out / "images.parquet")
        assert len(manifest) == 5 * (3 + 2)
        assert all((clone / p).is_file() for p in manifest.path)
        classes = json.loads((out / "classes.json").read_text())
        assert len(classes["classes"]) == 5 and classes["source"] == "world"
        assert json.loads((clone / "metrics" / "prepare" / f"{name}.json").read_text())["train_images"] == 15
        assert (clone / "plots" / "prepare" / f"{name}.png").is_file()
        keys = json.loads((clone / "data" / "attributes" / name / "keys.json").read_text())["keys"]
        values = pd.read_parquet(clone / "data" / "attributes" / name / "values.parquet")
        assert len(values) == 15 * len(keys)
        extracted = json.loads((clone / "metrics" / "extract" / f"{name}.json").read_text())
        assert extracted["n_values"] == len(values) and extracted["n_keys"] == len(keys)
        descriptions = pd.read_parquet(clone / "data" / "descriptions" / f"{name}.parquet")
        assert len(descriptions) == 15 and descriptions.description.str.len().min() > 50
        negatives = pd.read_parquet(clone / "data" / "negatives" / f"{name}.parquet")
        assert len(negatives) == 15 and negatives.negative_labels.str.len().eq(3).all()
        options = json.loads((clone / "data" / "eval_options" / f"{name}.json").read_text())
        assert sum(len(v) for v in options.values()) == 10
    diagnosis = json.loads((clone / "metrics" / "bootstrap.json").read_text())
    assert {"caption_attribute_accuracy", "knowledge_attribute_accuracy", "zero_shot_mc_accuracy"} <= set(diagnosis)
    assert (clone / "models" / "base" / "model.safetensors").is_file() and (
        clone / "models" / "clip" / "open_clip_model.safetensors"
    ).is_file()
    s1, s2 = (json.loads((clone / "metrics" / f"train_stage{i}.json").read_text()) for i in (1, 2))
    assert (
        s1["trained"] == 1 and s1["steps"] == 30 // 8 and s2["steps"] == 60 // 8
    )  # 30 triples; 30 open + 30 closed questions
    for which, file in (("base", "eval_base.json"), ("finedefics", "eval.json")):
        metrics = json.loads((clone / "metrics" / file).read_text())
        assert set(metrics) == {"toy-bird", "toy-flower", "average"}
        assert 0 <= metrics["average"]["accuracy"] <= 1 and {"failure_rate", "open_set_accuracy"} <= set(
            metrics["average"]
        )
        results = json.loads((clone / "results" / "predictions" / which / "toy-bird.json").read_text())
        assert len(results["predictions"]) == 10 * 3  # test images x option orders (evaluate.permutations)
        assert set(results) == {"metrics", "predictions", "config"}
    clip = json.loads((clone / "metrics" / "eval_clip.json").read_text())
    assert set(clip) == {"mining", "baseline"} and all(
        set(m) == {"toy-bird", "toy-flower", "average"} for m in clip.values()
    )
    for role in clip:
        results = json.loads((clone / "results" / "predictions" / "clip" / role / "toy-bird.json").read_text())
        assert len(results["predictions"]) == 10 * 3 and results["config"]["clip"] == role
    assert (clone / "models" / "clip_baseline" / "open_clip_model.safetensors").is_file()
    analysis = json.loads((clone / "metrics" / "analysis.json").read_text())
    assert set(analysis) == {"base", "finedefics"} and "probe_object_last" in analysis["base"]["toy-bird"]
    assert (clone / "plots" / "analysis" / "finedefics" / "toy-bird" / "confusion.png").is_file()
    shown = sh("dvc plots show --json", clone).stdout
    assert "tsne_joint.png" in shown
    # generated outputs are ignored by git; changed are dvc.lock and the metrics, which are not cached (git keeps them)
    status = sh("git status --porcelain --untracked-files=all", clone).stdout.split("\n")
    new = {line[3:] for line in status if line and not line[3:].endswith(".gitignore")}
    assert new == {"dvc.lock"} | METRICS
    assert not any(line[3:].startswith("metrics/") for line in status if line.endswith(".gitignore"))
    again = sh("dvc repro", clone)
    assert "Running stage" not in again.stdout and "up to date" in again.stdout


REPORTS = [
    "dvc metrics show",
    "dvc metrics show --md",
    "dvc metrics show --json",
    "dvc metrics show -R metrics",
    "dvc exp show",
    "dvc exp show --md",
    "dvc exp show --json",
    "dvc plots show",
    "dvc plots show --json",
    "dvc params diff",
    "dvc params diff --md",
    "dvc params diff --json",
]


@pytest.mark.slow
def test_dvc_reports_work_after_repro(fresh):
    """A user's first `dvc metrics show` and friends exit 0 on the default pipeline: no metric key
    collides with DVC's table (`keys`, `values`), and no .gitignore is taken for a metrics file."""
    failed = []
    for cmd in REPORTS:
        proc = sh(cmd, fresh, check=False)
        if proc.returncode:
            failed.append(f"{cmd} -> {proc.returncode}: {(proc.stdout + proc.stderr).strip()[-500:]}")
        elif cmd.startswith("dvc metrics show") and ".gitignore" in proc.stdout:
            failed.append(f"{cmd} lists a .gitignore as a metrics file:\n{proc.stdout}")
    assert not failed, "\n".join(failed)
    shown = json.loads(sh("dvc metrics show --json", fresh).stdout)[""]["data"]
    assert set(shown) == METRICS and all("error" not in v for v in shown.values())
    assert {"n_keys", "n_values"} <= set(shown["metrics/extract/toy-bird.json"]["data"])


def commit_results(repo: Path) -> None:
    """Commit the default's dvc.lock and metrics, as the repository does for its own default."""
    sh("git add -f dvc.lock metrics && git -c user.name=t -c user.email=t@t commit -qm results", repo)


@pytest.mark.slow
def test_changing_negatives_reruns_mining_and_diffs_against_the_committed_default(fresh):
    clone = fresh
    commit_results(clone)
    before = pd.read_parquet(clone / "data" / "negatives" / "toy-bird.parquet")
    proc = sh("dvc exp run -S negatives=simple", clone)
    downstream = {"build_instructions", "train_stage1", "train_stage2", "evaluate@finedefics", "analyze"}
    assert (
        ran(proc.stdout) == {"check_params", "mine@toy-bird", "mine@toy-flower"} | downstream
    )  # base not re-evaluated
    after = pd.read_parquet(clone / "data" / "negatives" / "toy-bird.parquet")
    assert not before.negative_labels.equals(after.negative_labels) and before.distractors.equals(after.distractors)
    # `dvc metrics diff` and `dvc exp show` compare with the committed default: both columns filled
    diff = json.loads(sh("dvc metrics diff --all --json", clone).stdout)["metrics/eval.json"]
    for key in ("toy-bird.accuracy", "average.accuracy", "average.accuracy_low", "average.accuracy_high"):
        assert diff[key]["old"] is not None and diff[key]["new"] is not None, (key, diff[key])
    shown = json.loads(sh("dvc exp show --json", clone).stdout)
    head = next(b for b in shown if b["rev"] != "workspace")
    assert head["data"]["metrics"]["metrics/eval.json"]["data"]["average"]["accuracy"] is not None
    # the ledger takes the experiment with its predictions from DVC's cache; the report, reading only the
    # ledger, finds it by its switches (the workspace's params.yaml holds the experiment's after `dvc exp
    # run`), does not test one seed, and leaves the rows nobody ran missing
    average = json.loads((clone / "metrics" / "eval.json").read_text())["average"]
    sh("finedefics ledger --ledger scratch", clone)  # not the committed ledger the clone holds
    from finedefics.reporting import ledger

    book = ledger.read(clone / "scratch")
    (exp,) = book.experiments
    assert exp.params["negatives"] == "simple" and exp.name in sh("dvc exp ls", clone).stdout
    outcomes = book.outcomes[book.outcomes.rev == exp.rev]
    assert set(outcomes.model) == {"finedefics", "base", "clip/mining", "clip/baseline"}
    results = json.loads((clone / "results" / "predictions" / "finedefics" / "toy-bird.json").read_text())
    final = outcomes[(outcomes.model == "finedefics") & (outcomes.dataset == "toy-bird")]
    assert sum(map(sum, final.correct)) == sum(p["predicted"] == p["correct"] for p in results["predictions"])
    assert "0 added" in sh("finedefics ledger --ledger scratch", clone).stdout  # appending twice adds nothing
    sh("finedefics report --ledger scratch --out reports/results.md", clone)
    report = (clone / "reports" / "results.md").read_text()
    simple = [c.strip() for c in next(x for x in report.splitlines() if x.startswith("| Simple Neg.")).split("|")]
    ci = f"{100 * average['accuracy']:.1f}"  # the image bootstrap's interval, unless every image scored alike
    if average["accuracy_high"] - average["accuracy_low"] > 1e-9:
        ci += f" [{100 * average['accuracy_low']:.1f}, {100 * average['accuracy_high']:.1f}]"
    assert simple[4:6] == [ci, "1"] and simple[8] == "no test (one seed)"  # one seed is never tested
    from finedefics.reporting.paper import TABLES

    obj_cat = next(r for t in TABLES for r in t.rows if r.label == "CL (obj.-cat.)")  # the paper's number it prints
    assert next(line for line in report.splitlines() if line.startswith("| CL (obj.-cat.)")).endswith(
        f"| {obj_cat.paper:.2f} | missing |"
    )


@pytest.mark.slow
def test_a_training_seed_changes_only_training_and_what_follows(fresh):
    params = yaml.safe_load((fresh / "params.yaml").read_text())
    params["train"]["seed"] = 1
    (fresh / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = set(json.loads(sh("dvc status --json", fresh).stdout))
    assert changed == {"check_params", "train_stage1", "train_stage2"}  # the rest follows from their outputs


@pytest.mark.slow
@pytest.mark.parametrize("model,metrics", [("base", "eval_base.json"), ("finedefics", "eval.json")])
def test_eval_metrics_are_what_the_predictions_files_say(fresh, model, metrics):
    """metrics/eval*.json recomputed by hand from the FOCI results files `evaluate` wrote."""
    from statsmodels.stats.proportion import proportion_confint

    stored = json.loads((fresh / "metrics" / metrics).read_text())
    k = yaml.safe_load((fresh / "params.yaml").read_text())["evaluate"]["permutations"]
    for name in DATASETS:
        results = json.loads((fresh / "results" / "predictions" / model / f"{name}.json").read_text())
        p = results["predictions"]
        right = [x["predicted"] == x["correct"] for x in p]
        failed = [x["predicted"].startswith("NA ### ") for x in p]
        m = stored[name]
        assert len(p) == k * m["n"] and m["n"] == len({x["image"] for x in p})
        assert m["accuracy"] == pytest.approx(sum(right) / len(p)) == results["metrics"]["accuracy"]
        assert m["failure_rate"] == pytest.approx(sum(failed) / len(p)) == results["metrics"]["generation_failures"]
        low, high = proportion_confint(sum(right) / k, m["n"], method="wilson")  # every image in all k orders
        assert (m["accuracy_low"], m["accuracy_high"]) == pytest.approx((low, high))
        for i, letter in enumerate("ABCD"):
            truth_here = [x["options"].index(x["correct"]) == i for x in p]
            chose_here = [x["predicted"] in x["options"] and x["options"].index(x["predicted"]) == i for x in p]
            assert m["position"][letter]["truth"] == pytest.approx(sum(truth_here) / len(p))
            assert m["position"][letter]["chosen"] == pytest.approx(sum(chose_here) / len(p))
        assert results["config"]["task"] == "mc" and results["config"]["choice_enumeration"] == "ABCD"
    average = stored["average"]
    assert average["accuracy"] == pytest.approx(sum(stored[n]["accuracy"] for n in DATASETS) / len(DATASETS))
    assert average["accuracy_low"] <= average["accuracy"] <= average["accuracy_high"]


@pytest.mark.slow
def test_bad_param_in_an_experiment_fails_fast_with_a_clear_message(fresh):
    proc = sh("dvc exp run -S negatives=bogus", fresh, check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "negatives = 'bogus' is not allowed; allowed values: 'hard', 'simple' or 'none'" in out
    assert "Running stage 'prepare" not in out


@pytest.mark.slow
@pytest.mark.parametrize("model", ["base", "finedefics"])
def test_one_pass_scoring_of_the_trained_models_writes_what_generation_wrote(reproduced, monkeypatch, model):
    """The FOCI results `evaluate` wrote for the pipeline's base and final models (letters scored in
    one pass where the answers allow) against generating every answer again: identical."""
    import sys

    from finedefics.config import load_params
    from finedefics.evaluate.mc import evaluate
    from finedefics.models.mllm import MLLM, ImageSettings

    monkeypatch.chdir(reproduced[0])
    monkeypatch.syspath_prepend(str(reproduced[0] / "stages"))
    sys.modules.pop("evaluate", None)
    from evaluate import option_sets

    params = load_params("params.yaml")
    mllm = MLLM.load(Path("models") / model, ImageSettings.from_config(params.model))
    for name in DATASETS:
        dataset, entries = option_sets(params, name)
        wrote = json.loads((Path("results/predictions") / model / f"{name}.json").read_text())["predictions"]
        generated = evaluate(
            mllm, dataset.plural, entries, max_new_tokens=params.evaluate.max_new_tokens, one_pass=False
        )
        assert generated == wrote


@pytest.mark.slow
def test_two_experiments_side_by_side_are_both_recorded(fresh, mlflow_store):
    """`scripts/ablations.sh`'s queue: two workers at once, one torch thread each, on one MLflow
    store and one run cache. Both experiments finish with their own metrics, each of their training
    and evaluation stages has a FINISHED MLflow run, and no log meets a locked database."""
    import time

    from mlflow.tracking import MlflowClient

    names = ("side-1", "side-2")
    for seed, name in enumerate(names, 1):
        sh(f"dvc exp run --queue --name {name} -S train.seed={seed}", fresh)
    sh("OMP_NUM_THREADS=1 dvc queue start -j 2", fresh)
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            refs = sh("git for-each-ref --format='%(refname)' refs/exps", fresh).stdout.split()
            if sum(r.endswith(names) for r in refs) == 2:
                break
            time.sleep(3)
        logs = [sh(f"dvc queue logs {name}", fresh, check=False).stdout for name in names]
        assert sum(r.endswith(names) for r in refs) == 2, "\n".join(logs)
    finally:
        sh("dvc queue stop --kill", fresh, check=False)
    assert not any("database is locked" in log for log in logs)
    trained = [sh(f"git show {r}:metrics/train_stage1.json", fresh).stdout for r in refs if r.endswith(names)]
    assert trained[0] != trained[1]  # two seeds, two runs
    client = MlflowClient(mlflow_store)  # the tests' store: the workers inherit MLFLOW_TRACKING_URI
    experiments = [e.experiment_id for e in client.search_experiments()]
    for name in names:
        runs = client.search_runs(experiments, f"tags.dvc_exp_name = '{name}'")
        stages = {r.data.tags["stage"]: r.info.status for r in runs}
        assert {"train_stage1", "train_stage2", "evaluate"} <= set(stages), stages
        assert set(stages.values()) == {"FINISHED"}, stages
