"""DVC stage `bootstrap`: the base MLLM and the CLIP model for mining.

Embedded default (`model.base: tiny`, `model.clip: tiny`): trains a tokenizer on the world's text,
builds a tiny Idefics2 and pre-trains it on captions (attribute values, never category names) and
text-only category knowledge; trains a tiny open_clip model on train images and class names;
writes models/base/, models/clip/ and metrics/bootstrap.json (the paper's diagnosis, measured).
Paper scale: finds the configured models offline, checks them, and records exactly which weights
are used (models/base/base.json, models/clip/clip.json); nothing heavy is written.
"""

import json
import sys
from pathlib import Path

from finedefics.config import load_or_exit
from finedefics.io import run_main

BASE, CLIP, METRICS = Path("models/base"), Path("models/clip"), Path("metrics/bootstrap.json")


def main() -> None:
    params = load_or_exit("params.yaml")

    import torch

    from finedefics.data.prepare import is_world
    from finedefics.data.prepared import load_prepared
    from finedefics.io import atomic_path, write_json
    from finedefics.models.families import TINY_BASES
    from finedefics.models.resolve import ModelNotAvailable, check_clip, check_mllm
    from finedefics.tracking import stage_run

    torch.manual_seed(params.seed)
    world = {n: s for n, s in params.datasets.items() if is_world(s)}
    tiny = [
        k
        for k, v in (("model.base", params.model.base), ("model.clip", params.model.clip))
        if v in ("tiny", *TINY_BASES)
    ]
    if tiny and len(world) != len(params.datasets):
        print(
            f"error: {' and '.join(tiny)} = tiny is built from the synthetic world, but datasets has real ones; "
            "set them to published models (see configs/paper.yaml)",
            file=sys.stderr,
        )
        raise SystemExit(2)

    metrics: dict[str, float] = {}
    try:
        with stage_run("bootstrap", params) as run:
            if params.model.base in TINY_BASES:
                from finedefics.models import sft
                from finedefics.models.bootstrap import build_base, diagnose
                from finedefics.models.mllm import set_image_splitting

                datasets = [load_prepared(n) for n in world]
                cfg = params.bootstrap.mllm
                family = TINY_BASES[params.model.base].name
                mllm, examples = build_base(datasets, cfg, params.world.image_size, params.seed, family)
                set_image_splitting(mllm.processor, params.model.image_splitting)
                n_params = sum(p.numel() for p in mllm.model.parameters())
                print(
                    f"tiny {family}: {n_params / 1e6:.2f}M parameters, {len(examples)} pre-training examples, vocabulary {len(mllm.tokenizer)}"
                )
                sft.train(
                    mllm,
                    examples,
                    cfg.epochs,
                    cfg.batch_size,
                    cfg.lr,
                    params.seed,
                    "pre-train base",
                    log=run.every(10, prefix="base_"),
                )
                with atomic_path(BASE) as tmp:
                    mllm.model.save_pretrained(tmp)
                    mllm.processor.save_pretrained(tmp)
                    write_json(
                        tmp / "base.json",
                        {
                            "model": params.model.base,
                            "parameters": n_params,
                            "examples": len(examples),
                            "image_splitting": params.model.image_splitting,
                        },
                    )
                diagnosis, samples = diagnose(mllm, datasets, params.seed)
                metrics.update(diagnosis)
                for name, (caption, knowledge, choice) in samples.items():
                    print(
                        f"{name}: caption of a test image: {caption}\n{name}: knowledge: {knowledge}\n{name}: multiple choice answer: {choice!r}"
                    )
            else:
                record = {**check_mllm(params.model.base), "image_splitting": params.model.image_splitting}
                with atomic_path(BASE) as tmp:
                    tmp.mkdir()
                    write_json(tmp / "base.json", record)
                print(f"base MLLM: {record['model']} ({record.get('revision') or 'local files hashed'})")
            if params.model.clip == "tiny":
                from finedefics.models.clip import train_prompt, train_tiny, zero_shot_accuracy

                images, texts = [], []
                data = {n: load_prepared(n) for n in world}
                for ds in data.values():
                    images += list(ds.train.path)
                    texts += [train_prompt(ds.names[label], ds.super_category) for label in ds.train.label]
                with atomic_path(CLIP) as tmp:
                    clip = train_tiny(
                        params.bootstrap.clip,
                        params.world.image_size,
                        images,
                        texts,
                        params.seed,
                        tmp,
                        log=run.every(10, prefix="clip_"),
                    )
                for name, ds in data.items():
                    acc = zero_shot_accuracy(
                        clip, list(ds.test.path), list(ds.test.label), ds.names, params.model.clip_prompt
                    )
                    metrics[f"{name}/clip_zero_shot_accuracy"] = acc
            else:
                record = check_clip(params.model.clip)
                with atomic_path(CLIP) as tmp:
                    tmp.mkdir()
                    write_json(tmp / "clip.json", record)
                print(f"CLIP: {record['model']}")
            write_json(METRICS, metrics)
            run.log_metrics(metrics)
    except (ModelNotAvailable, ValueError, OSError) as err:
        print(f"error: bootstrap: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    if metrics:
        print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    run_main(main)
