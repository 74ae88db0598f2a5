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
    from finedefics.evaluate.mc import UNREADABLE, evaluate, items, open_set, per_image, positions, score
    from finedefics.io import atomic_path, read_json, write_json
    from finedefics.models.mllm import MLLM
    from finedefics.models.paths import Role, model_path
    from finedefics.protocol import query
    from finedefics.stats import average_ci, wilson
    from finedefics.tracking import stage_run

    torch.manual_seed(params.seed)
    source = model_path(params.model, Role(which))
    mllm = MLLM.load(source, params.model.image_splitting, getattr(torch, params.evaluate.dtype))
    k = params.evaluate.permutations
    metrics: dict[str, dict] = {}
    images: dict[str, np.ndarray] = {}  # per dataset, each test image's accuracy over its option orders
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
                    k,
                )
            except ValueError as err:
                sys.exit(f"evaluate: {name}: {err}")
            predictions = evaluate(
                mllm,
                dataset.plural,
                entries,
                params.evaluate.inner_user_prefix,
                max_new_tokens=params.evaluate.max_new_tokens,
                desc=f"{which} on {name}",
            )
            scores = score(predictions)
            images[name] = np.array(list(per_image(predictions).values()))
            unreadable = sum(p["predicted_raw"] == UNREADABLE for p in predictions) // k
            if unreadable:
                print(
                    f"warning: {name}: {unreadable} test image(s) could not be read; counted as generation failures",
                    file=sys.stderr,
                )
            by_order = [
                np.mean([p["predicted"] == p["correct"] for p in predictions if p["permutation"] == j])
                for j in range(k)
            ]
            opened = [
                o["correct"] for o in open_set(mllm, dataset.super_category, list(test.path), list(test.category))
            ]
            metrics[name] = {
                "accuracy": scores.accuracy,
                "accuracy_low": scores.ci_low,
                "accuracy_high": scores.ci_high,
                "accuracy_permutation_std": float(np.std(by_order, ddof=1)) if k > 1 else 0.0,
                "failure_rate": scores.failure_rate,
                "open_set_accuracy": float(np.mean(opened)),
                **dict(zip(("open_set_low", "open_set_high"), wilson(sum(opened), len(opened)))),
                "n": scores.n,
                "unreadable": unreadable,
                "position": positions(predictions),
            }
            config = {
                "dataset": name,
                "model": source,
                "prompt_query": query(dataset.plural),
                "choice_enumeration": "ABCD",
                "task": "mc",
                "seed": params.seed,
                "permutations": k,
                "inner_user_prefix": params.evaluate.inner_user_prefix,
                "dtype": params.evaluate.dtype,
            }
            metrics_block = {"generation_failures": scores.failure_rate, "accuracy": scores.accuracy}
            write_json(tmp / f"{name}.json", {"metrics": metrics_block, "predictions": predictions, "config": config})
            m = metrics[name]
            print(
                f"{which} on {name}: accuracy {m['accuracy']:.3f} [{m['accuracy_low']:.3f}, {m['accuracy_high']:.3f}] "
                f"over {m['n']} images x {k} option orders, failures {m['failure_rate']:.3f}, "
                f"open-set {m['open_set_accuracy']:.3f}"
            )
        keys = ("accuracy", "failure_rate", "open_set_accuracy")
        average = {key: float(np.mean([metrics[n][key] for n in params.datasets])) for key in keys}
        average["accuracy_low"], average["accuracy_high"] = average_ci(list(images.values()))
        metrics["average"] = average
        run.log_metrics({f"{n}/{key}": v for n, m in metrics.items() for key, v in m.items() if key != "position"})
    write_json(METRICS[which], metrics)
    a = metrics["average"]
    print(
        f"{which}: average accuracy {a['accuracy']:.3f} [{a['accuracy_low']:.3f}, {a['accuracy_high']:.3f}] "
        f"over {len(params.datasets)} dataset(s)"
    )


if __name__ == "__main__":
    run_main(main)
