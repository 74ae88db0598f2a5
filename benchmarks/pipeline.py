"""Seconds per stage of the default pipeline and of one ablation experiment, for a git ref and for
the working tree, measured one after another on this machine in one invocation, with the ratios.

    python benchmarks/pipeline.py [--ref 0dfff43] [--ablation negatives=simple] [--keep DIR]

Each side runs in its own temporary clone (the working tree's tracked and untracked-not-ignored
files for "tree"), with this environment's packages but the clone's own `finedefics` (its `src`
first on PYTHONPATH): `dvc repro`, then `dvc exp run -S <ablation>`. A stage's time is from the
line where DVC starts it to the line where DVC starts the next one (or exits), so process start-up
counts. Reports the ratio ref / tree for each.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGE = re.compile(r"Running stage '([^']+)'")


def checkout(ref: str | None, dest: Path) -> Path:
    """A clone of `ref`, or of the working tree's files (committed there) when `ref` is None."""
    if ref is not None:
        subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True)
        subprocess.run(["git", "checkout", "-q", ref], cwd=dest, check=True)
        return dest
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    subprocess.run("git init -q && git add -A", shell=True, cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "tree"], cwd=dest, check=True)
    return dest


def environment(repo: Path) -> dict[str, str]:
    """This environment with the clone's own `finedefics` first; checked, since an editable install
    of another tree must not win."""
    env = os.environ | {"PYTHONPATH": str(repo / "src"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    where = subprocess.run(
        [sys.executable, "-c", "import finedefics; print(list(finedefics.__path__)[0])"],  # a namespace package
        env=env,
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not Path(where).is_relative_to(repo):
        sys.exit(f"{repo}: `import finedefics` takes {where}, not the clone's own")
    return env


def timed(cmd: list[str], cwd: Path) -> tuple[float, dict[str, float]]:
    """Wall seconds of `cmd` and of each DVC stage it runs, from its output's timestamps."""
    env = environment(cwd)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stages: dict[str, float] = {}
    current, since = None, start
    tail = []
    for line in proc.stdout:
        tail = (tail + [line])[-40:]
        if m := STAGE.search(line):
            now = time.perf_counter()
            if current:
                stages[current] = now - since
            current, since = m.group(1), now
    end = time.perf_counter()
    if current:
        stages[current] = end - since
    if proc.wait():
        sys.exit(f"{' '.join(cmd)} failed in {cwd}:\n{''.join(tail)}")
    return end - start, stages


def run_side(ref: str | None, root: Path, ablation: str) -> dict[str, tuple[float, dict[str, float]]]:
    name = ref or "tree"
    repo = checkout(ref, root / name.replace("/", "_"))
    print(f"[{name}] dvc repro in {repo}", flush=True)
    out = {"repro": timed(["dvc", "repro"], repo)}
    print(f"[{name}] dvc exp run -S {ablation}", flush=True)
    out["ablation"] = timed(["dvc", "exp", "run", "-S", ablation], repo)
    return out


def report(results: dict[str, dict[str, tuple[float, dict[str, float]]]], ref: str, ablation: str) -> None:
    old, new = results[ref], results["tree"]
    for run, title in (("repro", "dvc repro (default)"), ("ablation", f"dvc exp run -S {ablation}")):
        (t_old, s_old), (t_new, s_new) = old[run], new[run]
        print(f"\n{title}\n| stage | {ref} s | tree s | ratio |\n| --- | --- | --- | --- |")
        for stage in sorted(set(s_old) | set(s_new), key=lambda s: -max(s_old.get(s, 0), s_new.get(s, 0))):
            a, b = s_old.get(stage), s_new.get(stage)
            ratio = f"{a / b:.2f}x" if a and b else "-"
            print(f"| {stage} | {a or 0:.0f} | {b or 0:.0f} | {ratio} |")
        print(f"| **total (wall)** | {t_old:.0f} | {t_new:.0f} | **{t_old / t_new:.2f}x** |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ref", default="0dfff43", help="the git ref to compare with (default: before the speed-up)")
    parser.add_argument("--ablation", default="negatives=simple")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        results = {side or "tree": run_side(side, root, args.ablation) for side in (args.ref, None)}
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n{os.cpu_count()} CPU core(s); {args.ref} first, then the working tree, one after another.")
    report(results, args.ref, args.ablation)


if __name__ == "__main__":
    main()
