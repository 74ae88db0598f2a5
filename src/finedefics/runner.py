"""The one entry of every stage: `stages/<stage>.py` ends with `run(main)`.

`run` turns what a user can meet at the edges into one line on stderr and an exit code:

- an I/O failure (a folder that is not writable, a full disk, a missing input, a safetensors write
  error: any `OSError` or `SafetensorError` with an errno) into `error: <stage>: ...` naming the
  path and what to do, exit code 1. Outputs are written through `finedefics.io.atomic_path`, which
  removes its temporary path on any failure, so nothing half-written is left;
- an artefact that is not what its declaration says, or a `StageError`, into `error: ...`, exit 1;
- Ctrl-C (SIGINT) and SIGTERM into a line saying where the stage stopped and what a re-run resumes,
  exit 130.

Any other exception is a bug and keeps its traceback. Stages check early what they can: `writes`
(before anything is computed, each output's folder takes a file) and `reads` (each input file is
there). This module imports neither torch nor mlflow.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finedefics.io import STAGE_ENV, WRITING, ArtefactError, Interrupted, StageError, interrupted_line

NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}
NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
MISSING = {errno.ENOENT, errno.ENOTDIR}
FILES = NOT_WRITABLE | NO_SPACE | MISSING | {errno.EFBIG, errno.EISDIR, errno.EIO, errno.ENOTEMPTY, errno.EEXIST}


@dataclass(frozen=True)
class Fault:
    """An I/O failure of a stage: the path (None: unknown), its errno (None: unknown) and reason;
    `writing`: whether the stage was writing the path (an output) or reading it (an input)."""

    path: Path | None
    code: int | None
    reason: str
    writing: bool

    def line(self, stage: str) -> str:
        rerun = f"`dvc repro {stage}`"
        if self.path is None:
            return f"error: {stage}: {self.reason}" + (f"; {self._remedy()} and rerun {rerun}" if self.code else "")
        shown = _shown(self.path)
        if not self.writing and self.code in MISSING:
            return (
                f"error: {stage}: {shown} is missing ({self.reason}); restore it, or build it with {rerun} "
                "(which runs the stages before it)"
            )
        verb = "write" if self.writing else "read"
        return f"error: {stage}: cannot {verb} {shown} ({self.reason}); {self._remedy()} and rerun {rerun}"

    def _remedy(self) -> str:
        if self.code in NO_SPACE:
            return "free disk space"
        if self.code == errno.EFBIG:
            return "raise the file size limit (`ulimit -f`) or free disk space"
        if self.code in NOT_WRITABLE and self.path is not None:
            if self.writing:
                return f"make {_shown(_existing_folder(self.path))} writable"
            return "make it readable"
        return "fix it"


class FaultError(Exception):
    """Raised by `writes` and `reads`: a `Fault` found before the stage started its work."""

    def __init__(self, fault: Fault):
        super().__init__(fault.reason)
        self.fault = fault


def _shown(path: Path) -> str:
    """`path` relative to the working directory where it lies below it."""
    try:
        return str(Path(os.path.abspath(path)).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _existing_folder(path: Path) -> Path:
    """The folder an entry at `path` is made in: its parent, or the nearest ancestor that exists."""
    folder = Path(os.path.abspath(path)).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _within(name: str | os.PathLike, target: Path) -> bool:
    """Whether the file `name` is `target`, its temporary sibling or inside either."""
    path = Path(os.path.abspath(name))
    target = Path(os.path.abspath(target))
    tmp = target.with_name(f".{target.name}.tmp")
    return any(path == t or t in path.parents for t in (target, tmp))


def _errno_of(err: BaseException) -> tuple[int | None, str] | None:
    """The errno and reason of an I/O failure; None when `err` is not one."""
    if isinstance(err, OSError):  # a file system's errno; any other (a socket's, none) comes with its message
        code = err.errno if err.errno in FILES else None
        return code, os.strerror(code) if code else " ".join(str(err).split())
    if type(err).__name__ == "SafetensorError":  # its message holds the OS error: "... (os error 28)"
        found = re.search(r"os error (\d+)|code: (\d+)", str(err))
        if found:
            code = int(found.group(1) or found.group(2))
            return code, os.strerror(code)
    return None


def _torch_write_failure(err: BaseException, target: Path | None) -> tuple[int | None, str] | None:
    """`torch.save`'s writer stopping short on `target`: a RuntimeError that names no OS error
    ("unexpected pos ..."), which is what a full disk gives it."""
    text = str(err)
    if target is None or not isinstance(err, RuntimeError):
        return None
    if "inline_container" not in text and "PytorchStreamWriter" not in text:
        return None
    return errno.ENOSPC, "the write stopped short; the disk is likely full"


def fault_of(err: BaseException) -> Fault | None:
    """The `Fault` an exception a stage raised stands for; None when it is not an I/O failure."""
    if isinstance(err, FaultError):
        return err.fault
    target: Path | None = getattr(err, WRITING, None)
    found = _errno_of(err) or _torch_write_failure(err, target)
    if found is None:
        return None
    code, reason = found
    name = getattr(err, "filename", None)
    if target is not None and name is not None and not _within(name, target):
        target = None  # another file failed while the stage was writing `target`: an input it reads
    if target is not None:
        return Fault(target, code, reason, writing=True)
    if name is None:
        return Fault(None, code, reason, writing=False)
    path = Path(os.fsdecode(name))
    reading = code in MISSING or (path.exists() and not os.access(path, os.R_OK))
    return Fault(path, code, reason, writing=not reading)


def writes(*paths: str | Path) -> None:
    """Check, before the stage computes anything, that each output in `paths` (a file or folder)
    can be written: a file can be made where it goes (and, for a folder there already, inside it),
    and its disk is not full. (A disk that fills up later is reported when a write fails.)"""
    for path in map(Path, paths):
        folders = [_existing_folder(path)] + ([path] if path.is_dir() and not path.is_symlink() else [])
        for folder in folders:
            probe = folder / f".{path.name}.probe-{os.getpid()}"
            try:
                os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
                os.unlink(probe)
                disk = os.statvfs(folder)
                if disk.f_bfree == 0 or (disk.f_bavail == 0 and os.geteuid() != 0):  # root may use the reserve
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError as err:
                code = err.errno if isinstance(err.errno, int) else None
                reason = os.strerror(code) if code else str(err)
                raise FaultError(Fault(path, code, reason, writing=True)) from None


def reads(*paths: str | Path) -> None:
    """Check, before the stage computes anything, that each input in `paths` is there."""
    for path in map(Path, paths):
        if not path.exists():
            raise FaultError(Fault(path, errno.ENOENT, os.strerror(errno.ENOENT), writing=False))


def stage_name(argv: list[str] | None = None) -> str:
    """The DVC stage a stage entry file runs as: `train_stage1`, `extract@toy-bird`."""
    argv = sys.argv if argv is None else argv
    name = Path(argv[0]).stem
    return f"{name}@{argv[1]}" if len(argv) > 1 else name


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


def _fail(line: str, code: int) -> None:
    print(line, file=sys.stderr, flush=True)
    raise SystemExit(code) from None


def run(main: Callable[[], None]) -> None:
    """A stage's entry point: run `main`, ending any failure a user can meet in one line (above)."""
    stage = stage_name()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupted)
    before = os.environ.get(STAGE_ENV)
    os.environ[STAGE_ENV] = stage  # tracking: this process is a stage (its MLflow run gets a watcher)
    try:
        main()
    except (ArtefactError, StageError) as err:
        _fail(f"error: {err}", 1)
    except KeyboardInterrupt as err:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C does not break the last line
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signame = str(err) if isinstance(err, Interrupted) else "SIGINT"
        _fail(interrupted_line(stage, signame), 130)
    except Exception as err:
        fault = fault_of(err)
        if fault is None:
            raise
        _fail(fault.line(stage), 1)
    finally:
        if before is None:
            os.environ.pop(STAGE_ENV, None)
        else:
            os.environ[STAGE_ENV] = before
