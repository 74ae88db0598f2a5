"""DVC stage `mine@<dataset>`: hard negatives per train image and the evaluation option sets.

Writes data/negatives/<dataset>.parquet (per train image: the negatives `negatives` asks for,
each with one train image and its description, and the 3 most CLIP-similar wrong classes as
Stage II distractors; the `world.unseen` classes are left out of all of it),
data/eval_options/<dataset>.json (FOCI format; for the six real datasets the published FOCI sets of
the test images the dataset holds) and metrics/mine/<dataset>.json, which counts the train
images without a description (failed attribute extraction), the classes without a described
train image and the negatives left with an empty description (see `finedefics.mining`).
"""

import argparse
import sys
from pathlib import Path

from finedefics import runner
from finedefics.config import load_or_exit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dataset")
    name = parser.parse_args().dataset
    params = load_or_exit("params.yaml")
    negatives_path, options_path = (
        Path("data/negatives") / f"{name}.parquet",
        Path("data/eval_options") / f"{name}.json",
    )
    metrics_path = Path("metrics/mine") / f"{name}.json"
    runner.writes(negatives_path, options_path, metrics_path)

    import numpy as np

    from finedefics.artefacts import DESCRIPTIONS, NEGATIVES
    from finedefics.data.prepare import is_world
    from finedefics.data.prepared import load_prepared
    from finedefics.data.real import REAL_DATASETS
    from finedefics.io import read_json, write_json
    from finedefics.mining import (
        Embeddings,
        check_options,
        description_coverage,
        eval_options,
        mine,
        prepared_options,
    )
    from finedefics.tracking import stage_run

    dataset = load_prepared(name)
    names = dataset.names
    descriptions = DESCRIPTIONS.read(Path("data/descriptions") / f"{name}.parquet")
    emb = Embeddings.load(Path("data/embeddings") / f"{name}.npz")
    train, test = dataset.train, dataset.test
    try:
        with stage_run("mine", params, run_name=f"mine@{name}") as run:
            described = dict(zip(descriptions.image_id, descriptions.description))
            unseen = dataset.unseen(params.world.unseen, params.seed) if is_world(params.datasets[name]) else []
            mined = mine(train, names, described, emb, params.negatives, params.seed, unseen)
            NEGATIVES.write(negatives_path, mined)
            if is_world(params.datasets[name]):
                options = eval_options(test, names, emb)
                naming_absent = check_options(options, names)
                write_json(options_path, options)
            else:
                options = prepared_options(read_json(REAL_DATASETS[name].foci_file), set(test.foci_key))
                naming_absent = check_options(options, names, partial=True)
                write_json(options_path, options)
            stats = {
                "train_images": len(mined),
                "negatives_per_image": float(mined.negative_labels.str.len().mean()),
                "unseen_classes": len(unseen),
                "option_sets": sum(map(len, options.values())),
                "option_sets_naming_absent_classes": naming_absent,
                **description_coverage(train, described, mined),
            }
            if dataset.categories[0].cluster is not None:
                cluster = np.array([c.cluster for c in dataset.categories])
                pairs = [(a, n) for a, ns in zip(mined.label, mined.negative_labels) for n in ns]
                same = [cluster[a] == cluster[n] for a, n in pairs]
                stats["negatives_in_same_cluster"] = float(np.mean(same)) if same else 0.0
                stats["chance_same_cluster"] = float(
                    np.mean([(cluster == cluster[a]).sum() - 1 for a in range(len(cluster))]) / (len(cluster) - 1)
                )
            write_json(metrics_path, stats)
            run.log_metrics(stats)
    except ValueError as err:
        print(f"error: mine@{name}: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"{name}: negatives ({params.negatives}) for {len(mined)} train images; {stats['option_sets']} option sets")
    if stats["option_sets_naming_absent_classes"]:
        print(
            f"{name}: {stats['option_sets_naming_absent_classes']} option sets offer classes this dataset lacks "
            "(some of its classes are here); they are evaluated as FOCI gives them"
        )
    if unseen:
        print(f"{name}: training never shows {', '.join(names[u] for u in unseen)} (world.unseen; test images only)")


if __name__ == "__main__":
    runner.run(main)
