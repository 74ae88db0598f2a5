import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # the fixture builders next to the tests

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.pop("DVC_EXP_NAME", None)
# CPU training is bit-exact run to run only at a fixed thread count: sft.train gave another model under
# 1 than under 2 threads (bootstrap test, seed 3: caption accuracy 0.79 against 0.93), and torch's
# default is the machine's core count. Tests and the stages they start use 2 threads, the count of the
# 2-core machine the suite is timed on, so a larger machine reproduces its numbers.
TEST_THREADS = 2
os.environ["OMP_NUM_THREADS"] = str(TEST_THREADS)  # the stages run in subprocesses


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory):
    """Tests log to a throw-away MLflow store, never to the repository's mlflow.db."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return uri


@pytest.fixture
def mlflow_uri(monkeypatch, tmp_path) -> str:
    """A test's own MLflow store (tmp_path/store.db), set as MLFLOW_TRACKING_URI for the test."""
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="session", autouse=True)
def fixed_threads():
    import torch

    torch.set_num_threads(TEST_THREADS)


@pytest.fixture(autouse=True)
def seeded_torch():
    """Every test starts from the same global torch RNG state: LoRA initialisation and sampled
    generation draw from it, so a test's outcome does not depend on which tests ran before."""
    import torch

    torch.manual_seed(0)


def stage_env() -> dict[str, str]:
    """Environment for running stages or dvc in a subprocess with this interpreter first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Paths of a tiny Idefics2 ("vlm") and a tiny Mistral ("lm") sharing one trained tokenizer, and a
    tiny Qwen2.5-VL ("qwen")."""
    from tiny_models import build

    return build(tmp_path_factory.mktemp("tiny_models"))


def make_world_workdir(root: Path, name: str = "toy-bird", **world) -> Path:
    """A stage working directory holding a small prepared world dataset, its static keys and params."""
    import json

    import yaml

    from finedefics.artefacts import IMAGES
    from finedefics.attributes.discover import static_keys
    from finedefics.config import WorldConfig
    from finedefics.data.prepare import prepare_world

    cfg = WorldConfig(
        **{"categories": 6, "cluster_size": 3, "train_per_class": 2, "test_per_class": 1, "image_size": 64, **world}
    )
    out = root / "data" / "prepared" / name
    out.mkdir(parents=True)
    prepared = prepare_world(name, REPO / "world" / f"{name}.yaml", cfg, 0, out, Path("data/prepared") / name)
    IMAGES.write(out / "images.parquet", prepared.dataset.images)
    (out / "classes.json").write_text(json.dumps(prepared.dataset.to_json()))
    keys, source = static_keys(prepared.dataset, None)
    (root / "data" / "attributes" / name).mkdir(parents=True)
    (root / "data" / "attributes" / name / "keys.json").write_text(
        json.dumps({"keys": [k.to_dict() for k in keys], "raw": source})
    )
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["world"] = cfg.model_dump()
    params["datasets"] = {name: f"world/{name}.yaml"}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def set_dotted(tree: dict, dotted: str, value, sep: str = ".", create: bool = True) -> None:
    """Set the key `dotted` ("train.stage1.lr") of a params tree. `create` False: the sections on
    the way must exist already (a KeyError names the missing one), so a typo makes no new section."""
    node = tree
    *path, last = dotted.split(sep)
    for part in path:
        node = node.setdefault(part, {}) if create else node[part]
    node[last] = value


def leaves(tree: dict, prefix: str = "") -> dict:
    """{dotted key: value} of every leaf of a params mapping; an empty mapping is a leaf."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out |= leaves(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def set_params(root: Path, **changes) -> None:
    """Change dotted keys of root/params.yaml, e.g. set_params(root, **{"attributes.extract.backend": "hf"})."""
    import yaml

    params = yaml.safe_load((root / "params.yaml").read_text())
    for dotted, value in changes.items():
        set_dotted(params, dotted, value)
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def run_stage(root: Path, stage: str, *args: str, torch_free: bool = False, **kwargs):
    """Run stages/<stage> in `root`. `torch_free`: with a `torch` first on the path whose import
    fails, so a light stage that imports torch (seconds of start-up) fails."""
    import subprocess

    env = stage_env()
    if torch_free:
        blocker = root / ".no-torch" / "torch"
        blocker.mkdir(parents=True, exist_ok=True)
        (blocker / "__init__.py").write_text("raise ImportError('a light stage imported torch')\n")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(blocker.parent), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, str(REPO / "stages" / stage), *args],
        cwd=root,
        capture_output=True,
        text=True,
        env=env,
        **kwargs,
    )


def wilson_by_hand(k: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of k successes in n trials, from its closed form (z: 95% by default)."""
    p = k / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * (p * (1 - p) / n + z**2 / (4 * n**2)) ** 0.5
    return centre - half, centre + half


def free_port() -> int:
    """A port the OS reports free now, for a gloo rendezvous; a port derived from the pid could collide
    with another test run's (or anything else listening)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fit_config(**changes):
    """A `FitConfig` for tests: lr 0.1, no warm-up, one global batch of 2 on one device, a checkpoint
    after every step, a constant schedule, no weight decay, gradients clipped at 1; `changes` override."""
    from finedefics.training import FitConfig

    defaults = {
        "lr": 0.1,
        "warmup_steps": 0,
        "batch_size": 2,
        "per_device_batch_size": 2,
        "checkpoint_every": 1,
        "schedule": "constant",
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
    }
    return FitConfig(**(defaults | changes))


# Stage I / II training settings of the tiny training workdir: one epoch of 3 steps, a checkpoint after each.
TRAIN = {
    "train.stage1": {"epochs": 1, "lr": 1e-3, "warmup_steps": 1, "batch_size": 4},
    "train.stage2": {"epochs": 1, "lr": 1e-3, "warmup_steps": 1, "batch_size": 4},
    "train.per_device_batch_size": 2,
    "train.checkpoint_every": 1,
}


def write_instructions(root: Path, name: str = "toy-bird", seed: int = 0) -> None:
    """Stage I / II data for the prepared world in root: descriptions are the captions, negatives
    are random wrong classes (what `mine` would write, without CLIP)."""
    import json

    import numpy as np
    import pandas as pd

    from finedefics.align.instructions import stage1_frame, stage2_frame
    from finedefics.artefacts import STAGE1, STAGE2
    from finedefics.data.prepared import load_prepared
    from finedefics.models import world_text as wt

    dataset = load_prepared(name, root / "data" / "prepared")
    keys, train = dataset.keys, dataset.train
    captions = {r.image_id: wt.caption("bird", keys[:3], json.loads(r.attributes)) for r in train.itertuples()}
    descriptions = pd.DataFrame({"image_id": list(captions), "description": list(captions.values())})
    rng = np.random.default_rng(seed)
    names = dataset.names
    first = train.groupby("label").image_id.first()
    rows = []
    for r in train.itertuples():
        wrong = rng.choice([i for i in range(len(names)) if i != r.label], size=3, replace=False)
        rows.append(
            {
                "image_id": r.image_id,
                "label": r.label,
                "negative_categories": [names[i] for i in wrong],
                "negative_descriptions": [captions[first[i]] for i in wrong],
                "distractor_categories": [names[i] for i in wrong],
            }
        )
    negatives = pd.DataFrame(rows)
    target = root / "data" / "instructions"
    target.mkdir(parents=True, exist_ok=True)
    STAGE1.write(target / "stage1.parquet", stage1_frame(dataset, descriptions, negatives))
    STAGE2.write(target / "stage2.parquet", stage2_frame(dataset, negatives, "open+closed", seed))


@pytest.fixture(scope="module")
def train_workdir(tmp_path_factory, tiny_models) -> Path:
    """A stage working directory with Stage I / II data (`write_instructions`), the tiny VLM as its
    base and the `TRAIN` settings; one per test module."""
    root = make_world_workdir(
        tmp_path_factory.mktemp("train"), categories=6, cluster_size=3, train_per_class=2, test_per_class=1
    )
    write_instructions(root)
    set_params(root, **{"model.base": str(tiny_models["vlm"]), **TRAIN})
    return root
