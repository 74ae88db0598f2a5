"""Seconds per stage of the default pipeline and of one ablation experiment, and seeded experiments
per hour of an ablation queue, for a git ref and for the working tree, measured one after another on
this machine in one invocation, with the ratios.

    python benchmarks/pipeline.py [--ref 387d4a3] [--ablation negatives=simple] [--jobs 2] [--keep DIR]

Each side runs in its own temporary clone (the working tree's tracked and untracked-not-ignored
files for "tree"), with this environment's packages but the clone's own `finedefics` (its `src`
first on PYTHONPATH): `dvc repro`, then `dvc exp run -S <ablation>`, then the six rows of `QUEUE`
(one training seed each) through `dvc queue start`: the ref one at a time with 2 torch threads
(its `scripts/ablations.sh`), the tree with `--jobs` workers of 2 / jobs threads each. A stage's
time is from the line where DVC starts it to the line where DVC starts the next one (or exits), so
process start-up counts; the queue's time runs from its start to its last experiment's result.
Reports the ratio ref / tree for each.
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
# six rows of scripts/ablations.sh's queue, mixed: they re-run from `summarize` (t6d, t6e), `build_instructions` or Stage I on
QUEUE = {
    "t3b-obj-cat": "align.objective=obj-cat",
    "t3c-one-stage": "align.paradigm=one-stage",
    "t6b-it": "align.paradigm=stage2-only",
    "t6d-short": "attributes.level=short",
    "t6e-tag": "attributes.construction=tag-based",
    "x-ccc-logsumexp": "align.ccc=logsumexp",
}
QUEUE_SEED = 1  # not the default's seed 0, which the run cache holds after `dvc repro`


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


def timed(cmd: list[str], cwd: Path, threads: int = 2) -> tuple[float, dict[str, float]]:
    """Wall seconds of `cmd` and of each DVC stage it runs, from its output's timestamps."""
    env = environment(cwd) | {"OMP_NUM_THREADS": str(threads)}
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


def finished(repo: Path) -> int:
    """How many experiments have a result (a git ref under refs/exps); asks no DVC worker."""
    refs = subprocess.run(["git", "for-each-ref", "refs/exps"], cwd=repo, capture_output=True, text=True, check=True)
    return len([line for line in refs.stdout.splitlines() if "/exps/" in line and "/exps/celery/" not in line])


def queue(repo: Path, jobs: int) -> float:
    """Wall seconds of `QUEUE` run by `jobs` DVC workers with 2 / jobs torch threads each."""
    env = environment(repo) | {"OMP_NUM_THREADS": str(max(1, 2 // jobs))}
    for name, change in QUEUE.items():
        cmd = ["dvc", "exp", "run", "--queue", "--name", name, "-S", change, "-S", f"train.seed={QUEUE_SEED}"]
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
    before = finished(repo)
    start = time.perf_counter()
    subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], cwd=repo, env=env, check=True, capture_output=True)
    pids = repo / ".dvc" / "tmp" / "exps" / "celery"
    while finished(repo) < before + len(QUEUE):
        time.sleep(2)
        alive = [f for f in pids.glob("dvc-exp-worker-*.pid") if Path(f"/proc/{f.read_text().strip()}").exists()]
        if not alive and finished(repo) < before + len(QUEUE):
            sys.exit(f"{repo}: the queue's workers stopped with {finished(repo) - before} of {len(QUEUE)} finished")
    return time.perf_counter() - start


def run_side(ref: str | None, root: Path, ablation: str, jobs: int) -> dict:
    name = ref or "tree"
    repo = checkout(ref, root / name.replace("/", "_"))
    print(f"[{name}] dvc repro in {repo}", flush=True)
    out = {"repro": timed(["dvc", "repro"], repo)}
    print(f"[{name}] dvc exp run -S {ablation}", flush=True)
    out["ablation"] = timed(["dvc", "exp", "run", "-S", ablation], repo)
    print(f"[{name}] a queue of {len(QUEUE)} experiments, {jobs} at a time", flush=True)
    out["queue"] = queue(repo, jobs)
    out["jobs"] = jobs
    return out


def report(results: dict[str, dict], ref: str, ablation: str) -> None:
    old, new = results[ref], results["tree"]
    for run, title in (("repro", "dvc repro (default)"), ("ablation", f"dvc exp run -S {ablation}")):
        (t_old, s_old), (t_new, s_new) = old[run], new[run]
        print(f"\n{title}\n| stage | {ref} s | tree s | ratio |\n| --- | --- | --- | --- |")
        for stage in sorted(set(s_old) | set(s_new), key=lambda s: -max(s_old.get(s, 0), s_new.get(s, 0))):
            a, b = s_old.get(stage), s_new.get(stage)
            ratio = f"{a / b:.2f}x" if a and b else "-"
            print(f"| {stage} | {a or 0:.0f} | {b or 0:.0f} | {ratio} |")
        print(f"| **total (wall)** | {t_old:.0f} | {t_new:.0f} | **{t_old / t_new:.2f}x** |")
    n = len(QUEUE)
    print(f"\nqueue of {n} experiments ({', '.join(QUEUE)}; train.seed={QUEUE_SEED})")
    print(f"| | {ref} | tree | ratio |\n| --- | --- | --- | --- |")
    print(f"| workers x torch threads | 1 x 2 | {new['jobs']} x {max(1, 2 // new['jobs'])} | |")
    print(f"| wall s | {old['queue']:.0f} | {new['queue']:.0f} | |")
    per_hour = [3600 * n / old["queue"], 3600 * n / new["queue"]]
    print(
        f"| **experiments per hour** | {per_hour[0]:.1f} | {per_hour[1]:.1f} | **{per_hour[1] / per_hour[0]:.2f}x** |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ref", default="387d4a3", help="the git ref to compare with (default: before the speed-up)")
    parser.add_argument("--ablation", default="negatives=simple")
    parser.add_argument("--jobs", type=int, default=2, help="the tree's queue workers (the ref: 1)")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        results = {
            side or "tree": run_side(side, root, args.ablation, 1 if side else args.jobs) for side in (args.ref, None)
        }
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n{os.cpu_count()} CPU core(s); {args.ref} first, then the working tree, one after another.")
    report(results, args.ref, args.ablation)


if __name__ == "__main__":
    main()
