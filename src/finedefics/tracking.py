"""MLflow tracking: one context manager every stage runs inside.

The store is `sqlite:///<repo>/mlflow.db` unless `MLFLOW_TRACKING_URI` is set. Runs are
tagged with the git commit, the DVC experiment name (`DVC_EXP_NAME`) and the stage, so a
run in `mlflow ui` can be traced to the code and the `dvc exp` that made it. Stages of a
queued or `--temp` DVC experiment run in `.dvc/tmp/exps/<tmp>/`; their runs still go to the
main repository's store.

A run ends FINISHED, FAILED (the stage raised) or KILLED (Ctrl-C or SIGTERM), with the reason in
its `end_reason` tag. A stage's process cannot catch SIGKILL (nor the out-of-memory killer's), so a
stage run by the stage runner (`finedefics.runner`) leaves a watcher beside its run: a small process
holding one end of a pipe, which the stage closes when it ends the run. If the pipe closes with the
run still RUNNING, the stage died without a word and the watcher marks the run KILLED within a
second or two. A run left RUNNING all the same (the watcher died too: power loss) is closed as
FAILED when the same stage next starts on that machine: each run records its host and process, and
a run whose process is gone is closed.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finedefics.config import Params
from finedefics.io import STAGE_ENV, Interrupted

TRACKING_ENV = "MLFLOW_TRACKING_URI"
KILLED_WITHOUT_A_WORD = "its process ended without a word (SIGKILL?)"


def repo_root(start: str | Path | None = None) -> Path:
    """The DVC repository root; for a DVC temp workspace, the main repository's root."""
    here = Path(start or Path.cwd()).resolve()
    root = next((p for p in (here, *here.parents) if (p / ".dvc").is_dir()), here)
    parts = root.parts
    for i in range(len(parts) - 3):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


def tracking_uri() -> str:
    return os.environ.get(TRACKING_ENV) or f"sqlite:///{repo_root() / 'mlflow.db'}"


def git_commit(cwd: str | Path | None = None) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass
class StageRun:
    """Handle to the active run; thin wrappers so stages do not import mlflow."""

    run_id: str

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def every(self, steps: int, prefix: str = "") -> Callable[[dict[str, float], int], None]:
        """A training loop's `log`: the values of every `steps`-th step, keys prefixed."""

        def log(metrics: dict[str, float], step: int) -> None:
            if step % steps == 0:
                self.log_metrics({f"{prefix}{k}": v for k, v in metrics.items()}, step)

        return log

    @contextmanager
    def steps(self, flush_every: int = 20) -> Iterator[Callable[[dict[str, float], int], None]]:
        """A training loop's `log` that keeps every step's values and writes them in one batch per
        `flush_every` steps and on leaving (one database write per step cost ~10 ms). Training
        flushes at its checkpoints, so a killed run's history reaches its last checkpoint."""
        import time

        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        pending: list[Metric] = []

        def flush() -> None:
            if pending:
                MlflowClient().log_batch(self.run_id, metrics=pending)
                pending.clear()

        def log(metrics: dict[str, float], step: int) -> None:
            now = int(time.time() * 1000)
            pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
            if step % flush_every == 0:
                flush()

        try:
            yield log
        finally:
            flush()

    def log_params(self, params: dict[str, Any]) -> None:
        import mlflow

        mlflow.log_params({k: _param_value(v) for k, v in params.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=artifact_path)


class Untracked(StageRun):
    """The handle of a process that logs nothing: every rank but the main one of a training stage
    launched on several processes (the main process's run is the stage's)."""

    def __init__(self) -> None:
        super().__init__("")

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    @contextmanager
    def steps(self, flush_every: int = 20) -> Iterator[Callable[[dict[str, float], int], None]]:
        yield lambda metrics, step: None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def _process_started(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch); None if there is no such process."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def _alive(tags: dict[str, str]) -> bool:
    """Whether the process that made a run (its `host`, `pid` and `process_started` tags) still runs."""
    if tags.get("host") != socket.gethostname():
        return True  # another machine's run: it cannot be checked from here
    try:
        pid, started = int(tags["pid"]), float(tags["process_started"])
    except (KeyError, ValueError):
        return False  # made before runs recorded their process: nothing runs it now
    now = _process_started(pid)
    return now is not None and abs(now - started) < 1.0  # the same pid, not a later process reusing it


def close_abandoned(experiment_id: str, stage: str) -> list[str]:
    """Close as FAILED the RUNNING runs of `stage` whose process is gone (killed with SIGKILL, say)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    closed = []
    for run in client.search_runs([experiment_id], f"tags.stage = '{stage}' and attributes.status = 'RUNNING'"):
        if not _alive(run.data.tags):
            client.set_tag(run.info.run_id, "end_reason", KILLED_WITHOUT_A_WORD)
            client.set_terminated(run.info.run_id, "FAILED")
            closed.append(run.info.run_id)
    return closed


# The watcher: waits on a pipe (stdin) whose only writer is the stage. A byte: the stage ended its
# run itself. End of file without one: the stage died; its run, if still RUNNING, is marked KILLED.
# It imports mlflow only then, so a watcher costs an idle interpreter while the stage runs.
WATCHER = """
import os, sys
if os.read(0, 1):
    raise SystemExit
from mlflow.tracking import MlflowClient
run_id, uri, reason = sys.argv[1:4]
client = MlflowClient(uri)
if client.get_run(run_id).info.status == "RUNNING":
    client.set_tag(run_id, "end_reason", reason)
    client.set_terminated(run_id, "KILLED")
"""


def _watch(run_id: str, uri: str) -> int:
    """Start the watcher of `run_id` (in its own session: a signal to the stage's process group does
    not reach it); the write end of its pipe, which `_release` closes."""
    read, write = os.pipe()  # neither end is inherited but as the watcher's stdin
    try:
        os.posix_spawn(  # not subprocess.Popen: the stage never waits for it
            sys.executable,
            [sys.executable, "-c", WATCHER, run_id, uri, KILLED_WITHOUT_A_WORD],
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, read, 0),
                (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
            ],
            setsid=True,
        )
    finally:
        os.close(read)
    return write


def _release(watcher: int | None) -> None:
    """Tell the watcher that the run is ended (it exits)."""
    if watcher is not None:
        try:
            os.write(watcher, b"1")
        except OSError:
            pass  # the watcher is gone: nothing to tell
        os.close(watcher)


def _end(status: str, reason: str, watcher: int | None = None) -> None:
    """End the active run, then release its watcher; a second Ctrl-C meanwhile waits until both are done."""
    import mlflow

    signals = {signal.SIGINT, signal.SIGTERM}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        if reason:
            mlflow.set_tag("end_reason", reason)
        mlflow.end_run(status)
    finally:
        _release(watcher)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


@contextmanager
def stage_run(stage: str, params: Params, run_name: str | None = None, tracked: bool = True) -> Iterator[StageRun]:
    """Start an MLflow run for `stage` and log `params`; end it FINISHED, FAILED if the stage raises,
    KILLED if it is interrupted (SIGINT, SIGTERM) and, under the stage runner, by its watcher if the
    process is killed outright (SIGKILL). Earlier runs of `stage` whose process is gone are closed
    first. `tracked` False (the other ranks of a training stage): no run, a handle that logs nothing."""
    if not tracked:
        yield Untracked()
        return
    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    name = params.tracking.experiment
    if mlflow.get_experiment_by_name(name) is None:
        artifacts = (repo_root() / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
        mlflow.create_experiment(name, artifact_location=artifacts)
    experiment = mlflow.set_experiment(name)
    close_abandoned(experiment.experiment_id, stage)
    commit = git_commit()
    tags = {
        "stage": stage,
        "git_commit": commit,
        "mlflow.source.git.commit": commit,
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
        "process_started": repr(_process_started(os.getpid())),
    }
    run = mlflow.start_run(run_name=run_name or stage, tags=tags)
    watcher = _watch(run.info.run_id, uri) if os.environ.get(STAGE_ENV) else None
    try:
        handle = StageRun(run.info.run_id)
        handle.log_params(params.flat())
        yield handle
    except KeyboardInterrupt as err:
        _end("KILLED", str(err) if isinstance(err, Interrupted) else "SIGINT", watcher)
        raise
    except SystemExit as err:
        ok = err.code in (None, 0)
        _end("FINISHED" if ok else "FAILED", "" if ok else f"exit code {err.code}", watcher)
        raise
    except BaseException as err:
        _end("FAILED", f"{type(err).__name__}: {err}".splitlines()[0][:500], watcher)
        raise
    else:
        _end("FINISHED", "", watcher)
