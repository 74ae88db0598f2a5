"""Images/s of embed-once + matrix top-k mining against a per-image loop, on the same tiny CLIP.

    python benchmarks/mining.py [--images 2000] [--classes 100] [--loop-anchors 200]

Mining needs, per train image, its 3 most similar wrong classes and, in each, the train image most
similar to it. The library embeds every image and class prompt once, ranks classes with one
matrix product and picks images from the cached embeddings (finedefics.mining.mine). The baseline
loops over images: it embeds the anchor, ranks the classes in Python and embeds the candidate
images of each negative class (one batch per class) to pick the most similar; class prompts are
embedded once for it too. Both must give the same negatives and images. The baseline's rate is
measured on the first --loop-anchors images. Reports the ratio measured in this run.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from finedefics.config import TinyCLIPConfig
from finedefics.mining import Embeddings, mine
from finedefics.models.clip import TINY_NAME, Clip, register_tiny


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--loop-anchors", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(2)
    import open_clip

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        register_tiny(TinyCLIPConfig(), 64, Path(tmp))
        model, _, preprocess = open_clip.create_model_and_transforms(TINY_NAME)
        clip = Clip(model.eval(), preprocess, open_clip.get_tokenizer(TINY_NAME))
        labels = np.arange(args.images) % args.classes
        train = pd.DataFrame({"image_id": [f"{i:05d}" for i in range(args.images)], "label": labels})
        paths = {}
        for image_id in train.image_id:
            paths[image_id] = str(Path(tmp) / f"{image_id}.png")
            Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(paths[image_id])
        names = [f"class {c}" for c in range(args.classes)]
        texts = clip.embed_texts([f"a photo of a {n}." for n in names])

        start = time.perf_counter()
        emb = Embeddings(
            list(train.image_id),
            clip.embed_images([paths[i] for i in train.image_id], batch_size=256, desc="embed"),
            texts,
        )
        mined = mine(train, names, {}, emb, "hard", seed=0)
        t_batched = time.perf_counter() - start

        @torch.no_grad()
        def embed(batch_paths):
            pixels = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in batch_paths])
            return torch.nn.functional.normalize(model.encode_image(pixels), dim=-1).numpy()

        anchors = train.iloc[: args.loop_anchors]
        start = time.perf_counter()
        looped = []
        for row in anchors.itertuples():
            anchor = embed([paths[row.image_id]])[0]
            sims = [(float(anchor @ texts[c]), c) for c in range(args.classes) if c != row.label]
            negatives = [c for _, c in sorted(sims, key=lambda t: (-t[0], t[1]))[:3]]
            picks = []
            for neg in negatives:
                pool = list(train.image_id[train.label == neg])
                picks.append(pool[int(np.argmax(embed([paths[i] for i in pool]) @ anchor))])
            looped.append((negatives, picks))
        t_loop = time.perf_counter() - start

    same = [
        list(m.negative_labels) == n and list(m.negative_image_ids) == p
        for m, (n, p) in zip(mined.itertuples(), looped)
    ]
    loop_rate, batched_rate = len(anchors) / t_loop, args.images / t_batched
    print(f"{args.images} train images, {args.classes} classes, tiny CLIP, torch threads 2")
    print(f"per-image loop ({len(anchors)} anchors): {loop_rate:8.1f} images/s")
    print(f"embed once + matrix top-k ({args.images}): {batched_rate:8.1f} images/s")
    print(f"same negatives and images: {np.mean(same):.0%}")
    print(f"ratio: {batched_rate / loop_rate:.1f}x")


if __name__ == "__main__":
    main()
