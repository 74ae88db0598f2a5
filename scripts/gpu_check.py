"""GPU check (issue: training): run on a machine with one CUDA GPU, writes its report to stdout.

1. The smoke pipeline on CUDA: a tiny Idefics2 with QLoRA (4-bit NF4, bf16 compute), Stage I
   steps on a small world: step time and peak memory.
2. One Stage I forward + backward of the full-width Idefics2-8b architecture (random weights,
   4-bit) with 2 and 4 LLM layers at per-device batch 2, extrapolated linearly to 32 layers.
3. The same for Qwen2.5-VL-7B-Instruct's architecture (32-block windowed ViT, patch merger, Qwen2-7B
   width) on 448x448 images (256 visual tokens, configs/qwen2.5-vl.yaml), extrapolated to 28 layers.
`--only idefics2` or `--only qwen2.5-vl` runs one of 2 and 3 (1 always runs).
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import (
    Idefics2Config,
    Idefics2ForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from finedefics.align.finetune import load_trainable  # noqa: E402
from finedefics.align.losses import LossForm, Temperatures  # noqa: E402
from finedefics.align.steps import Stage1  # noqa: E402
from finedefics.config import LoraConfig, ModelConfig  # noqa: E402
from finedefics.models.mllm import MLLM, load_processor  # noqa: E402


def stage1_rows(root: Path) -> pd.DataFrame:
    from conftest import make_world_workdir
    from test_training import write_instructions

    make_world_workdir(root, categories=6, cluster_size=3, train_per_class=4, test_per_class=1)
    write_instructions(root)
    rows = pd.read_parquet(root / "data/instructions/stage1.parquet")
    rows["path"] = [str(root / p) for p in rows.path]
    return rows


def qlora_steps(model_dir: Path, rows: pd.DataFrame, batch: int, steps: int) -> dict:
    model = load_trainable(str(model_dir), ModelConfig(finetune="qlora", lora=LoraConfig(r=8, alpha=8)), True, "cuda")
    mllm = MLLM(model, load_processor(str(model_dir)))
    names = sorted(set(rows.category) | {c for cs in rows.negative_categories for c in cs})
    stage = Stage1(
        mllm,
        Temperatures(0.07, two=False, learn=True).cuda(),
        "obj-att-cat",
        True,
        {n: i for i, n in enumerate(names)},
        LossForm(ccc="logsumexp"),
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad] + [stage.temperature.oa], lr=2e-4)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss, values = stage.loss(rows.iloc[(step * batch) % len(rows) :][:batch])
        loss.backward()
        opt.step()
        opt.zero_grad()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {
        "step_s": float(np.median(times[1:] or times)),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "loss": values["loss"],
    }


def idefics2_8b(layers: int, image_token_id: int) -> Idefics2Config:
    """Idefics2-8b's published architecture with `layers` LLM layers."""
    return Idefics2Config(
        vision_config={
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 27,
            "num_attention_heads": 16,
            "image_size": 980,
            "patch_size": 14,
        },
        perceiver_config={
            "resampler_n_latents": 64,
            "resampler_depth": 3,
            "resampler_n_heads": 16,
            "resampler_head_dim": 96,
            "num_key_value_heads": 4,
        },
        text_config={
            "model_type": "mistral",
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": layers,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 32003,
            "max_position_embeddings": 32768,
        },
        image_token_id=image_token_id,
    )


def qwen2_5_vl_7b(layers: int, tokens: dict[str, int]) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-7B-Instruct's published architecture with `layers` LLM layers; `tokens` the special
    token ids of the tiny tokenizer the check runs with (all below the 7B vocabulary)."""
    return Qwen2_5_VLConfig(
        vision_config={
            "depth": 32,
            "hidden_size": 1280,
            "intermediate_size": 3420,
            "num_heads": 16,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31],
            "out_hidden_size": 3584,
        },
        text_config={
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_hidden_layers": layers,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "vocab_size": 152064,
            "max_position_embeddings": 128000,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
            "tie_word_embeddings": False,
        },
        tie_word_embeddings=False,
        **tokens,
    )


def full_width(name: str, build, processor, folder: Path, rows: pd.DataFrame, last: int) -> dict:
    """Peak memory of a Stage I step at per-device batch 2 with 2 and 4 LLM layers of the model that
    `build(layers)` configures, extrapolated to `last` layers."""
    peaks = {}
    for layers in (2, 4):
        where = folder / f"{name}-{layers}"
        torch.manual_seed(0)
        with torch.device("cuda"):
            build(layers).to(torch.bfloat16).save_pretrained(where)
        torch.cuda.empty_cache()
        processor.save_pretrained(where)
        peaks[layers] = qlora_steps(where, rows, batch=2, steps=2)
        print(name, layers, json.dumps(peaks[layers]), flush=True)
    per_layer = (peaks[4]["peak_gib"] - peaks[2]["peak_gib"]) / 2
    return {
        "peak_gib_2_layers": peaks[2]["peak_gib"],
        "peak_gib_4_layers": peaks[4]["peak_gib"],
        f"peak_gib_{last}_layers_extrapolated": peaks[2]["peak_gib"] + (last - 2) * per_layer,
        "step_s_4_layers": peaks[4]["step_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", choices=["idefics2", "qwen2.5-vl"])
    only = parser.parse_args().only
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    from tiny_models import build

    report = {"device": torch.cuda.get_device_name(0)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = build(tmp / "tiny")
        rows = stage1_rows(tmp / "world")
        report["smoke_qlora_bf16"] = qlora_steps(models["vlm"], rows, batch=8, steps=6)
        print(json.dumps(report["smoke_qlora_bf16"]), flush=True)
        if only != "idefics2":
            processor = load_processor(str(models["qwen"]))
            ids = processor.tokenizer.convert_tokens_to_ids
            tokens = {
                "image_token_id": ids("<|image_pad|>"),
                "video_token_id": ids("<|video_pad|>"),
                "vision_start_token_id": ids("<|vision_start|>"),
                "vision_end_token_id": ids("<|vision_end|>"),
            }
            processor.image_processor.patch_size = 14  # the 7B's patches and its merger's 2x2
            processor.image_processor.size = {"shortest_edge": 448 * 448, "longest_edge": 448 * 448}
            model = lambda layers: Qwen2_5_VLForConditionalGeneration(qwen2_5_vl_7b(layers, tokens))  # noqa: E731
            report["qwen2_5_vl_7b"] = {
                **full_width("qwen2.5-vl-7b", model, processor, tmp, rows, 28),
                "image_pixels": "448x448 (model.qwen_pixels of configs/qwen2.5-vl.yaml: 256 visual tokens)",
            }
        if only != "qwen2.5-vl":
            processor = load_processor(str(models["vlm"]))
            image_token = processor.tokenizer.convert_tokens_to_ids("<image>")  # the tiny tokenizer: ids below 32003
            processor.image_seq_len = 64  # the 8b perceiver's latents
            processor.image_processor.size = {"longest_edge": 980, "shortest_edge": 378}  # Idefics2-8b's: 378x378 here
            model = lambda layers: Idefics2ForConditionalGeneration(idefics2_8b(layers, image_token))  # noqa: E731
            report["idefics2_8b"] = {
                **full_width("idefics2-8b", model, processor, tmp, rows, 32),
                "image_pixels": "378x378 (square world images at Idefics2-8b's shortest edge), no image splitting",
            }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
