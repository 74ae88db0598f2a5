import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # the fixture builders next to the tests

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.pop("DVC_EXP_NAME", None)


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory):
    """Tests log to a throw-away MLflow store, never to the repository's mlflow.db."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


def stage_env() -> dict[str, str]:
    """Environment for running stages or dvc in a subprocess with this interpreter first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env
