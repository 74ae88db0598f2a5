"""DVC stage `embed@<dataset>`: CLIP embeddings of every image and class prompt, computed once.

Writes data/embeddings/<dataset>.npz; `mine` reads it, so changing `negatives` re-runs the
mining alone, never the embedding.
"""

import argparse
from pathlib import Path

from finedefics import runner
from finedefics.config import load_or_exit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dataset")
    name = parser.parse_args().dataset
    params = load_or_exit("params.yaml")
    out = Path("data/embeddings") / f"{name}.npz"
    runner.writes(out)

    from finedefics.data.prepared import load_prepared
    from finedefics.io import atomic_path
    from finedefics.mining import Embeddings
    from finedefics.models.clip import Clip, class_prompt
    from finedefics.tracking import stage_run

    dataset = load_prepared(name)
    with stage_run("embed", params, run_name=f"embed@{name}") as run:
        clip = Clip.load(params.model.clip)
        images = clip.embed_images(list(dataset.images.path), desc=f"embed {name}")
        texts = clip.embed_texts([class_prompt(n, params.model.clip_prompt) for n in dataset.names])
        with atomic_path(out) as tmp:
            with open(tmp, "wb") as f:
                Embeddings(list(dataset.images.image_id), images, texts).save(f)
        run.log_metrics({"images": len(images), "classes": len(texts), "dim": images.shape[1]})
    print(f"{name}: {len(images)} image and {len(texts)} class embeddings of size {images.shape[1]}")


if __name__ == "__main__":
    runner.run(main)
