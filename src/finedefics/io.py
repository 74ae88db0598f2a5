"""Files in and out: every stage writes to a temporary sibling and renames it into place; a
parquet artefact's columns are declared once (a `Table`, in `finedefics.artefacts`) and checked when it
is written and when it is read; images are read as RGB."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: the stage runner and light stages start without them
    import pandas as pd
    import pyarrow as pa
    from PIL import Image


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` (file or folder). On any
    failure the temporary path is removed, so nothing half-written is left, and the exception carries
    `path` as its `WRITING` attribute (the outermost, when one write holds others: the stage's
    output, which the stage runner names)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove(tmp)
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException as err:
        try:
            setattr(err, WRITING, path)
        except AttributeError:
            pass
        try:
            _remove(tmp)
        except OSError:
            pass  # the error that stopped the write is the one to report
        raise


WRITING = "finedefics_writing"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class StageError(RuntimeError):
    """A failure a stage reports in one line (exit code 1): the stage runner prints it, no traceback."""


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
    import pyarrow as pa

    if pa.types.is_large_string(kind):
        return pa.string()
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return pa.list_(_plain(kind.value_type))
    return kind


def _fits(actual: pa.DataType, declared: pa.DataType) -> bool:
    import pyarrow as pa

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
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.check(pa.Schema.from_pandas(frame, preserve_index=False), path)
        table = pa.Table.from_pandas(frame[list(self.columns)], schema=pa.schema(self.columns), preserve_index=False)
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)

    def read(self, path: str | Path) -> pd.DataFrame:
        import pandas as pd
        import pyarrow.parquet as pq

        path = Path(path)
        if not path.is_file():
            raise ArtefactError(f"{path}: not found (run the stage that writes it: `dvc repro`)")
        self.check(pq.read_schema(path), path)
        return pd.read_parquet(path)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def load_image(path: str | Path) -> Image.Image:
    from PIL import Image

    with Image.open(Path(path)) as im:
        return im.convert("RGB")


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised where the stage is (as Ctrl-C's SIGINT raises `KeyboardInterrupt`)."""


@dataclass
class _Progress:
    where: str | None = None  # e.g. "train stage1 step 5 of 12"
    resumes: str | None = None  # what a re-run resumes from, e.g. "its checkpoint of step 4"


_PROGRESS = _Progress()


def progress(where: str | None, resumes: str | None = None) -> None:
    """Note where a long stage is and what a re-run would resume from; an interrupted stage says so."""
    _PROGRESS.where, _PROGRESS.resumes = where, resumes


def interrupted_line(stage: str, signame: str) -> str:
    where = f" at {_PROGRESS.where}" if _PROGRESS.where else ""
    then = f"resumes from {_PROGRESS.resumes}" if _PROGRESS.resumes else "runs it again"
    return f"interrupted ({signame}): {stage} stopped{where}; `dvc repro` {then}"


STAGE_ENV = "FINEDEFICS_STAGE"  # set by the stage runner while a stage runs (its name), for tracking
