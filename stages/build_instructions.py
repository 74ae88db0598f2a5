"""DVC stage `build_instructions`: the training data of both stages, over all datasets.

Writes data/instructions/stage1.parquet (image, description, category and the negatives'
descriptions and categories) and stage2.parquet (open-set QA and, unless instructions.stage2 is
`open`, FOCI-format multiple choice). Train images without a description (failed attribute
extraction) are in Stage II only; the number left out of Stage I is logged to MLflow
(`stage1_skipped_without_description`, also per dataset) and printed. metrics/mine/<dataset>.json
has the same count as `train_images_without_description`.
"""

from pathlib import Path

from finedefics import runner
from finedefics.config import load_or_exit


def main() -> None:
    params = load_or_exit("params.yaml")
    out1, out2 = Path("data/instructions/stage1.parquet"), Path("data/instructions/stage2.parquet")
    runner.writes(out1, out2)

    import pandas as pd

    from finedefics.align.instructions import stage1_frame, stage1_skipped, stage2_frame
    from finedefics.artefacts import DESCRIPTIONS, NEGATIVES, STAGE1, STAGE2
    from finedefics.data.prepared import load_prepared
    from finedefics.tracking import stage_run

    stage1, stage2, skipped = [], [], {}
    for name in params.datasets:
        dataset = load_prepared(name)
        descriptions = DESCRIPTIONS.read(Path("data/descriptions") / f"{name}.parquet")
        mined = NEGATIVES.read(Path("data/negatives") / f"{name}.parquet")
        stage1.append(stage1_frame(dataset, descriptions, mined))
        skipped[name] = stage1_skipped(descriptions, mined)
        stage2.append(stage2_frame(dataset, mined, params.instructions.stage2, params.seed))
    with stage_run("build_instructions", params) as run:
        s1, s2 = pd.concat(stage1, ignore_index=True), pd.concat(stage2, ignore_index=True)
        STAGE1.write(out1, s1)
        STAGE2.write(out2, s2)
        stats = {
            "stage1_triples": len(s1),
            "stage2_open": int((s2.kind == "open").sum()),
            "stage2_closed": int((s2.kind == "closed").sum()),
            "stage1_skipped_without_description": sum(skipped.values()),
            **{f"{name}/stage1_skipped_without_description": n for name, n in skipped.items()},
        }
        run.log_metrics(stats)
    print(
        f"stage I: {stats['stage1_triples']} triples; stage II: {stats['stage2_open']} open-set and {stats['stage2_closed']} multiple-choice questions"
    )
    if stats["stage1_skipped_without_description"]:
        listed = ", ".join(f"{name} {n}" for name, n in skipped.items() if n)
        print(
            f"stage I: left out {stats['stage1_skipped_without_description']} train images without a description ({listed})"
        )


if __name__ == "__main__":
    runner.run(main)
