"""DVC stage `evaluate@<model>`: FOCI multiple-choice evaluation of the base (`base`, the paper's
"Original" row) or the final model (`finedefics`) on every dataset's test images.

Writes results/predictions/<model>/<dataset>.json in FOCI's results format and the metrics
(accuracy, generation-failure rate, open-set accuracy per dataset and their average) to
metrics/eval.json (final model: what `dvc metrics diff` compares) or metrics/eval_base.json.
"""

import argparse
import sys
from pathlib import Path

from finedefics.config import load_or_exit
from finedefics.io import run_main

METRICS = {"finedefics": Path("metrics/eval.json"), "base": Path("metrics/eval_base.json")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", choices=sorted(METRICS))
    which = parser.parse_args().model
    params = load_or_exit("params.yaml")

    import numpy as np
    import torch

    from finedefics.data.prepared import load_prepared
    from finedefics.evaluate.mc import UNREADABLE, evaluate, items, open_set, score
    from finedefics.io import atomic_path, read_json, write_json
    from finedefics.models.mllm import MLLM
    from finedefics.models.paths import Role, model_path
    from finedefics.tracking import stage_run

    torch.manual_seed(params.seed)
    source = model_path(params.model, Role(which))
    mllm = MLLM.load(source)
    metrics: dict[str, dict[str, float]] = {}
    out_dir = Path("results/predictions") / which
    with stage_run("evaluate", params, run_name=f"evaluate@{which}") as run, atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        for name in params.datasets:
            dataset = load_prepared(name)
            test = dataset.test
            try:
                entries = items(
                    read_json(Path("data/eval_options") / f"{name}.json"),
                    dict(zip(test.foci_key, test.path)),
                    dataset.names,
                    params.seed,
                )
            except ValueError as err:
                sys.exit(f"evaluate: {name}: {err}")
            predictions = evaluate(mllm, dataset.plural, entries, desc=f"{which} on {name}")
            scores = score(predictions)
            unreadable = sum(p["predicted_raw"] == UNREADABLE for p in predictions)
            if unreadable:
                print(
                    f"warning: {name}: {unreadable} test image(s) could not be read; counted as generation failures",
                    file=sys.stderr,
                )
            opened = open_set(mllm, dataset.super_category, list(test.path), list(test.category))
            metrics[name] = {
                "accuracy": scores["accuracy"],
                "failure_rate": scores["failure_rate"],
                "open_set_accuracy": float(np.mean([o["correct"] for o in opened])),
                "unreadable": unreadable,
            }
            config = {"model": source, "dataset": name, "seed": params.seed, "protocol": "FOCI 4-way multiple choice"}
            write_json(tmp / f"{name}.json", {"metrics": scores, "predictions": predictions, "config": config})
            print(
                f"{which} on {name}: accuracy {scores['accuracy']:.3f}, failures {scores['failure_rate']:.3f}, open-set {metrics[name]['open_set_accuracy']:.3f}"
            )
        keys = ("accuracy", "failure_rate", "open_set_accuracy")
        metrics["average"] = {k: float(np.mean([metrics[n][k] for n in params.datasets])) for k in keys}
        run.log_metrics({f"{n}/{k}": v for n, m in metrics.items() for k, v in m.items()})
    write_json(METRICS[which], metrics)
    print(f"{which}: average accuracy {metrics['average']['accuracy']:.3f} over {len(params.datasets)} dataset(s)")


if __name__ == "__main__":
    run_main(main)
