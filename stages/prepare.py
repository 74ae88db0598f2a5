"""DVC stage `prepare@<dataset>`: a checked image manifest for one dataset.

Writes data/prepared/<dataset>/ (images.parquet, classes.json, rejected.csv, foci_unmapped.csv
for real datasets, images/ for the world), plots/prepare/<dataset>.png and
metrics/prepare/<dataset>.json.
"""

import argparse
import sys
from pathlib import Path

from finedefics import runner
from finedefics.config import load_or_exit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dataset")
    args = parser.parse_args()
    params = load_or_exit("params.yaml")
    name = args.dataset
    if name not in params.datasets:
        print(f"error: dataset {name!r} is not in params.yaml datasets ({', '.join(params.datasets)})", file=sys.stderr)
        raise SystemExit(2)

    source = params.datasets[name]
    out = Path("data/prepared") / name
    sheet_path, metrics_path = Path("plots/prepare") / f"{name}.png", Path("metrics/prepare") / f"{name}.json"
    runner.writes(out, sheet_path, metrics_path)

    from finedefics.artefacts import IMAGES
    from finedefics.data.contact_sheet import contact_sheet
    from finedefics.data.manifest import EmptyClassError, LeakageError
    from finedefics.data.prepare import is_world, prepare_real, prepare_world, statistics
    from finedefics.data.real import DatasetNotFound
    from finedefics.io import atomic_path, write_json
    from finedefics.tracking import stage_run

    if is_world(source):
        runner.reads(source)  # a real dataset's folder is checked by its loader, which names the file it lacks
    try:
        with stage_run("prepare", params, run_name=f"prepare@{name}") as run:
            with atomic_path(out) as tmp:
                tmp.mkdir(parents=True)
                if is_world(source):
                    prepared = prepare_world(name, Path(source), params.world, params.seed, tmp, out)
                else:
                    prepared = prepare_real(name, Path(source), params.real.per_class)
                IMAGES.write(tmp / "images.parquet", prepared.dataset.images)
                write_json(tmp / "classes.json", prepared.dataset.to_json())
                prepared.rejected.to_csv(tmp / "rejected.csv", index=False)
                if prepared.unmapped is not None:
                    prepared.unmapped.to_csv(tmp / "foci_unmapped.csv", index=False)
            with atomic_path(sheet_path) as tmp_sheet:
                contact_sheet(prepared.dataset.train, prepared.dataset.names).save(tmp_sheet, format="PNG")
            stats = statistics(prepared)
            write_json(metrics_path, stats)
            run.log_metrics(stats)
            run.log_artifact(sheet_path)
    except (DatasetNotFound, LeakageError, EmptyClassError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None

    print(f"{name}: {stats['classes']} classes, {stats['train_images']} train / {stats['test_images']} test images")
    if len(prepared.rejected):
        print(f"{name}: {len(prepared.rejected)} image(s) rejected, listed in {out / 'rejected.csv'}")
    if prepared.unmapped is not None and len(prepared.unmapped):
        first = prepared.unmapped.iloc[0]
        print(
            f"{name}: {len(prepared.unmapped)} FOCI test entries do not map to exactly one prepared test image "
            f"(e.g. {first.image}: {first.reason}); listed in {out / 'foci_unmapped.csv'}"
        )


if __name__ == "__main__":
    runner.run(main)
