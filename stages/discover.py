"""DVC stage `discover@<dataset>`: useful attribute keys for the dataset's super-category (eq. 2).

Writes data/attributes/<dataset>/keys.json: the keys, each typed color / shape / texture /
size / other, plus the general description key; with the backend's raw answer.
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
    cfg = params.attributes.discover
    out = Path("data/attributes") / name / "keys.json"
    runner.writes(out)

    from finedefics.attributes.backends import BackendError, text_backend
    from finedefics.attributes.discover import llm_keys, static_keys
    from finedefics.attributes.parsing import NoAttributeList
    from finedefics.data.prepared import load_prepared
    from finedefics.io import write_json
    from finedefics.tracking import stage_run

    dataset = load_prepared(name, images=False)
    try:
        with stage_run("discover", params, run_name=f"discover@{name}") as run:
            if cfg.backend == "static":
                keys, raw = static_keys(dataset, cfg.file)
            else:
                keys, raw = llm_keys(text_backend(cfg, "discover"), dataset, cfg.retries)
            types = {t: sum(k.type == t for k in keys) for t in ("color", "shape", "texture", "size", "other")}
            write_json(
                out,
                {
                    "dataset": name,
                    "super_category": dataset.super_category,
                    "backend": cfg.backend,
                    "keys": [k.to_dict() for k in keys],
                    "raw": raw,
                },
            )
            run.log_metrics({"keys": len(keys), **{f"keys_{t}": n for t, n in types.items()}})
    except (NoAttributeList, BackendError, ValueError) as err:
        print(f"error: discover@{name}: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"{name}: {len(keys)} keys ({', '.join(f'{n} {t}' for t, n in types.items() if n)})")


if __name__ == "__main__":
    runner.run(main)
