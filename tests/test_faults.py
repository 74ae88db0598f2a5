"""Faults a user meets (issue 15): non-finite training, Ctrl-C and SIGTERM, MLflow runs of killed
stages, resuming onto a rebuilt base, and a SIGKILL at a random step that a re-run repairs.
Issue 30: I/O faults at the edges (a read-only output folder, a full disk, a missing input, a
safetensors write error) end a stage in one line, and a SIGKILLed stage's run is marked KILLED."""

import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_stage, set_params, stage_env

from finedefics.io import StageError, write_json
from finedefics.models.paths import model_fingerprint
from finedefics.tracking import KILLED_WITHOUT_A_WORD, tracking_uri
from finedefics.training import Diverged, FitConfig, fit, plan


@pytest.fixture
def copy(train_workdir, tmp_path):
    """A copy of the module's training workdir (conftest), with the world specs `prepare` reads."""
    root = tmp_path / "w"
    shutil.copytree(train_workdir, root)
    (root / "world").symlink_to(REPO / "world")
    return root


def start_stage(root: Path, stage: str, *args: str) -> subprocess.Popen:
    """A stage process as a shell starts it: Ctrl-C's SIGINT is not ignored (it would be if the
    tests themselves ran in the background of a non-interactive shell)."""
    return subprocess.Popen(
        [sys.executable, str(REPO / "stages" / stage), *args],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=stage_env(),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def checkpoint_step(root: Path, stage: str = "train_stage1") -> int:
    """The step of the stage's resume checkpoint (0: none yet)."""
    found = list((root / ".resume" / stage).glob("*/checkpoint.pt"))
    return torch.load(found[0], weights_only=False)["step"] if found else 0


def wait_until(proc: subprocess.Popen, ready, timeout: float = 600) -> None:
    end = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the stage ended first (exit {proc.returncode}): {proc.communicate()[1][-3000:]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.05)


def stage_runs(pid: int) -> list:
    """The MLflow runs a stage process made (the tests' throw-away store)."""
    from mlflow.tracking import MlflowClient

    # the env's store (the tests'): a test that ran a stage in-process may have set mlflow's global URI
    client = MlflowClient(tracking_uri())
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, f"tags.pid = '{pid}'")


def last_line(stderr: str) -> str:
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else ""


# --- item 2: a loss or gradient norm that is not finite stops training ------------------------------


def tiny_fit(step_fn, resume: Path | None, steps: int = 5, max_grad_norm: float | None = 1.0, **cfg):
    """A Linear(3, 1) trained by `fit` at lr 0.1 on one input x; `cfg` overrides FitConfig fields."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 1)
    defaults = FitConfig(
        lr=0.1,
        warmup_steps=0,
        batch_size=2,
        per_device_batch_size=2,
        checkpoint_every=1,
        schedule="constant",
        weight_decay=0.0,
        max_grad_norm=max_grad_norm,
    )
    cfg = dataclasses.replace(defaults, **cfg)
    x = torch.arange(6.0).reshape(2, 3)
    return layer, lambda: fit([layer], plan(2 * steps, 2, 1, 0), lambda idx: step_fn(layer, x), cfg, resume, "tiny")


def test_a_nan_loss_term_stops_at_its_step_and_keeps_the_last_checkpoint(tmp_path):
    calls = []

    def step(layer, x):
        calls.append(1)
        out = layer(x).mean()
        other = out * (math.nan if len(calls) == 3 else 1.0)
        return out + other, {"loss": (out + other).item(), "loss_a": out.item(), "loss_b": other.item()}

    layer, run = tiny_fit(step, tmp_path)
    with pytest.raises(Diverged) as info:
        run()
    msg = str(info.value)
    assert "loss term 'loss_b' (nan)" in msg and "step 3 of 5" in msg and "\n" not in msg, msg
    assert f"checkpoint of step 2 is kept in {tmp_path}" in msg
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["step"] == 2 and all(torch.isfinite(w).all() for w in state["weights"][0].values())
    assert all(torch.isfinite(p).all() for p in layer.parameters())  # no step was taken on the NaN


@pytest.mark.parametrize("max_grad_norm", [1.0, None])
def test_a_non_finite_gradient_norm_stops_training(tmp_path, max_grad_norm):
    def step(layer, x):
        out = layer(x).mean()
        loss = out + torch.sqrt((layer.weight * 0).sum())  # finite (0), its gradient is not
        return loss, {"loss": loss.item()}

    layer, run = tiny_fit(step, None, max_grad_norm=max_grad_norm)
    with pytest.raises(Diverged, match=r"the gradient norm \(nan\) is not finite at step 1 of 5; stopped \(no check"):
        run()
    assert all(torch.isfinite(p).all() for p in layer.parameters())


def test_metrics_json_never_holds_nan(tmp_path):
    with pytest.raises(StageError, match=r"m.json: a.b.1 is not a finite number"):
        write_json(tmp_path / "m.json", {"a": {"b": [1.0, math.nan]}})
    assert not (tmp_path / "m.json").exists()
    write_json(tmp_path / "m.json", {"a": 1.0})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1.0}


def test_a_diverging_stage_exits_1_with_one_line_and_writes_no_model(copy):
    """An lr the schema accepts (finite) but training cannot take: the weights blow up, a loss turns
    non-finite, and the stage stops with one line; no NaN model, no NaN metrics."""
    set_params(copy, **{"train.stage1.lr": 1e30})
    proc = start_stage(copy, "train_stage1.py")
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 1, stderr[-3000:]
    line = last_line(stderr)
    assert line.startswith("error: train stage1: ") and "not finite at step" in line, stderr[-3000:]
    assert "Traceback" not in stderr
    assert not (copy / "metrics" / "train_stage1.json").exists() and not (copy / "models" / "stage1").exists()
    kept = list((copy / ".resume" / "train_stage1").glob("*/checkpoint.pt"))
    assert len(kept) == 1 and str(kept[0].parent.relative_to(copy)) in line
    (run,) = stage_runs(proc.pid)
    assert run.info.status == "FAILED" and run.data.tags["end_reason"].startswith("Diverged: train stage1: ")


# --- item 5: Ctrl-C (SIGINT) and SIGTERM end a stage with one line and exit code 130 ------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_stage_says_where_it_stopped_in_one_line(copy, sig):
    set_params(copy, **{"train.stage1.epochs": 4})  # 12 steps, a checkpoint after each
    proc = start_stage(copy, "train_stage1.py")
    wait_until(proc, lambda: checkpoint_step(copy) >= 1)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    line, kept = last_line(stderr), checkpoint_step(copy)
    assert line.startswith(f"interrupted ({sig.name}): train_stage1 stopped at train stage1 step "), stderr[-3000:]
    assert line.endswith(f" of 12; `dvc repro` resumes from its checkpoint of step {kept}"), line
    assert 1 <= kept < 12 and not (copy / "models" / "stage1").exists()
    (run,) = stage_runs(proc.pid)  # item 6: the stage's MLflow run is closed, not left RUNNING
    assert run.info.status == "KILLED" and run.data.tags["end_reason"] == sig.name


def test_an_interrupted_extract_says_so_in_one_line(copy, tiny_models):
    set_params(
        copy,
        **{
            "attributes.extract.backend": "hf",
            "attributes.extract.model": str(tiny_models["vlm"]),
            "attributes.extract.shard_size": 2,
        },
    )
    proc = start_stage(copy, "extract.py", "toy-bird")
    wait_until(proc, lambda: any((copy / ".resume" / "extract").glob("*/*/*.parquet")))
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert last_line(stderr).startswith("interrupted (SIGINT): extract@toy-bird stopped"), stderr[-3000:]


# --- item 7: the resume fingerprint is the base's weights, not its path -------------------------------


def test_model_fingerprint_follows_the_weights_not_the_path(tiny_models, tmp_path):
    base, moved = tmp_path / "base", tmp_path / "elsewhere"
    shutil.copytree(tiny_models["vlm"], base)
    shutil.copytree(tiny_models["vlm"], moved)
    (base / ".git").mkdir()
    (base / ".git" / "index").write_text("not part of the model")
    first = model_fingerprint(base)
    assert first == model_fingerprint(moved)  # the same weights elsewhere: the same base
    rebuild(base)
    assert model_fingerprint(base) != first
    assert model_fingerprint("HuggingFaceM4/not-downloaded") == "HuggingFaceM4/not-downloaded"  # hub id, not cached


def rebuild(folder: Path) -> None:
    """What `bootstrap` re-run does to models/base: other weights, saved at the same path."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(folder)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)
    model.save_pretrained(folder)


def logged_steps(experiment: str) -> list[list[int]]:
    """The optimizer steps each run of `experiment` logged a loss for, oldest run first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    return [sorted(m.step for m in client.get_metric_history(r.info.run_id, "loss")) for r in runs]


def test_a_killed_run_does_not_resume_onto_a_rebuilt_base(copy, tiny_models):
    base = copy / "base"
    shutil.copytree(tiny_models["vlm"], base)
    set_params(copy, **{"model.base": str(base), "train.stage1.epochs": 4, "tracking.experiment": "rebuilt-base"})
    proc = start_stage(copy, "train_stage1.py")
    wait_until(proc, lambda: checkpoint_step(copy) >= 2)
    proc.kill()
    proc.wait(timeout=60)
    (old,) = (copy / ".resume" / "train_stage1").iterdir()
    rebuild(base)
    done = run_stage(copy, "train_stage1.py")
    assert done.returncode == 0, done.stderr[-3000:]
    assert old.is_dir()  # the old base's checkpoint was not taken: the run had another folder
    killed, fresh = logged_steps("rebuilt-base")
    assert killed[0] == 1 and fresh == list(range(1, 13))  # the new base trained from step 1


# --- fault injection: SIGKILL at a random step; `dvc repro` gives the uninterrupted run's model -------

DVC_YAML = """
stages:
  train_stage1:
    cmd: python {stage}
    deps:
      - {stage}
      - data/instructions/stage1.parquet
    params:
      - seed
      - align
      - model
      - train.stage1
    outs:
      - models/stage1
    metrics:
      - metrics/train_stage1.json:
          cache: false
"""


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", *args], cwd=root, capture_output=True, text=True, env=stage_env(), timeout=900)


def kill_during_repro(root: Path, step: int, *args: str) -> int:
    """Run `dvc repro *args`, SIGKILL the stage's process once its checkpoint reaches `step`; the step
    of the checkpoint it leaves."""
    import psutil

    proc = subprocess.Popen(
        ["dvc", "repro", *args], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=stage_env()
    )
    wait_until(proc, lambda: checkpoint_step(root) >= step)
    # DVC runs the command through a shell, which may stay as the interpreter's parent: kill the leaf.
    running = [
        c for c in psutil.Process(proc.pid).children(recursive=True) if "train_stage1.py" in " ".join(c.cmdline())
    ]
    (stage,) = [c for c in running if not any(d in running for d in c.children(recursive=True))]
    stage.kill()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0 and b"failed to reproduce 'train_stage1'" in out, out[-3000:]
    return checkpoint_step(root)


def weights(root: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(root / "models" / "stage1" / "model.safetensors")


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_dvc_repro_gives_the_uninterrupted_model(copy):
    """The whole story of a killed training stage under DVC (a one-stage pipeline over the test's data):

    1. `dvc repro`, SIGKILL at a seeded random step: the checkpoint before it is kept;
    2. `dvc repro` runs the stage again, which resumes from that checkpoint (the killed run's MLflow
       run is marked KILLED by its watcher);
    3. `dvc repro -f`, uninterrupted from step 1, gives the same model (float tolerance);
    4. once DVC has a finished run of these inputs, a killed `dvc repro -f` followed by `dvc repro`
       does not resume: DVC restores the recorded result (the same model) and skips the stage."""
    import random

    from mlflow.tracking import MlflowClient

    set_params(copy, **{"train.stage1.epochs": 4, "tracking.experiment": "fault-injection"})  # 12 steps
    (copy / "dvc.yaml").write_text(DVC_YAML.format(stage=REPO / "stages" / "train_stage1.py"))
    assert dvc(copy, "init", "--no-scm").returncode == 0
    step = random.Random(15).randint(1, 10)
    kept = kill_during_repro(copy, step)
    assert step <= kept < 12 and not (copy / "models" / "stage1").exists()

    resumed = dvc(copy, "repro")
    assert resumed.returncode == 0 and "Running stage 'train_stage1'" in resumed.stdout, resumed.stderr[-3000:]
    killed_steps, resumed_steps = logged_steps("fault-injection")
    assert killed_steps[:kept] == list(range(1, kept + 1)) and resumed_steps == list(range(kept + 1, 13))
    client = MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name("fault-injection").experiment_id
    first = client.search_runs([exp], order_by=["attributes.start_time ASC"])[0]
    # marked by its watcher (KILLED), or closed when the stage next started (FAILED) if that came first
    assert first.info.status in ("KILLED", "FAILED") and first.data.tags["end_reason"] == KILLED_WITHOUT_A_WORD
    after_resume = weights(copy)
    assert not list((copy / ".resume" / "train_stage1").iterdir())  # finished: no checkpoint left

    whole = dvc(copy, "repro", "-f")
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert logged_steps("fault-injection")[-1] == list(range(1, 13))
    uninterrupted = weights(copy)
    assert after_resume.keys() == uninterrupted.keys()
    for name in uninterrupted:
        torch.testing.assert_close(after_resume[name], uninterrupted[name], rtol=1e-5, atol=1e-6)

    kill_during_repro(copy, 2, "-f")
    restored = dvc(copy, "repro")
    assert restored.returncode == 0 and "is cached - skipping run" in restored.stdout, restored.stdout[-3000:]
    assert len(logged_steps("fault-injection")) == 4  # no new run: nothing resumed
    assert checkpoint_step(copy) >= 2  # the killed run's checkpoint stays (`dvc repro -f` would resume it)
    for name, value in weights(copy).items():
        torch.testing.assert_close(value, uninterrupted[name], rtol=0, atol=0)


# --- issue 30: I/O faults end a stage in one line naming the stage, the path and what to do -----------
#
# The light stage is `prepare@toy-bird` (writes data/prepared/toy-bird, plots/prepare/, metrics/prepare/),
# the training stage `train_stage1` (writes models/stage1, metrics/train_stage1.json).
# Real faults, no mocks: a read-only folder is `chattr +i` as root (root writes through permission
# bits) and `chmod a-w` otherwise; a full disk is a small tmpfs mounted over the output folder in a
# private mount namespace (`unshare -rm`, no root needed where user namespaces are allowed), filled
# before the stage starts (ENOSPC on the first write) or left with room for the model's JSON files
# but not its weights (the SafetensorError of safetensors' own writer).

LIGHT = ("prepare.py", "toy-bird")
TRAINING = ("train_stage1.py",)


def error_line(stderr: str) -> str:
    """The one error line of a failed stage; progress bars and logs may surround it, a traceback may not."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("error")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def left_over(folder: Path) -> list[str]:
    """What a failed stage left in `folder`: any temporary (`.name.tmp`) or probe file is half-written."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.is_dir() else []


@contextmanager
def read_only(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not supported here (root writes through permission bits)")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)


@functools.cache
def can_mount_tmpfs() -> bool:
    probe = 'd=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs "$d"; rc=$?; umount "$d"; rmdir "$d"; exit $rc'
    return subprocess.run(["unshare", "-rm", "sh", "-c", probe], capture_output=True).returncode == 0


FULL_DISK = """
mount -t tmpfs -o size="$SIZE" tmpfs "$FOLDER" || exit 99
if [ "$FILL" = 1 ]; then head -c 64m /dev/zero > "$FOLDER/filler" 2>/dev/null; fi
"$@"
rc=$?
rm -f "$FOLDER/filler"
(cd "$FOLDER" && find . -mindepth 1 -printf '%y %P\n') > "$LISTING"
exit $rc
"""


def on_full_disk(root: Path, folder: str, stage: tuple[str, ...], size: str = "64k", fill: bool = True):
    """Run `stage` with a `size` tmpfs mounted over root/folder (filled first if `fill`); the finished
    process and what the tmpfs held after it (the folder as the stage left it: "<type> <path>" per
    entry, type f for a file, d for a folder)."""
    if not can_mount_tmpfs():
        pytest.skip("no private mount namespace (unshare -rm) to mount a small tmpfs in")
    (root / folder).mkdir(parents=True, exist_ok=True)
    listing = root.parent / "listing.txt"
    env = stage_env() | {"SIZE": size, "FOLDER": str(root / folder), "FILL": str(int(fill)), "LISTING": str(listing)}
    command = [sys.executable, str(REPO / "stages" / stage[0]), *stage[1:]]
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", FULL_DISK, "sh", *command], cwd=root, capture_output=True, text=True, env=env
    )
    assert proc.returncode != 99, proc.stderr
    return proc, listing.read_text().splitlines()


def experiment_runs(experiment: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri())
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def nothing_trained(root: Path) -> bool:
    return not (root / ".resume" / "train_stage1").exists() and not (root / "models" / "stage1").exists()


@pytest.mark.parametrize("stage", [LIGHT, TRAINING], ids=["prepare", "train_stage1"])
def test_a_read_only_output_folder_is_named_before_the_stage_starts(copy, stage):
    folder, out = (
        (copy / "data" / "prepared", "data/prepared/toy-bird") if stage is LIGHT else (copy / "models", "models/stage1")
    )
    name = "prepare@toy-bird" if stage is LIGHT else "train_stage1"
    before = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    set_params(copy, **{"tracking.experiment": f"read-only-{name}"})
    with read_only(folder):
        start = time.monotonic()
        proc = run_stage(copy, *stage)
        took = time.monotonic() - start
        assert sorted(p.name for p in folder.iterdir()) == before  # nothing written, nothing half-written
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = error_line(proc.stderr)
    reason = "Operation not permitted" if os.geteuid() == 0 else "Permission denied"
    assert line == (
        f"error: {name}: cannot write {out} ({reason}); make {folder.relative_to(copy)} writable "
        f"and rerun `dvc repro {name}`"
    )
    assert experiment_runs(f"read-only-{name}") == []  # failed before its MLflow run, let alone training
    assert nothing_trained(copy) and not (copy / "metrics").exists() and not (copy / "plots").exists()
    assert took < 60


@pytest.mark.parametrize(
    "stage, size, fill",
    [(LIGHT, "64k", True), (LIGHT, "16k", False), (TRAINING, "64k", True)],
    ids=["prepare-full", "prepare-fills-up", "train_stage1-full"],
)
def test_a_full_disk_ends_the_stage_in_one_line_and_leaves_nothing_half_written(copy, stage, size, fill):
    """A disk full from the start is found before the stage starts; one that fills up while the stage
    writes (16 KiB: less than the world's images) when the write fails, the MLflow run FAILED."""
    folder, out = ("data/prepared", "data/prepared/toy-bird") if stage is LIGHT else ("models", "models/stage1")
    name = "prepare@toy-bird" if stage is LIGHT else "train_stage1"
    set_params(copy, **{"tracking.experiment": f"full-{name}-{size}"})
    proc, listing = on_full_disk(copy, folder, stage, size, fill)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = error_line(proc.stderr)
    assert line == (
        f"error: {name}: cannot write {out} (No space left on device); free disk space and rerun `dvc repro {name}`"
    )
    assert listing == []  # no temporary folder, no probe
    assert not (copy / "metrics").exists() and nothing_trained(copy)
    runs = experiment_runs(f"full-{name}-{size}")
    if fill:
        assert runs == []  # found before the stage started
    else:
        (run,) = runs
        assert run.info.status == "FAILED" and run.data.tags["end_reason"].startswith("OSError: [Errno 28]")


def test_a_safetensors_write_error_ends_training_in_one_line(copy):
    """Room for the model's config files, not for its weights: safetensors' writer fails (not Python's)."""
    set_params(copy, **{"tracking.experiment": "safetensors"})
    proc, listing = on_full_disk(copy, "models", TRAINING, size="256k", fill=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = error_line(proc.stderr)
    assert line == (
        "error: train_stage1: cannot write models/stage1 (No space left on device); "
        "free disk space and rerun `dvc repro train_stage1`"
    )
    assert listing == [] and not (copy / "metrics").exists()
    (run,) = experiment_runs("safetensors")
    assert run.info.status == "FAILED" and run.data.tags["end_reason"].startswith("SafetensorError: ")


@pytest.mark.parametrize(
    "stage, missing",
    [(LIGHT, "world/toy-bird.yaml"), (TRAINING, "data/instructions/stage1.parquet")],
    ids=["prepare", "train_stage1"],
)
def test_a_missing_input_is_named_before_the_stage_starts(copy, stage, missing):
    name = "prepare@toy-bird" if stage is LIGHT else "train_stage1"
    (copy / missing.split("/")[0] if stage is LIGHT else copy / missing).unlink()  # world/: the link to REPO/world
    set_params(copy, **{"tracking.experiment": f"missing-{name}"})
    proc = run_stage(copy, *stage)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = error_line(proc.stderr)
    assert line.startswith(f"error: {name}: {missing} is missing (No such file or directory); "), line
    assert f"`dvc repro {name}`" in line
    assert experiment_runs(f"missing-{name}") == [] and nothing_trained(copy)
    assert left_over(copy / "data" / "prepared") == [] and not (copy / "metrics").exists()


def test_analyze_names_a_missing_predictions_file_before_loading_a_model(copy):
    proc = run_stage(copy, "analyze.py")
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = error_line(proc.stderr)
    assert line.startswith("error: analyze: results/predictions/base/toy-bird.json is missing (No such file"), line
    assert not (copy / "plots").exists() and not (copy / "metrics").exists()


def test_a_disk_that_fills_up_under_the_training_checkpoint_ends_in_one_line(copy):
    """torch.save's writer names no OS error when the disk fills ("unexpected pos ..."): still one line."""
    set_params(copy, **{"tracking.experiment": "checkpoint"})
    proc, listing = on_full_disk(copy, ".resume", TRAINING, size="256k", fill=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = error_line(proc.stderr)
    assert line.startswith("error: train_stage1: cannot write .resume/train_stage1/"), line
    assert line.endswith(
        "/checkpoint.pt (the write stopped short; the disk is likely full); "
        "free disk space and rerun `dvc repro train_stage1`"
    ), line
    assert [entry for entry in listing if entry.startswith("f ")] == []  # no half-written checkpoint
    (run,) = experiment_runs("checkpoint")
    assert run.info.status == "FAILED" and run.data.tags["end_reason"].startswith("RuntimeError: ")


# --- issue 30: a SIGKILLed stage's MLflow run is marked KILLED without waiting for a next start ---------


def test_a_sigkilled_stage_run_is_marked_killed_by_its_watcher(copy, tiny_models):
    """SIGKILL cannot be caught: the stage's watcher sees its pipe close with the run still RUNNING.
    Nothing else starts meanwhile (the next start's clean-up would mark it FAILED)."""
    from openai_server import ModelServer

    with ModelServer() as server:  # holds every request: the stage waits there, its run RUNNING
        server.hold_from = 0
        set_params(
            copy,
            **{
                "tracking.experiment": "sigkill",
                "attributes.extract.backend": "openai",
                "attributes.extract.model": "tiny",
                "attributes.extract.base_url": server.base_url,
            },
        )
        proc = start_stage(copy, "extract.py", "toy-bird")
        wait_until(proc, server.holding.is_set, timeout=120)
        (run,) = experiment_runs("sigkill")
        assert run.info.status == "RUNNING"
        proc.kill()
        proc.wait(timeout=60)
        deadline = time.monotonic() + 60
        while experiment_runs("sigkill")[0].info.status == "RUNNING" and time.monotonic() < deadline:
            time.sleep(0.2)
        server.release.set()
    (run,) = experiment_runs("sigkill")
    assert run.info.status == "KILLED" and run.data.tags["end_reason"] == KILLED_WITHOUT_A_WORD
    assert run.info.end_time is not None


EVERY_STAGE = [
    ("prepare.py", "toy-bird"),
    ("discover.py", "toy-bird"),
    ("extract.py", "toy-bird"),
    ("summarize.py", "toy-bird"),
    ("bootstrap.py",),
    ("embed.py", "toy-bird"),
    ("mine.py", "toy-bird"),
    ("build_instructions.py",),
    ("train_stage1.py",),
    ("train_stage2.py",),
    ("evaluate.py", "base"),
    ("analyze.py",),
]  # every stage that writes (check_params writes nothing)
FULL_WORKDIR = """
mount -t tmpfs -o size=64k tmpfs "$FOLDER" || exit 99
cp "$PARAMS" "$FOLDER/params.yaml" && head -c 64m /dev/zero > "$FOLDER/filler" 2>/dev/null
cd "$FOLDER" && "$@"
rc=$?
find . -mindepth 1 -printf '%P\n' > "$LISTING"
exit $rc
"""


@pytest.mark.parametrize("stage", EVERY_STAGE, ids=lambda s: Path(s[0]).stem)
def test_every_stage_names_a_read_only_working_folder_in_one_line(tmp_path, stage):
    root = tmp_path / "w"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    with read_only(root):
        proc = subprocess.run(
            [sys.executable, str(REPO / "stages" / stage[0]), *stage[1:]],
            cwd=root,
            capture_output=True,
            text=True,
            env=stage_env(),
        )
    line = error_line(proc.stderr)
    name = f"{Path(stage[0]).stem}@{stage[1]}" if len(stage) > 1 else Path(stage[0]).stem
    assert proc.returncode == 1 and line.startswith(f"error: {name}: cannot write "), line
    assert "make . writable" in line or "writable and rerun" in line, line
    assert sorted(p.name for p in root.iterdir()) == ["params.yaml"]


@pytest.mark.parametrize("stage", EVERY_STAGE, ids=lambda s: Path(s[0]).stem)
def test_every_stage_names_a_full_disk_in_one_line(tmp_path, stage):
    if not can_mount_tmpfs():
        pytest.skip("no private mount namespace (unshare -rm) to mount a small tmpfs in")
    root, listing = tmp_path / "w", tmp_path / "listing.txt"
    root.mkdir()
    env = stage_env() | {"FOLDER": str(root), "PARAMS": str(REPO / "params.yaml"), "LISTING": str(listing)}
    command = [sys.executable, str(REPO / "stages" / stage[0]), *stage[1:]]
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", FULL_WORKDIR, "sh", *command], capture_output=True, text=True, env=env
    )
    assert proc.returncode != 99, proc.stderr
    line = error_line(proc.stderr)
    name = f"{Path(stage[0]).stem}@{stage[1]}" if len(stage) > 1 else Path(stage[0]).stem
    assert proc.returncode == 1 and line.startswith(f"error: {name}: cannot write "), line
    assert "(No space left on device); free disk space and rerun" in line, line
    assert sorted(listing.read_text().split()) == ["filler", "params.yaml"]
