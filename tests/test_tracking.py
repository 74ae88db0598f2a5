import signal
import subprocess
import sys

import pytest
from conftest import REPO, stage_env
from mlflow.tracking import MlflowClient

from finedefics.config import Params
from finedefics.io import Interrupted
from finedefics.tracking import git_commit, repo_root, stage_run, tracking_uri


def test_run_is_written_and_read_back(mlflow_uri, monkeypatch, tmp_path):
    monkeypatch.setenv("DVC_EXP_NAME", "tidy-fern")
    params = Params(negatives="simple", tracking={"experiment": "unit"})
    with stage_run("prepare", params, run_name="prepare@toy-bird") as run:
        run.log_metrics({"train_images": 240, "classes": 12})
        (tmp_path / "note.txt").write_text("hello")
        run.log_artifact(tmp_path / "note.txt")
    client = MlflowClient(mlflow_uri)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "prepare@toy-bird"
    assert client.get_experiment(got.info.experiment_id).name == "unit"
    assert got.data.params["negatives"] == "simple" and got.data.params["model.lora.r"] == "16"
    assert got.data.metrics == {"train_images": 240.0, "classes": 12.0}
    tags = got.data.tags
    assert tags["stage"] == "prepare" and tags["dvc_exp_name"] == "tidy-fern"
    assert tags["git_commit"] == git_head()  # the tests run in a checkout of this repository
    assert [a.path for a in client.list_artifacts(run.run_id)] == ["note.txt"]


def git_head() -> str:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
    return head.stdout.strip()


def test_the_commit_is_the_checkout_s_head_and_unknown_outside_a_repository(tmp_path):
    assert len(git_head()) == 40 and git_commit(REPO) == git_head() and git_commit(REPO / "src") == git_head()
    assert git_commit(tmp_path) == "unknown"


def test_step_values_are_batched_yet_every_step_is_kept_even_when_the_stage_fails(mlflow_uri):
    with stage_run("train_stage2", Params(tracking={"experiment": "unit"})) as run:
        with run.steps(flush_every=20) as log:
            for step in range(1, 46):
                log({"loss": 1.0 / step, "lr": 0.1}, step)
    with pytest.raises(RuntimeError):
        with stage_run("train_stage1", Params(tracking={"experiment": "unit"})) as failed:
            with failed.steps(flush_every=20) as log:
                for step in range(1, 8):
                    log({"loss": float(step)}, step)
                raise RuntimeError("diverged")
    client = MlflowClient(mlflow_uri)
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.run_id, "loss"))
    assert history == [(step, 1.0 / step) for step in range(1, 46)]
    assert len(client.get_metric_history(run.run_id, "lr")) == 45
    assert [m.step for m in client.get_metric_history(failed.run_id, "loss")] == list(range(1, 8))


def test_failed_stage_marks_the_run_failed(mlflow_uri):
    with pytest.raises(RuntimeError):
        with stage_run("mine", Params(tracking={"experiment": "unit"})) as run:
            raise RuntimeError("boom")
    assert MlflowClient(mlflow_uri).get_run(run.run_id).info.status == "FAILED"


def test_default_store_is_the_main_repository_even_from_a_dvc_temp_workspace(monkeypatch, tmp_path):
    main = tmp_path / "repo"
    temp = main / ".dvc" / "tmp" / "exps" / "tmpabc123"
    (temp / ".dvc").mkdir(parents=True)
    (temp / "src").mkdir()
    assert repo_root(temp / "src") == main
    assert repo_root(main / ".dvc" / "..") == main
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(temp)
    assert tracking_uri() == f"sqlite:///{main / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking_uri() == "http://mlflow.example:5000"


def run_of(uri: str, run_id: str):
    return MlflowClient(uri).get_run(run_id)


@pytest.mark.parametrize(
    "raised, reason", [(KeyboardInterrupt(), "SIGINT"), (Interrupted("SIGTERM"), "SIGTERM")], ids=["SIGINT", "SIGTERM"]
)
def test_interrupted_stage_marks_the_run_killed(mlflow_uri, raised, reason):
    with pytest.raises(KeyboardInterrupt):
        with stage_run("train_stage1", Params(tracking={"experiment": "unit"})) as run:
            raise raised
    got = run_of(mlflow_uri, run.run_id)
    assert got.info.status == "KILLED" and got.data.tags["end_reason"] == reason
    assert got.info.end_time is not None


def test_failed_stage_says_why_and_a_clean_exit_finishes(mlflow_uri):
    with pytest.raises(ValueError):
        with stage_run("mine", Params(tracking={"experiment": "unit"})) as failed:
            raise ValueError("no images\nsecond line")
    with pytest.raises(SystemExit):
        with stage_run("mine", Params(tracking={"experiment": "unit"})) as exited:
            raise SystemExit(1)
    with pytest.raises(SystemExit):
        with stage_run("mine", Params(tracking={"experiment": "unit"})) as done:
            raise SystemExit(0)
    assert run_of(mlflow_uri, failed.run_id).info.status == "FAILED"
    assert run_of(mlflow_uri, failed.run_id).data.tags["end_reason"] == "ValueError: no images"
    assert run_of(mlflow_uri, exited.run_id).info.status == "FAILED"
    assert run_of(mlflow_uri, done.run_id).info.status == "FINISHED"


HOLD_A_RUN = """
import sys, time
from finedefics.config import Params
from finedefics.tracking import stage_run
with stage_run(sys.argv[1], Params(tracking={"experiment": "unit"})) as run:
    print(run.run_id, flush=True)
    time.sleep(600)
"""


def test_a_run_left_running_by_sigkill_is_closed_when_the_stage_next_starts(mlflow_uri):
    """A SIGKILLed stage cannot end its run; the next start of the same stage closes it as FAILED,
    but leaves alone a run whose process still runs (a parallel `dvc exp run`) and other stages' runs."""

    def hold(stage: str) -> tuple[subprocess.Popen, str]:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLD_A_RUN, stage], stdout=subprocess.PIPE, text=True, env=stage_env()
        )
        return proc, proc.stdout.readline().strip()

    killed, killed_run = hold("train_stage1")
    live, live_run = hold("train_stage1")
    other, other_run = hold("mine")
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=60)
        other.send_signal(signal.SIGKILL)
        other.wait(timeout=60)
        assert run_of(mlflow_uri, killed_run).info.status == "RUNNING"  # what a SIGKILL leaves behind
        with stage_run("train_stage1", Params(tracking={"experiment": "unit"})) as run:
            pass
        gone = run_of(mlflow_uri, killed_run)
        assert gone.info.status == "FAILED" and "SIGKILL" in gone.data.tags["end_reason"]
        assert run_of(mlflow_uri, live_run).info.status == "RUNNING"  # its process still runs
        assert run_of(mlflow_uri, other_run).info.status == "RUNNING"  # another stage's: closed when `mine` starts
        assert run_of(mlflow_uri, run.run_id).info.status == "FINISHED"
    finally:
        live.kill()
        live.wait(timeout=60)


WRITER = """
import sys
from finedefics.config import Params
from finedefics.tracking import stage_run

with stage_run(sys.argv[1], Params(), run_name=sys.argv[2]) as run:
    with run.steps(flush_every=1) as log:  # one write per step: the most contention
        for step in range(int(sys.argv[3])):
            log({"loss": float(step)}, step)
    run.log_metrics({"done": 1.0})
"""


def test_two_stages_writing_the_store_at_once_lose_nothing(mlflow_uri):
    """Two experiments of a queue with two workers write one sqlite store at once (the MLflow
    default's store): both runs end FINISHED with every step's value, and neither meets a locked
    database."""
    env = stage_env()  # with the test's store
    steps = 150

    def writer(stage: str, name: str, n: int) -> subprocess.Popen:
        cmd = [sys.executable, "-c", WRITER, stage, name, str(n)]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    first = writer("check", "check", 1)  # the store exists before a queue starts (ablations.sh: dvc repro)
    assert first.wait() == 0, first.stdout.read()
    procs = [writer("train_stage1", name, steps) for name in ("exp-a", "exp-b")]
    outputs = [p.communicate()[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert not any("database is locked" in out for out in outputs)
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.stage = 'train_stage1'")
    assert sorted(r.info.run_name for r in runs) == ["exp-a", "exp-b"]
    for r in runs:
        assert r.info.status == "FINISHED" and r.data.metrics["done"] == 1.0
        history = client.get_metric_history(r.info.run_id, "loss")
        assert sorted(m.step for m in history) == list(range(steps))


def test_an_untracked_process_logs_nothing_and_the_tracked_one_its_run(mlflow_uri):
    """A training stage on two processes: the main one's run, nothing from the other."""
    params = Params(tracking={"experiment": "ranks"})
    with stage_run("train_stage1", params, tracked=False) as run:
        run.log_params({"a": 1})
        run.log_metrics({"x": 1.0})
        with run.steps() as log:
            log({"loss": 1.0}, 1)
        run.every(1)({"loss": 2.0}, 1)
    with stage_run("train_stage1", params, tracked=True) as run:
        run.log_metrics({"x": 2.0})
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("ranks").experiment_id])
    assert [(r.info.run_name, r.info.status, r.data.metrics) for r in runs] == [
        ("train_stage1", "FINISHED", {"x": 2.0})
    ]
