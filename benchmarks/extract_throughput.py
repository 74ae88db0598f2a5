"""Items/s of the batched VQA extractor against one question at a time, on the same tiny VLM.

    python benchmarks/extract_throughput.py [--images 16] [--keys 10]

An item is one (image, attribute key) answer. The batched extractor asks all keys of an image in
one left-padded batch and encodes the image once (HFVQA.answer); the baseline asks each key in
its own generate call. Both give the same greedy answers (checked). Reports the ratio measured
in this run.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from finedefics.attributes.backends import HFVQA
from finedefics.attributes.discover import AttributeKey
from finedefics.attributes.extract import questions
from finedefics.attributes.prompts import DISCOVER, EXTRACT
from finedefics.models.mllm import MLLM
from finedefics.models.tiny import TinySizes, build_idefics2
from finedefics.models.tokenizer import train_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--keys", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(2)

    tok = train_tokenizer([DISCOVER, EXTRACT, "the wing color is red and the beak is long"] * 20, vocab_size=400)
    model, processor = build_idefics2(tok, TinySizes())
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        vqa = HFVQA(MLLM.load(Path(tmp)), args.max_new_tokens)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(args.images)]
    asked = questions([AttributeKey(f"attribute {i}", "color") for i in range(args.keys)], "bird")
    items = args.images * args.keys

    vqa.answer(images[0], asked[:2])  # warm-up
    start = time.perf_counter()
    batched = [vqa.answer(im, asked) for im in images]
    t_batched = time.perf_counter() - start

    start = time.perf_counter()
    single = [[vqa.mllm.generate([vqa.mllm.prompt(q)], [im], args.max_new_tokens)[0] for q in asked] for im in images]
    t_single = time.perf_counter() - start

    assert batched == single, "batched and one-at-a-time answers differ"
    print(
        f"items: {items} ({args.images} images x {args.keys} keys), max_new_tokens {args.max_new_tokens}, torch threads 2"
    )
    print(f"one question at a time: {items / t_single:8.1f} items/s")
    print(f"batched per image:      {items / t_batched:8.1f} items/s")
    print(f"ratio: {t_single / t_batched:.2f}x")


if __name__ == "__main__":
    main()
