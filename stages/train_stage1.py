"""DVC stage `train_stage1`: Stage I, attribute augmented contrastive learning (eq. 8).

Reads models/base and data/instructions/stage1.parquet (stage2.parquet too, for the one-stage
paradigm's bookkeeping); writes models/stage1/ (adapters merged; loads with `from_pretrained`)
and metrics/train_stage1.json (object-category alignment of the test images before and after,
Table 8). When `align.paradigm` runs no Stage I here, models/stage1 points at the base.
"""

from pathlib import Path

from finedefics import runner
from finedefics.config import load_or_exit

STAGE1, STAGE2 = Path("data/instructions/stage1.parquet"), Path("data/instructions/stage2.parquet")
OUT, METRICS = Path("models/stage1"), Path("metrics/train_stage1.json")


def main() -> None:
    params = load_or_exit("params.yaml")
    runner.writes(OUT, METRICS, Path(".resume"))  # before anything loads or trains
    runner.reads(STAGE1, STAGE2)

    from finedefics.training import process, relaunch

    relaunch(params.train.num_processes)
    from finedefics.align.train import PARADIGMS, Inputs, train
    from finedefics.data.prepared import test_images
    from finedefics.io import atomic_path, write_json
    from finedefics.models.paths import BASE, base_model, pass_through
    from finedefics.tracking import stage_run

    _, main_process = process()
    source, task = base_model(params.model), PARADIGMS[params.align.paradigm].stage1
    if source == str(BASE):
        runner.reads(BASE)  # the tiny base `bootstrap` builds (a published one is found by its loader)
    if task is None:
        if main_process:
            with atomic_path(OUT) as tmp:
                pass_through(source, tmp)
            write_json(METRICS, {"trained": 0})
            print(f"align.paradigm = {params.align.paradigm}: no Stage I; models/stage1 is the base")
        return
    inputs = Inputs(STAGE1, STAGE2, *test_images(list(params.datasets)))
    with stage_run("train_stage1", params, tracked=main_process) as tracker:  # one run, not one per process
        with tracker.steps(flush_every=max(1, params.train.checkpoint_every)) as log:
            metrics = train(params, task, source, OUT, inputs, log=log)
        if main_process:
            write_json(METRICS, {"trained": 1, **metrics})
            tracker.log_metrics({k: v for k, v in metrics.items() if k.startswith("alignment")})
            changes = [
                f"{k} {metrics[k + '_start']:.3f} -> {metrics[k + '_end']:.3f}"
                for k in ("alignment", "alignment_margin", "alignment_top1")
            ]
            print(f"stage I: {metrics['steps']} steps; " + "; ".join(changes))


if __name__ == "__main__":
    runner.run(main)
