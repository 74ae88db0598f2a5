"""Files in and out: every stage writes to a temporary sibling and renames it into place; a
parquet artefact's columns are declared once (a `Table`, in `finedefics.artefacts`) and checked when it
is written and when it is read; images are read as RGB."""

from __future__ import annotations

import json
import os
import shutil
import sys
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


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


class ArtefactError(ValueError):
    """A table whose columns are not the declared ones; the message is one line naming the file."""


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


def run_main(main: Callable[[], None]) -> None:
    """A stage's entry point: an artefact that is not what its declaration says ends the stage
    with one line naming the file and the column, and exit code 1."""
    try:
        main()
    except ArtefactError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
