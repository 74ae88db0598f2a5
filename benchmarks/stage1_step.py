"""Stage I step time: the step's texts in grouped passes against separate passes, same model.

    python benchmarks/stage1_step.py [--batch 16] [--steps 5]

A Stage I step encodes, besides the images, the batch's descriptions and category names and each
object's K=3 negative descriptions and categories (finedefics.align.steps.Stage1). The library
puts them through the LLM in two right-padded passes, the step's distinct descriptions and its
distinct category names (a name is not padded to a description's length), and runs the vision
tower once for the representations and the generation loss. Baselines on the same model and
batch: one pass per kind of text (descriptions,
negative descriptions, categories, negative categories; no deduplication), and one pass per
text (as a loop over examples does). A step is forward + backward of the whole eq. 8 loss. The
world and the model are built here (the default bootstrap sizes, random weights); reports the
ratios measured in this run.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from finedefics.align.instructions import stage1_frame
from finedefics.align.losses import LossForm, Temperatures
from finedefics.align.steps import Stage1
from finedefics.config import TinyMLLMConfig, WorldConfig
from finedefics.data.prepare import prepare_world
from finedefics.models import world_text as wt
from finedefics.models.mllm import MLLM
from finedefics.models.representations import Representations
from finedefics.models.tiny import TinySizes, build_idefics2
from finedefics.models.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]


class PerTextReader(Representations):
    """The baseline of a loop over examples: one LLM pass per text."""

    def encode_texts(self, ids):
        return torch.cat([super(PerTextReader, self).encode_texts([t]) for t in ids])


class PerTextStage1(Stage1):
    @property
    def reader(self):
        return PerTextReader(self.mllm.model, self.mllm.tokenizer.eos_token_id)


def world_rows(root: Path, batch: int) -> tuple[pd.DataFrame, list[str]]:
    cfg = WorldConfig(categories=12, cluster_size=3, train_per_class=4, test_per_class=1, image_size=64)
    out = root / "toy-bird"
    prepared = prepare_world("toy-bird", REPO / "world" / "toy-bird.yaml", cfg, 0, out, out)
    dataset = prepared.dataset
    keys, train, names = dataset.keys, dataset.train, dataset.names
    text = {r.image_id: wt.caption("bird", keys, json.loads(r.attributes)) for r in train.itertuples()}
    first = train.groupby("label").image_id.first()
    rng = np.random.default_rng(0)
    negatives = []
    for r in train.itertuples():
        wrong = rng.choice([i for i in range(len(names)) if i != r.label], size=3, replace=False)
        negatives.append(
            {
                "image_id": r.image_id,
                "label": r.label,
                "negative_categories": [names[i] for i in wrong],
                "negative_descriptions": [text[first[i]] for i in wrong],
            }
        )
    frame = stage1_frame(
        dataset,
        pd.DataFrame({"image_id": list(text), "description": list(text.values())}),
        pd.DataFrame(negatives),
    )
    return frame.sample(batch, random_state=0), list(text.values()) + names


def step_inputs(root: Path, batch: int) -> tuple[pd.DataFrame, object, dict[str, int]]:
    """A Stage I batch of the world, a tokenizer trained on its texts, and its category index."""
    rows, corpus = world_rows(root, batch)
    tok = train_tokenizer(corpus * 4, TinyMLLMConfig().vocab_size)
    names = sorted(set(rows.category) | {c for cs in rows.negative_categories for c in cs})
    return rows, tok, {n: i for i, n in enumerate(names)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        rows, tok, index = step_inputs(Path(tmp), args.batch)
        model, processor = build_idefics2(tok, TinySizes.from_config(TinyMLLMConfig(), 64))
        mllm = MLLM(model.train(), processor)

        def timed(kind, grouped=True):
            stage = kind(
                mllm,
                Temperatures(0.07, two=False, learn=True),
                "obj-att-cat",
                True,
                index,
                LossForm(),
                grouped=grouped,
            )
            times, loss = [], None
            for step in range(args.steps + 1):  # the first step warms up
                start = time.perf_counter()
                loss, _ = stage.loss(rows)
                loss.backward()
                model.zero_grad(set_to_none=True)
                if step:
                    times.append(time.perf_counter() - start)
            return float(np.median(times)), loss.item()

        torch.manual_seed(0)
        one, loss_one = timed(Stage1, True)
        per_kind, loss_kind = timed(Stage1, False)
        per_text, loss_text = timed(PerTextStage1, True)
    texts = 8 * args.batch  # description, category and 3 + 3 negatives per image
    print(
        f"batch {args.batch} images, K=3 negatives: {texts} texts per step ({len(index)} distinct names); "
        f"tiny Idefics2 of the default bootstrap sizes, torch threads 2, median of {args.steps} steps"
    )
    print(f"grouped passes:    {one * 1000:8.1f} ms/step  (loss {loss_one:.6f})")
    print(f"one pass per kind: {per_kind * 1000:8.1f} ms/step  (loss {loss_kind:.6f})")
    print(f"one pass per text: {per_text * 1000:8.1f} ms/step  (loss {loss_text:.6f})")
    print(f"ratio vs per kind: {per_kind / one:.2f}x; vs per text: {per_text / one:.2f}x")


if __name__ == "__main__":
    main()
