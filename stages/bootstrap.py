"""DVC stage `bootstrap`: the base MLLM and the CLIP model for mining.

Embedded default (`model.base: tiny`, `model.clip: tiny`): trains a tokenizer on the world's text,
builds a tiny Idefics2 (LLaVA-1.5 / Qwen2.5-VL: `tiny-llava` / `tiny-qwen2.5-vl`) and pre-trains it
on captions (attribute values, never category names) and text-only category knowledge; trains a
tiny open_clip model on train images and class names, and a second one with another seed for the
CLIP baseline (`model.clip_baseline: tiny`); writes models/base/, models/clip/,
models/clip_baseline/ and metrics/bootstrap.json (the paper's diagnosis, measured).
Paper scale: finds the configured models offline, checks them, and records exactly which weights
are used (models/base/base.json, models/clip/clip.json, models/clip_baseline/clip.json); nothing heavy is written.
"""

import json
import sys
from pathlib import Path

from finedefics import runner
from finedefics.config import load_or_exit

BASE, METRICS = Path("models/base"), Path("metrics/bootstrap.json")


def main() -> None:
    params = load_or_exit("params.yaml")
    runner.writes(BASE, Path("models/clip"), Path("models/clip_baseline"), METRICS)

    import torch

    from finedefics.data.prepare import is_world
    from finedefics.io import write_json
    from finedefics.models.families import TINY_BASES
    from finedefics.models.resolve import ModelNotAvailable, check_clip
    from finedefics.tracking import stage_run

    torch.manual_seed(params.seed)
    world = [n for n, s in params.datasets.items() if is_world(s)]
    tiny = [k for k, v in specs(params).items() if v in ("tiny", *TINY_BASES)]
    if tiny:
        from finedefics.models.bootstrap import THREADS

        torch.set_num_threads(THREADS)  # the tiny models' weights depend on it
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
            # published CLIPs are found offline before anything trains: a wrong spec fails in seconds
            clips = (("mining", "model.clip"), ("baseline", "model.clip_baseline"))
            records = {role: check_clip(specs(params)[key], key) for role, key in clips if specs(params)[key] != "tiny"}
            if params.model.base in TINY_BASES:
                metrics.update(pretrain_base(params, world, run))
            else:
                record_base(params)
            for role, seed in (("mining", params.seed), ("baseline", params.seed + 1)):
                metrics.update(build_clip(params, records.get(role), seed, role, world, run))
            write_json(METRICS, metrics)
            run.log_metrics(metrics)
    except (ModelNotAvailable, ValueError) as err:
        print(f"error: bootstrap: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    if metrics:
        print(json.dumps(metrics, indent=2))


def specs(params) -> dict[str, str]:
    """The models bootstrap provides, by param: `tiny` (or a tiny base) is built here."""
    return {
        "model.base": params.model.base,
        "model.clip": params.model.clip,
        "model.clip_baseline": params.model.clip_baseline,
    }


def pretrain_base(params, world: list[str], run) -> dict[str, float]:
    """In BASE: the tiny base MLLM, pre-trained on the world datasets; its diagnosis returned."""
    from finedefics.data.prepared import load_prepared
    from finedefics.io import atomic_path, load_image, write_json
    from finedefics.models import sft
    from finedefics.models.bootstrap import build_base, diagnose
    from finedefics.models.families import TINY_BASES
    from finedefics.models.mllm import ImageSettings

    datasets = [load_prepared(n) for n in world]
    cfg = params.bootstrap.mllm
    family = TINY_BASES[params.model.base].name
    images = ImageSettings.from_config(params.model)
    mllm, examples = build_base(datasets, cfg, params.world.image_size, params.seed, family, images.pixels)
    images.apply(mllm.processor)
    n_params = sum(p.numel() for p in mllm.model.parameters())
    visual_tokens = mllm.visual_token_count(load_image(datasets[0].train.path.iloc[0]))
    print(
        f"tiny {family}: {n_params / 1e6:.2f}M parameters, {visual_tokens} visual tokens per image, "
        f"{len(examples)} pre-training examples, vocabulary {len(mllm.tokenizer)}"
    )
    log = run.every(10, prefix="base_")
    sft.train(mllm, examples, cfg.epochs, cfg.batch_size, cfg.lr, params.seed, "pre-train base", log=log)
    with atomic_path(BASE) as tmp:
        mllm.model.save_pretrained(tmp)
        mllm.processor.save_pretrained(tmp)
        write_json(
            tmp / "base.json",
            {
                "model": params.model.base,
                "parameters": n_params,
                "examples": len(examples),
                "visual_tokens_per_image": visual_tokens,
                "image_splitting": params.model.image_splitting,
                "qwen_pixels": list(images.pixels),
            },
        )
    diagnosis, samples = diagnose(mllm, datasets, params.seed)
    for name, (caption, knowledge, choice) in samples.items():
        print(
            f"{name}: caption of a test image: {caption}\n{name}: knowledge: {knowledge}\n{name}: multiple choice answer: {choice!r}"
        )
    return {**diagnosis, "visual_tokens_per_image": visual_tokens}


def record_base(params) -> None:
    """In BASE: which published base MLLM is used (found offline and checked), nothing heavy."""
    from finedefics.io import atomic_path, write_json
    from finedefics.models.resolve import check_mllm

    record = {
        **check_mllm(params.model.base),
        "image_splitting": params.model.image_splitting,
        "qwen_pixels": [params.model.qwen_pixels.min, params.model.qwen_pixels.max],
    }
    with atomic_path(BASE) as tmp:
        tmp.mkdir()
        write_json(tmp / "base.json", record)
    print(f"base MLLM: {record['model']} ({record.get('revision') or 'local files hashed'})")


def build_clip(params, record: dict | None, seed: int, role: str, world: list[str], run) -> dict[str, float]:
    """In CLIP_DIRS[role]: a published CLIP's `record` (its `check_clip`), or without one a tiny CLIP
    trained on the world datasets' train images with `seed` (its zero-shot top-1 over every class
    returned); `role` the CLIP that mines (`mining`) or the baseline of evaluate@clip (`baseline`)."""
    from finedefics.data.prepared import load_prepared
    from finedefics.io import atomic_path, write_json
    from finedefics.models.paths import CLIP_DIRS

    folder = CLIP_DIRS[role]
    if record is not None:
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            write_json(tmp / "clip.json", record)
        print(f"CLIP ({role}): {record['model']}")
        return {}
    from finedefics.models.clip import train_prompt, train_tiny, zero_shot_accuracy

    images, texts = [], []
    data = {n: load_prepared(n) for n in world}
    for ds in data.values():
        images += list(ds.train.path)
        texts += [train_prompt(ds.names[label], ds.super_category) for label in ds.train.label]
    prefix = "clip_" if role == "mining" else "clip_baseline_"
    with atomic_path(folder) as tmp:
        model = train_tiny(
            params.bootstrap.clip, params.world.image_size, images, texts, seed, tmp, log=run.every(10, prefix=prefix)
        )
    return {
        f"{name}/{prefix}zero_shot_accuracy": zero_shot_accuracy(
            model, list(ds.test.path), list(ds.test.label), ds.names, params.model.clip_prompt
        )
        for name, ds in data.items()
    }


if __name__ == "__main__":
    runner.run(main)
