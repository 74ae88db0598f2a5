"""MLflow tracking: one context manager every stage runs inside.

The store is `sqlite:///<repo>/mlflow.db` unless `MLFLOW_TRACKING_URI` is set. Runs are
tagged with the git commit, the DVC experiment name (`DVC_EXP_NAME`) and the stage, so a
run in `mlflow ui` can be traced to the code and the `dvc exp` that made it. Stages of a
queued or `--temp` DVC experiment run in `.dvc/tmp/exps/<tmp>/`; their runs still go to the
main repository's store.

A run ends FINISHED, FAILED (the stage raised) or KILLED (Ctrl-C or SIGTERM), with the reason in
its `end_reason` tag. A run left RUNNING by a process that died without a word (SIGKILL, out of
memory, power loss) is closed as FAILED when the same stage next starts on that machine: each run
records its host and process, and a run whose process is gone is closed.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finedefics.config import Params
from finedefics.io import Interrupted

TRACKING_ENV = "MLFLOW_TRACKING_URI"


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
            client.set_tag(run.info.run_id, "end_reason", "its process ended without a word (SIGKILL?)")
            client.set_terminated(run.info.run_id, "FAILED")
            closed.append(run.info.run_id)
    return closed


def _end(status: str, reason: str) -> None:
    """End the active run; a second Ctrl-C meanwhile waits until it is written."""
    import mlflow

    signals = {signal.SIGINT, signal.SIGTERM}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        if reason:
            mlflow.set_tag("end_reason", reason)
        mlflow.end_run(status)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


@contextmanager
def stage_run(stage: str, params: Params, run_name: str | None = None) -> Iterator[StageRun]:
    """Start an MLflow run for `stage` and log `params`; end it FINISHED, FAILED if the stage raises,
    KILLED if it is interrupted (SIGINT, SIGTERM). Earlier runs of `stage` whose process is gone are
    closed first."""
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
    try:
        handle = StageRun(run.info.run_id)
        handle.log_params(params.flat())
        yield handle
    except KeyboardInterrupt as err:
        _end("KILLED", str(err) if isinstance(err, Interrupted) else "SIGINT")
        raise
    except SystemExit as err:
        ok = err.code in (None, 0)
        _end("FINISHED" if ok else "FAILED", "" if ok else f"exit code {err.code}")
        raise
    except BaseException as err:
        _end("FAILED", f"{type(err).__name__}: {err}".splitlines()[0][:500])
        raise
    else:
        _end("FINISHED", "")
