"""DVC stage `train_stage2`: Stage II, classification-centred instruction tuning (eq. 9).

Reads models/stage1 and data/instructions/stage{1,2}.parquet; writes models/finedefics/ (merged,
loads with `from_pretrained`) and metrics/train_stage2.json. `align.paradigm` decides what runs
(`finedefics.align.train.PARADIGMS`): two-stage and stage2-only tune models/stage1 (the Stage I
model, or the base); one-stage trains the joint loss of both stages here; stage1-only passes
models/stage1 through.
"""

from pathlib import Path

from finedefics import runner
from finedefics.config import load_or_exit

SOURCE = Path("models/stage1")
STAGE1, STAGE2 = Path("data/instructions/stage1.parquet"), Path("data/instructions/stage2.parquet")
OUT, METRICS = Path("models/finedefics"), Path("metrics/train_stage2.json")


def main() -> None:
    params = load_or_exit("params.yaml")
    runner.writes(OUT, METRICS, Path(".resume"))  # before anything loads or trains
    runner.reads(SOURCE, STAGE1, STAGE2)

    from finedefics.training import process, relaunch

    relaunch(params.train.num_processes)
    from finedefics.align.train import PARADIGMS, Inputs, train
    from finedefics.data.prepared import test_images
    from finedefics.io import atomic_path, write_json
    from finedefics.models.paths import pass_through
    from finedefics.tracking import stage_run

    _, main_process = process()
    task = PARADIGMS[params.align.paradigm].stage2
    if task is None:
        if main_process:
            with atomic_path(OUT) as tmp:
                pass_through(SOURCE, tmp)
            write_json(METRICS, {"trained": 0})
            print("align.paradigm = stage1-only: no instruction tuning; models/finedefics is the Stage I model")
        return
    inputs = Inputs(STAGE1, STAGE2, *test_images(list(params.datasets)))
    with stage_run("train_stage2", params, tracked=main_process) as tracker:  # one run, not one per process
        with tracker.steps(flush_every=max(1, params.train.checkpoint_every)) as log:
            metrics = train(params, task, str(SOURCE), OUT, inputs, log=log)
        if main_process:
            write_json(METRICS, {"trained": 1, **metrics})
            print(f"stage II ({task.value}): {metrics['steps']} steps")


if __name__ == "__main__":
    runner.run(main)
