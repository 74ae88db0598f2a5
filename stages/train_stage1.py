"""DVC stage `train_stage1`: Stage I, attribute augmented contrastive learning (eq. 8).

Writes models/stage1/ (adapters merged; loads with `from_pretrained`) and metrics/train_stage1.json
(object-category alignment before and after, Table 8). With align.paradigm one-stage or
stage2-only, Stage I is not run here and models/stage1 points at the base.
"""

from pathlib import Path

from finedefics.config import load_or_exit

OUT, METRICS = Path("models/stage1"), Path("metrics/train_stage1.json")


def main() -> None:
    params = load_or_exit("params.yaml")

    from finedefics.align import run

    run.relaunch(params)
    from finedefics.align.finetune import pass_through
    from finedefics.io import atomic_path, write_json
    from finedefics.tracking import stage_run

    _, main_process = run.process()
    source = run.base_model(params)
    if params.align.paradigm in ("one-stage", "stage2-only"):
        if main_process:
            with atomic_path(OUT) as tmp:
                pass_through(source, tmp)
            write_json(METRICS, {"trained": 0})
            print(f"align.paradigm = {params.align.paradigm}: no Stage I; models/stage1 is the base")
        return
    with stage_run("train_stage1", params) as tracker:
        metrics = run.train(params, "stage1", source, OUT, log=lambda values, step: tracker.log_metrics(values, step))
        if main_process:
            write_json(METRICS, {"trained": 1, **metrics})
            tracker.log_metrics({k: v for k, v in metrics.items() if k.startswith("alignment")})
            print(
                f"stage I: {metrics['steps']} steps; "
                + "; ".join(
                    f"{k} {metrics[k + '_start']:.3f} -> {metrics[k + '_end']:.3f}"
                    for k in ("alignment", "alignment_margin", "alignment_top1")
                )
            )


if __name__ == "__main__":
    main()
