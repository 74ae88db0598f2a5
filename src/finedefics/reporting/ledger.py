"""The experiment ledger: the evidence behind the reports, committed with them (`reports/ledger/`).

Two parquet files (schemas in `finedefics.artefacts`): `experiments.parquet`, one row per finished DVC
experiment (name, commit, flattened params, metrics), and `outcomes.parquet`, one row per experiment, model,
dataset and test image with the image's outcome in each option order. `finedefics ledger` appends what
`dvc exp show` finishes (reading each experiment's predictions files from DVC's cache); `finedefics report`
reads only the ledger, so a fresh clone regenerates the reports byte for byte, and experiments outlive the
machine that ran them.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from finedefics.artefacts import LEDGER_EXPERIMENTS, LEDGER_OUTCOMES
from finedefics.io import Table as IoTable
from finedefics.io import atomic_path

FOLDER = Path("reports/ledger")
MODELS = ("finedefics", "base", "clip/mining", "clip/baseline")  # folders under results/predictions/
SEED = "train.seed"


@dataclass(frozen=True)
class Experiment:
    name: str
    rev: str
    commit: str  # the commit the experiment ran on
    timestamp: str
    params: dict[str, Any]  # flattened params.yaml
    metrics: dict[str, Any]  # metrics file -> its content
    machine: str = ""

    def seed(self, default: dict[str, Any]) -> int:
        return int(self.params.get(SEED, default.get(SEED, 0)))


# (experiment, predictions folder) -> per dataset, each test image's score (its mean over option orders);
# None where the ledger has no predictions of that model for the experiment
Scores = Callable[[Experiment, str], "list[dict[str, float]] | None"]


@dataclass(frozen=True)
class Ledger:
    experiments: tuple[Experiment, ...]  # newest first
    outcomes: pd.DataFrame  # LEDGER_OUTCOMES

    def scores(self, datasets: list[str], unseen: bool | None = None) -> Scores:
        """Per-image scores of each (experiment, model); with `unseen` True (False), only the test images of
        the classes training never showed (showed)."""
        frame = self.outcomes if unseen is None else self.outcomes[self.outcomes["unseen"] == unseen]
        table: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
        for rev, model, dataset, image, score in zip(
            frame["rev"], frame["model"], frame["dataset"], frame["image"], _means(frame["correct"])
        ):
            table.setdefault((rev, model), {}).setdefault(dataset, {})[image] = score

        def scores(exp: Experiment, model: str) -> list[dict[str, float]] | None:
            found = table.get((exp.rev, model), {})
            return [found[d] for d in datasets] if all(d in found for d in datasets) else None

        return scores

    def add(self, experiments: list[Experiment], outcomes: list[pd.DataFrame]) -> Ledger:
        exps = sorted([*self.experiments, *experiments], key=lambda e: (e.timestamp, e.rev), reverse=True)
        frames = [f for f in (self.outcomes, *outcomes) if len(f)]
        return Ledger(tuple(exps), pd.concat(frames, ignore_index=True) if frames else _empty_outcomes())


def _means(correct: pd.Series) -> np.ndarray:
    """Each row's share of correct option orders."""
    if not len(correct):
        return np.zeros(0)
    lengths = np.fromiter((len(c) for c in correct), int, len(correct))
    flat = np.concatenate([np.asarray(c, dtype=float) for c in correct])
    return np.add.reduceat(flat, np.concatenate([[0], np.cumsum(lengths)[:-1]])) / lengths


def _empty_outcomes() -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(dtype=object) for name in LEDGER_OUTCOMES.columns})


def empty() -> Ledger:
    return Ledger((), _empty_outcomes())


def read(folder: Path = FOLDER) -> Ledger:
    frame = LEDGER_EXPERIMENTS.read(folder / "experiments.parquet")
    exps = [
        Experiment(r.name, r.rev, r.commit, r.timestamp, json.loads(r.params), json.loads(r.metrics), r.machine)
        for r in frame.itertuples()
    ]
    return empty().add(exps, [LEDGER_OUTCOMES.read(folder / "outcomes.parquet")])


def write(ledger: Ledger, folder: Path = FOLDER) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "rev": e.rev,
            "name": e.name,
            "commit": e.commit,
            "timestamp": e.timestamp,
            "machine": e.machine,
            "params": json.dumps(e.params, sort_keys=True),
            "metrics": json.dumps(e.metrics, sort_keys=True),
        }
        for e in reversed(ledger.experiments)  # oldest first: appending keeps earlier rows where they were
    ]
    _write(
        LEDGER_EXPERIMENTS, folder / "experiments.parquet", pd.DataFrame(rows, columns=list(LEDGER_EXPERIMENTS.columns))
    )
    _write(LEDGER_OUTCOMES, folder / "outcomes.parquet", ledger.outcomes)


def _write(table: IoTable, path: Path, frame: pd.DataFrame) -> None:
    """`frame` under `table`'s declared schema (an empty ledger has no values to infer types from), compressed."""
    data = pa.Table.from_pandas(frame[list(table.columns)], schema=pa.schema(table.columns), preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(data, tmp, compression="zstd")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def experiments(show: list[dict], machine: str = "") -> list[Experiment]:
    """The finished experiments of `dvc exp show --json` (any baseline commit), newest first."""
    out = []
    for baseline in show:
        for exp in baseline.get("experiments") or []:
            executor = exp.get("executor") or {}
            if executor.get("state", "success") != "success":
                continue  # queued, running or failed
            rev = exp["revs"][0]
            data = rev.get("data")
            if not data or rev.get("error"):
                continue
            params = data.get("params", {}).get("params.yaml", {}).get("data", {})
            metrics = {path: m.get("data", {}) for path, m in data.get("metrics", {}).items()}
            name = exp.get("name") or rev["rev"][:7]
            out.append(
                Experiment(
                    name, rev["rev"], baseline["rev"], data.get("timestamp") or "", flatten(params), metrics, machine
                )
            )
    return sorted(out, key=lambda e: (e.timestamp, e.rev), reverse=True)


def outcome_rows(rev: str, model: str, dataset: str, results: dict) -> pd.DataFrame:
    """A FOCI results file's predictions as ledger rows: per image (first-seen order), per option order,
    whether the prediction named the correct class."""
    unseen_classes = set(results.get("config", {}).get("unseen_classes", []))
    right: dict[str, list[bool]] = {}
    unseen: dict[str, bool] = {}
    for p in results["predictions"]:
        right.setdefault(p["image"], []).append(p["predicted"] == p["correct"])
        unseen[p["image"]] = p["correct"] in unseen_classes
    images = list(right)
    return pd.DataFrame(
        {
            "rev": rev,
            "model": model,
            "dataset": dataset,
            "image": images,
            "unseen": [unseen[i] for i in images],
            "correct": [right[i] for i in images],
        }
    )


def dvc_exp_show(repo: Path) -> list[dict]:
    command = [sys.executable, "-m", "dvc", "exp", "show", "--json", "--all-commits"]  # this environment's DVC
    done = subprocess.run(command, cwd=repo, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`dvc exp show --json` failed in {repo}: {done.stderr.strip()}")
    return json.loads(done.stdout)


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores"


def collect(
    ledger: Ledger, show: list[dict], read_results: Callable[[Experiment, str, str], dict | None]
) -> tuple[Ledger, list[str]]:
    """`ledger` with the finished experiments of `show` it does not hold yet, and a line per experiment
    on what happened. `read_results(exp, model, dataset)` gives a results file's content, None when the
    experiment has no such file; an experiment without its final model's predictions is left out."""
    known = {e.rev for e in ledger.experiments}
    added, frames, notes = [], [], []
    for exp in experiments(show, machine()):
        if exp.rev in known:
            continue
        known.add(exp.rev)
        datasets = sorted({k.split(".", 1)[1] for k in exp.params if k.startswith("datasets.")})
        if not datasets:  # `dvc exp show` could not read its params.yaml: no row could find it rightly
            notes.append(f"{exp.name}: left out, `dvc exp show` gives no params (datasets) for it")
            continue
        models, rows = [], []
        for model in MODELS:
            files = [read_results(exp, model, d) for d in datasets]
            if None not in files:
                models.append(model)
                rows += [outcome_rows(exp.rev, model, d, f) for d, f in zip(datasets, files)]
        if "finedefics" not in models or not all(len(r) for r in rows):
            notes.append(f"{exp.name}: left out, its final model's predictions are not in DVC's cache")
            continue
        added.append(exp)
        frames += rows
        notes.append(f"{exp.name}: added ({', '.join(models)})")
    return ledger.add(added, frames), notes


def dvc_results(repo: Path) -> Callable[[Experiment, str, str], dict | None]:
    """Reads an experiment's results files from DVC's cache at its rev (None when one is absent)."""
    from dvc.api import DVCFileSystem

    systems: dict[str, DVCFileSystem] = {}

    def read(exp: Experiment, model: str, dataset: str) -> dict | None:
        if exp.rev not in systems:  # one filesystem per experiment, for its eight results files
            systems[exp.rev] = DVCFileSystem(str(repo), rev=exp.rev)
        fs = systems[exp.rev]
        path = f"results/predictions/{model}/{dataset}.json"
        try:
            text = fs.read_text(path)
        except FileNotFoundError:  # not an output of this experiment, or gone from the cache; anything else is raised
            return None
        return json.loads(text)

    return read
