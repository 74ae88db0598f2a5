"""Images/s of batched FOCI evaluation (left padding) against one image at a time, same model.

    python benchmarks/eval_throughput.py [--model models/finedefics] [--images 96] [--batch 32]

Uses the trained model when it exists (else `--model`, any Idefics2 / LLaVA folder) and the first
--images test images of the world's first dataset with their option sets (run `dvc repro` first).
Both ways must give the same predictions. Reports the ratio measured in this run.
"""

import argparse
import json
import time
from pathlib import Path

import torch

from finedefics.data.prepared import PREPARED, load_prepared
from finedefics.evaluate.mc import evaluate, items
from finedefics.models.mllm import MLLM
from finedefics.models.paths import resolve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="models/finedefics")
    parser.add_argument("--dataset", default="toy-bird")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(2)
    prepared = PREPARED / args.dataset
    if not (prepared / "images.parquet").is_file():
        raise SystemExit(f"{prepared}: not prepared; run `dvc repro` first")
    dataset = load_prepared(args.dataset)
    test = dataset.test
    options = json.loads((Path("data/eval_options") / f"{args.dataset}.json").read_text())
    entries = items(options, dict(zip(test.foci_key, test.path)), dataset.names, 0)[: args.images]
    mllm = MLLM.load(resolve(args.model))
    evaluate(mllm, dataset.plural, entries[: args.batch], batch_size=args.batch, desc="warm-up")
    start = time.perf_counter()
    batched = evaluate(mllm, dataset.plural, entries, batch_size=args.batch, desc="batched")
    t_batched = time.perf_counter() - start
    start = time.perf_counter()
    single = evaluate(mllm, dataset.plural, entries, batch_size=1, desc="one at a time")
    t_single = time.perf_counter() - start
    same = sum(a["predicted"] == b["predicted"] for a, b in zip(batched, single)) / len(entries)
    print(f"{len(entries)} test images of {args.dataset}, model {resolve(args.model)}, torch threads 2")
    print(f"one at a time:         {len(entries) / t_single:8.1f} images/s")
    print(f"batched ({args.batch}, left pad): {len(entries) / t_batched:8.1f} images/s")
    print(f"same predictions: {same:.0%}")
    print(f"ratio: {t_single / t_batched:.1f}x")


if __name__ == "__main__":
    main()
