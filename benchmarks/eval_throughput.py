"""Multiple-choice questions/s of `evaluate` scoring one-token answers in one forward pass (each
image encoded once) against generating every answer, on the same model and questions, and whether
the two write identical FOCI predictions.

    python benchmarks/eval_throughput.py [--models base finedefics] [--batch 32]

Runs on the models and option sets of the workspace's last `dvc repro` (every test image of every
dataset in `evaluate.permutations` orders, as the stage asks them). Reports the ratio measured here.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

from finedefics.config import load_params
from finedefics.evaluate.mc import evaluate
from finedefics.models.mllm import MLLM, ImageSettings

sys.path.insert(0, str(Path("stages").resolve()))
from evaluate import option_sets  # noqa: E402  (the stage's own option sets)


def timed(mllm: MLLM, questions: dict, batch: int, max_new_tokens: int, one_pass: bool) -> tuple[float, dict]:
    start = time.perf_counter()
    out = {
        n: evaluate(mllm, plural, e, batch_size=batch, max_new_tokens=max_new_tokens, desc=n, one_pass=one_pass)
        for n, (plural, e) in questions.items()
    }
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["base", "finedefics"])
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(2)
    params = load_params("params.yaml")
    questions = {}
    for name in params.datasets:
        dataset, entries = option_sets(params, name)
        questions[name] = (dataset.plural, entries)
    n = sum(len(e) for _, e in questions.values())
    print(f"{n} questions ({', '.join(params.datasets)}), batch {args.batch}, torch threads 2")
    print("| model | generate q/s | one pass q/s | ratio | identical predictions |\n| --- | --- | --- | --- | --- |")
    for model in args.models:
        mllm = MLLM.load(Path("models") / model, ImageSettings.from_config(params.model))
        t_fast, fast = timed(mllm, questions, args.batch, params.evaluate.max_new_tokens, one_pass=True)
        t_gen, generated = timed(mllm, questions, args.batch, params.evaluate.max_new_tokens, one_pass=False)
        print(f"| {model} | {n / t_gen:.0f} | {n / t_fast:.0f} | {t_gen / t_fast:.2f}x | {fast == generated} |")


if __name__ == "__main__":
    main()
