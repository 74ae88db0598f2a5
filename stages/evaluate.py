"""DVC stage `evaluate@<model>`: FOCI multiple-choice evaluation on every dataset's test images of
the base (`base`, the paper's "Original" row), the final model (`finedefics`), or the CLIP
baseline (`clip`: the options scored by CLIP similarity, for the CLIP that mined them and for
`model.clip_baseline`, one that did not).

Writes results/predictions/<model>/<dataset>.json (clip: results/predictions/clip/{mining,baseline}/)
in FOCI's results format and the metrics (accuracy with its 95% interval, generation-failure rate,
the MLLMs' open-set accuracy, per dataset and their average) to metrics/eval.json (final model:
what `dvc metrics diff` compares), metrics/eval_base.json or metrics/eval_clip.json.
"""

import argparse
from pathlib import Path

from finedefics import runner
from finedefics.config import load_or_exit
from finedefics.evaluate.foci import option_sets  # noqa: F401  (benchmarks/ and tests/test_pipeline.py read it here)

METRICS = {
    "finedefics": Path("metrics/eval.json"),
    "base": Path("metrics/eval_base.json"),
    "clip": Path("metrics/eval_clip.json"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", choices=sorted(METRICS))
    which = parser.parse_args().model
    params = load_or_exit("params.yaml")
    out_dir = Path("results/predictions") / which
    runner.writes(out_dir, METRICS[which])

    import torch

    from finedefics.evaluate.foci import evaluate_clip, evaluate_mllm, logged
    from finedefics.io import atomic_path, write_json
    from finedefics.models.mllm import MLLM, ImageSettings
    from finedefics.models.paths import CLIP_DIRS, Role, model_path
    from finedefics.tracking import stage_run

    torch.manual_seed(params.seed)
    with stage_run("evaluate", params, run_name=f"evaluate@{which}") as run, atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        if which == "clip":
            metrics = {role: evaluate_clip(params, role, tmp / role) for role in CLIP_DIRS}
        else:
            source = model_path(params.model, Role(which))
            mllm = MLLM.load(source, ImageSettings.from_config(params.model), getattr(torch, params.evaluate.dtype))
            metrics = evaluate_mllm(params, mllm, source, which, tmp)
        run.log_metrics(logged(metrics, which))
    write_json(METRICS[which], metrics)


if __name__ == "__main__":
    runner.run(main)
