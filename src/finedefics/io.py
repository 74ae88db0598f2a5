"""Files in and out: every stage writes to a temporary sibling and renames it into place; a
parquet artefact's columns are declared once (a `Table`, in `finedefics.artefacts`) and checked when it
is written and when it is read; images are read as RGB."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` (file or folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    os.replace(tmp, path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class StageError(RuntimeError):
    """A failure a stage reports in one line (exit code 1): `run_main` prints it, no traceback."""


class ArtefactError(ValueError):
    """A table whose columns are not the declared ones; the message is one line naming the file."""


def _non_finite(data: Any, key: str = "") -> str | None:
    """The dotted key of the first infinite or NaN number in `data` (JSON has neither)."""
    if isinstance(data, float) and not math.isfinite(data):
        return key or "(top level)"
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, (list, tuple)) else ()
    for k, v in items:
        found = _non_finite(v, f"{key}.{k}" if key else str(k))
        if found is not None:
            return found
    return None


def write_json(path: str | Path, data: Any) -> None:
    """Write `data` as JSON; an infinite or NaN number (not valid JSON) is a `StageError` naming the key."""
    bad = _non_finite(data)
    if bad is not None:
        raise StageError(f"{path}: {bad} is not a finite number; nothing was written")
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def _plain(kind: pa.DataType) -> pa.DataType:
    """`kind` with large strings and lists as plain ones (pandas writes either)."""
    if pa.types.is_large_string(kind):
        return pa.string()
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return pa.list_(_plain(kind.value_type))
    return kind


def _fits(actual: pa.DataType, declared: pa.DataType) -> bool:
    actual, declared = _plain(actual), _plain(declared)
    if pa.types.is_list(actual) and pa.types.is_list(declared):
        return pa.types.is_null(actual.value_type) or _fits(actual.value_type, declared.value_type)  # only empty lists
    return actual == declared


@dataclass(frozen=True)
class Table:
    """The declared columns of a parquet artefact, checked when it is written and when it is read."""

    columns: dict[str, pa.DataType]

    def check(self, actual: pa.Schema, path: str | Path) -> None:
        for name, declared in self.columns.items():
            if name not in actual.names:
                raise ArtefactError(f"{path}: column '{name}' is missing (expected {declared})")
            if not _fits(actual.field(name).type, declared):
                raise ArtefactError(f"{path}: column '{name}' is {actual.field(name).type}, expected {declared}")
        extra = [n for n in actual.names if n not in self.columns and not n.startswith("__index_level")]
        if extra:
            raise ArtefactError(f"{path}: column '{extra[0]}' is not declared (columns: {', '.join(self.columns)})")

    def write(self, path: str | Path, frame: pd.DataFrame) -> None:
        self.check(pa.Schema.from_pandas(frame, preserve_index=False), path)
        table = pa.Table.from_pandas(frame[list(self.columns)], schema=pa.schema(self.columns), preserve_index=False)
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)

    def read(self, path: str | Path) -> pd.DataFrame:
        path = Path(path)
        if not path.is_file():
            raise ArtefactError(f"{path}: not found (run the stage that writes it: `dvc repro`)")
        self.check(pq.read_schema(path), path)
        return pd.read_parquet(path)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def load_image(path: str | Path) -> Image.Image:
    with Image.open(Path(path)) as im:
        return im.convert("RGB")


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised where the stage is (as Ctrl-C's SIGINT raises `KeyboardInterrupt`)."""


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


@dataclass
class _Progress:
    where: str | None = None  # e.g. "train stage1 step 5 of 12"
    resumes: str | None = None  # what a re-run resumes from, e.g. "its checkpoint of step 4"


_PROGRESS = _Progress()


def progress(where: str | None, resumes: str | None = None) -> None:
    """Note where a long stage is and what a re-run would resume from; an interrupted stage says so."""
    _PROGRESS.where, _PROGRESS.resumes = where, resumes


def stage_name(argv: list[str] | None = None) -> str:
    """The DVC stage a stage entry file runs as: `train_stage1`, `extract@toy-bird`."""
    argv = sys.argv if argv is None else argv
    name = Path(argv[0]).stem
    return f"{name}@{argv[1]}" if len(argv) > 1 else name


def interrupted_line(stage: str, signame: str) -> str:
    where = f" at {_PROGRESS.where}" if _PROGRESS.where else ""
    then = f"resumes from {_PROGRESS.resumes}" if _PROGRESS.resumes else "runs it again"
    return f"interrupted ({signame}): {stage} stopped{where}; `dvc repro` {then}"


def run_main(main: Callable[[], None]) -> None:
    """A stage's entry point. An artefact that is not what its declaration says, or any `StageError`,
    ends the stage with one line (`error: ...`) and exit code 1. Ctrl-C (SIGINT) and SIGTERM end it
    with one line saying where it stopped and what a re-run resumes, and exit code 130."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        main()
    except (ArtefactError, StageError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt as err:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C does not break the last line
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signame = str(err) if isinstance(err, Interrupted) else "SIGINT"
        print(interrupted_line(stage_name(), signame), file=sys.stderr, flush=True)
        raise SystemExit(130) from None
