"""DVC stage `summarize@<dataset>`: a description per train image from its attribute values (eq. 4).

Writes data/descriptions/<dataset>.parquet (image_id, description) and
metrics/summarize/<dataset>.json. Applies attributes.types / quality / level.
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
    cfg = params.attributes
    attributes = Path("data/attributes") / name
    out, metrics = Path("data/descriptions") / f"{name}.parquet", Path("metrics/summarize") / f"{name}.json"
    runner.writes(out, metrics)
    runner.reads(attributes / "keys.json", attributes / "values.parquet")

    from finedefics.artefacts import DESCRIPTIONS, VALUES
    from finedefics.attributes.backends import BackendError, text_backend
    from finedefics.attributes.discover import load_keys
    from finedefics.attributes.summarize import summarize
    from finedefics.data.prepared import load_prepared
    from finedefics.io import read_json, write_json
    from finedefics.tracking import stage_run

    dataset = load_prepared(name)
    keys = load_keys(read_json(attributes / "keys.json"))
    values = VALUES.read(attributes / "values.parquet")
    try:
        with stage_run("summarize", params, run_name=f"summarize@{name}") as run:
            backend = None if cfg.summarize.backend == "template" else text_backend(cfg.summarize, "summarize")
            result = summarize(values, dataset, keys, cfg, params.seed, backend)
            DESCRIPTIONS.write(out, result.descriptions)
            write_json(metrics, result.stats)
            run.log_metrics(result.stats)
    except (BackendError, ValueError) as err:
        print(f"error: summarize@{name}: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"{name}: {result.stats['descriptions']} descriptions, {result.stats['names_scrubbed']} names scrubbed")
    if len(result.descriptions):
        print(f"  e.g. {result.descriptions.description.iloc[0]}")


if __name__ == "__main__":
    runner.run(main)
