"""DVC stage `extract@<dataset>`: one VQA answer per train image and attribute key (eq. 3).

Writes data/attributes/<dataset>/values.parquet (image_id, key, value), failures.csv (unit, key,
error; written also when too many items failed) and metrics/extract/<dataset>.json. Resumable:
answers go to shards under .resume/extract/ as they come, and what was received is written
before the stage ends on an error; a killed run started again continues where it stopped. A run
that ends with failed items (fewer than `max_failure_rate` allows) says how to ask them again:
`dvc repro -f -s extract@<dataset>` asks the failed (image, key) items alone.
"""

import argparse
import sys
from pathlib import Path

from finedefics import runner
from finedefics.config import load_or_exit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dataset")
    name = parser.parse_args().dataset
    params = load_or_exit("params.yaml")
    cfg = params.attributes.extract
    construction = params.attributes.construction
    out, metrics = Path("data/attributes") / name, Path("metrics/extract") / f"{name}.json"
    runner.writes(out / "values.parquet", out / "failures.csv", metrics, Path(".resume/extract") / name)

    from finedefics.artefacts import VALUES
    from finedefics.attributes.backends import vqa_backend
    from finedefics.attributes.discover import load_keys
    from finedefics.attributes.extract import TooManyFailures, extract
    from finedefics.data.prepared import load_prepared
    from finedefics.io import atomic_path, read_json, write_json
    from finedefics.tracking import stage_run

    dataset = load_prepared(name)
    keys = load_keys(read_json(out / "keys.json"))
    oracle = cfg.backend == "oracle" or construction == "ground-truth"
    try:
        with stage_run("extract", params, run_name=f"extract@{name}") as run:
            backend = None if oracle else vqa_backend(cfg)
            result = extract(dataset, keys, construction, cfg, backend, Path(".resume/extract") / name)
            VALUES.write(out / "values.parquet", result.values)
            with atomic_path(out / "failures.csv") as tmp:
                result.failures.to_csv(tmp, index=False)
            write_json(metrics, result.stats)
            run.log_metrics(result.stats)
    except (TooManyFailures, ValueError) as err:
        if isinstance(err, TooManyFailures):  # what failed, also when the stage fails
            with atomic_path(out / "failures.csv") as tmp:
                err.failures.to_csv(tmp, index=False)
        print(f"error: extract@{name}: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    s = result.stats
    failed = int(s["failed_items"])
    retry = (
        f", listed in {out / 'failures.csv'}; `dvc repro -f -s extract@{name}` asks them alone again" if failed else ""
    )
    print(
        f"{name}: {int(s['n_values'])} values for {int(s['units'])} units x {int(s['n_keys'])} keys; {failed} failed{retry}"
    )


if __name__ == "__main__":
    runner.run(main)
