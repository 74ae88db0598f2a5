"""DVC stage `train_stage2`: Stage II, classification-centred instruction tuning (eq. 9).

Writes models/finedefics/ (merged, loads with `from_pretrained`) and metrics/train_stage2.json.
align.paradigm decides what runs: two-stage and stage2-only tune models/stage1 (the Stage I model,
or the base); one-stage trains the joint loss of both stages here; stage1-only passes models/stage1
through.
"""

from pathlib import Path

from finedefics.config import load_or_exit

SOURCE, OUT, METRICS = "models/stage1", Path("models/finedefics"), Path("metrics/train_stage2.json")


def main() -> None:
    params = load_or_exit("params.yaml")

    from finedefics.align import run

    run.relaunch(params)
    from finedefics.align.finetune import pass_through
    from finedefics.io import atomic_path, write_json
    from finedefics.tracking import stage_run

    _, main_process = run.process()
    if params.align.paradigm == "stage1-only":
        if main_process:
            with atomic_path(OUT) as tmp:
                pass_through(SOURCE, tmp)
            write_json(METRICS, {"trained": 0})
            print("align.paradigm = stage1-only: no instruction tuning; models/finedefics is the Stage I model")
        return
    which = "joint" if params.align.paradigm == "one-stage" else "stage2"
    with stage_run("train_stage2", params) as tracker:
        metrics = run.train(params, which, SOURCE, OUT, log=lambda values, step: tracker.log_metrics(values, step))
        if main_process:
            write_json(METRICS, {"trained": 1, **metrics})
            print(f"stage II ({which}): {metrics['steps']} steps")


if __name__ == "__main__":
    main()
