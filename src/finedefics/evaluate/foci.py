"""A model's FOCI evaluation over every dataset (the `evaluate` stage's work): the option sets as
evaluation items, each dataset's metrics (accuracy with its 95% interval, accuracy over option
orders, failure rate, seen and unseen classes, the answers' positions), their average with a
stratified bootstrap interval, the FOCI results files, and one printed line per dataset.

Imports are made where used: the stage reads `option_sets` from here without loading a model."""

from __future__ import annotations

import sys
from pathlib import Path

from finedefics.io import StageError, read_json, write_json


def logged(metrics: dict[str, dict], which: str) -> dict[str, float]:
    """The metrics an evaluation logs to MLflow: every number but the answers' positions, keyed
    `<dataset>/<metric>` (CLIP: `<role>/<dataset>/<metric>`)."""
    flat = metrics.items() if which != "clip" else ((f"{r}/{n}", m) for r, ms in metrics.items() for n, m in ms.items())
    return {f"{n}/{key}": v for n, m in flat for key, v in m.items() if key != "position"}


def option_sets(params, name: str):
    """The dataset's FOCI option sets as evaluation items, each in `evaluate.permutations` orders."""
    from finedefics.data.prepared import load_prepared
    from finedefics.evaluate.mc import items

    dataset = load_prepared(name)
    try:
        entries = items(
            read_json(Path("data/eval_options") / f"{name}.json"),
            dict(zip(dataset.test.foci_key, dataset.test.path)),
            dataset.names,
            params.seed,
            params.evaluate.permutations,
            partial=dataset.source == "real",
        )
    except ValueError as err:
        raise StageError(f"evaluate: {name}: {err}") from None
    return dataset, entries


def unseen_names(params, dataset) -> set[str]:
    """The names of the categories training never showed (`world.unseen`; world datasets only)."""
    if dataset.source != "world":
        return set()
    return {dataset.names[label] for label in dataset.unseen(params.world.unseen, params.seed)}


def summary(name: str, predictions: list[dict], k: int, unseen: set[str]) -> dict:
    """The metrics every evaluation reports for one dataset's predictions; with `unseen` classes,
    the accuracy on the test images of the seen and of the unseen ones."""
    import numpy as np

    from finedefics.evaluate.mc import UNREADABLE, positions, score, seen_unseen

    scores = score(predictions)
    unreadable = sum(p["predicted_raw"] == UNREADABLE for p in predictions) // k
    if unreadable:
        print(
            f"warning: {name}: {unreadable} test image(s) could not be read; counted as generation failures",
            file=sys.stderr,
        )
    by_order = [
        np.mean([p["predicted"] == p["correct"] for p in predictions if p["permutation"] == j]) for j in range(k)
    ]
    return {
        "accuracy": scores.accuracy,
        "accuracy_low": scores.ci_low,
        "accuracy_high": scores.ci_high,
        "accuracy_permutation_std": float(np.std(by_order, ddof=1)) if k > 1 else 0.0,
        "failure_rate": scores.failure_rate,
        "n": scores.n,
        "unreadable": unreadable,
        **seen_unseen(predictions, unseen),
        "position": positions(predictions),
    }


def average(metrics: dict[str, dict], predictions: dict[str, list[dict]], keys: tuple[str, ...]) -> dict:
    """The datasets' mean of `keys`, and the accuracy's stratified bootstrap interval over images."""
    import numpy as np

    from finedefics.evaluate.mc import per_image
    from finedefics.stats import average_ci

    keys += tuple(k for k in ("seen_accuracy", "unseen_accuracy") if all(k in m for m in metrics.values()))
    out = {key: float(np.mean([m[key] for m in metrics.values()])) for key in keys}
    images = [np.array(list(per_image(p).values())) for p in predictions.values()]
    out["accuracy_low"], out["accuracy_high"] = average_ci(images)
    return out


def report(label: str, name: str, m: dict, k: int) -> None:
    print(
        f"{label} on {name}: accuracy {m['accuracy']:.3f} [{m['accuracy_low']:.3f}, {m['accuracy_high']:.3f}] "
        f"over {m.get('n', '-')} images x {k} option orders, failures {m['failure_rate']:.3f}"
        + (f", open-set {m['open_set_accuracy']:.3f}" if "open_set_accuracy" in m else "")
        + (f", seen {m['seen_accuracy']:.3f}, unseen {m['unseen_accuracy']:.3f}" if "unseen_accuracy" in m else "")
    )


def evaluate_mllm(params, mllm, source: str, which: str, out: Path) -> dict[str, dict]:
    """The MLLM `mllm` (loaded from `source`: the base or the final model, `which`) on every dataset:
    FOCI multiple choice and the open-set question; the results files in `out`."""
    import numpy as np

    from finedefics.evaluate.mc import evaluate, open_set
    from finedefics.protocol import query
    from finedefics.stats import wilson

    k = params.evaluate.permutations
    metrics: dict[str, dict] = {}
    predictions: dict[str, list[dict]] = {}
    for name in params.datasets:
        dataset, entries = option_sets(params, name)
        predictions[name] = evaluate(
            mllm,
            dataset.plural,
            entries,
            params.evaluate.inner_user_prefix,
            max_new_tokens=params.evaluate.max_new_tokens,
            desc=f"{which} on {name}",
        )
        test = dataset.test
        opened = [o["correct"] for o in open_set(mllm, dataset.super_category, list(test.path), list(test.category))]
        unseen = unseen_names(params, dataset)
        m = summary(name, predictions[name], k, unseen)
        m["open_set_accuracy"] = float(np.mean(opened))
        m["open_set_low"], m["open_set_high"] = wilson(sum(opened), len(opened))
        metrics[name] = m
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
            "visual_tokens_per_image": visual_tokens(mllm, entries),
            "unseen_classes": sorted(unseen),
        }
        write_results(out / f"{name}.json", predictions[name], m, config)
        report(which, name, m, k)
    metrics["average"] = average(metrics, predictions, ("accuracy", "failure_rate", "open_set_accuracy"))
    a = metrics["average"]
    print(f"{which}: average accuracy {a['accuracy']:.3f} [{a['accuracy_low']:.3f}, {a['accuracy_high']:.3f}]")
    return metrics


def evaluate_clip(params, role: str, out: Path) -> dict[str, dict]:
    """The CLIP that mined the options (`mining`, model.clip) or the baseline CLIP (`baseline`,
    model.clip_baseline) choosing among each image's options."""
    from finedefics.evaluate.clip_baseline import choose
    from finedefics.models.clip import Clip
    from finedefics.models.paths import CLIP_DIRS

    spec = params.model.clip if role == "mining" else params.model.clip_baseline
    clip = Clip.load(spec, CLIP_DIRS[role])
    out.mkdir()
    k = params.evaluate.permutations
    metrics: dict[str, dict] = {}
    predictions: dict[str, list[dict]] = {}
    for name in params.datasets:
        dataset, entries = option_sets(params, name)
        unseen = unseen_names(params, dataset)
        predictions[name] = choose(clip, entries, params.model.clip_prompt)
        metrics[name] = summary(name, predictions[name], k, unseen)
        config = {
            "dataset": name,
            "model": spec,
            "clip": role,
            "class_prompt": params.model.clip_prompt,
            "task": "mc",
            "seed": params.seed,
            "permutations": k,
            "unseen_classes": sorted(unseen),
        }
        write_results(out / f"{name}.json", predictions[name], metrics[name], config)
        report(f"CLIP ({role})", name, metrics[name], k)
    metrics["average"] = average(metrics, predictions, ("accuracy", "failure_rate"))
    return metrics


def visual_tokens(mllm, entries) -> int | None:
    """The visual tokens the processor gives the first readable test image (None: none readable)."""
    from finedefics.evaluate.mc import open_image

    image = next((im for im in (open_image(e.path) for e in entries) if im is not None), None)
    return None if image is None else mllm.visual_token_count(image)


def write_results(path: Path, predictions: list[dict], m: dict, config: dict) -> None:
    """A FOCI results file: its `metrics`, `predictions` and `config`."""
    block = {"generation_failures": m["failure_rate"], "accuracy": m["accuracy"]}
    write_json(path, {"metrics": block, "predictions": predictions, "config": config})
