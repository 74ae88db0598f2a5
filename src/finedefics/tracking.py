"""MLflow tracking: one context manager every stage runs inside.

The store is `sqlite:///<repo>/mlflow.db` unless `MLFLOW_TRACKING_URI` is set. Runs are
tagged with the git commit, the DVC experiment name (`DVC_EXP_NAME`) and the stage, so a
run in `mlflow ui` can be traced to the code and the `dvc exp` that made it. Stages of a
queued or `--temp` DVC experiment run in `.dvc/tmp/exps/<tmp>/`; their runs still go to the
main repository's store.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finedefics.config import Params

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

    def log_params(self, params: dict[str, Any]) -> None:
        import mlflow

        mlflow.log_params({k: _param_value(v) for k, v in params.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        import mlflow

        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def _param_value(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


@contextmanager
def stage_run(stage: str, params: Params, run_name: str | None = None) -> Iterator[StageRun]:
    """Start an MLflow run for `stage`, log `params`, and end it FAILED if the stage raises."""
    import mlflow

    logging.getLogger("alembic").setLevel(logging.WARNING)
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    name = params.tracking.experiment
    if mlflow.get_experiment_by_name(name) is None:
        artifacts = (repo_root() / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
        mlflow.create_experiment(name, artifact_location=artifacts)
    mlflow.set_experiment(name)
    commit = git_commit()
    tags = {
        "stage": stage,
        "git_commit": commit,
        "mlflow.source.git.commit": commit,
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
    }
    with mlflow.start_run(run_name=run_name or stage, tags=tags) as run:
        handle = StageRun(run.info.run_id)
        handle.log_params(params.flat())
        yield handle
