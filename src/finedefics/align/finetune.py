"""Loading a base for fine-tuning (QLoRA / LoRA / full) and saving the merged result."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

from finedefics.config import ModelConfig
from finedefics.models.families import family_of
from finedefics.models.paths import resolve
from finedefics.models.representations import unwrap


def load_trainable(path: str, cfg: ModelConfig, gradient_checkpointing: bool, device: str = "cpu"):
    """The model to train: 4-bit NF4 base + LoRA (qlora), LoRA (lora), or every weight (full)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    path = resolve(path)
    if cfg.finetune == "qlora":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForImageTextToText.from_pretrained(path, quantization_config=quant, device_map={"": device})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    else:
        model = AutoModelForImageTextToText.from_pretrained(path).to(device)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable()
    if cfg.finetune == "full":
        model.requires_grad_(True)
        return model
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=family_of(model).lora_targets(cfg.lora.modules),
    )
    if gradient_checkpointing:
        model.enable_input_require_grads()
    return get_peft_model(model, lora)


def dequantized_base(model, base_path: str):
    """The base in full precision whose quantised weights are replaced by their dequantised
    values: the weights the QLoRA model actually computed with, so that the merged model
    behaves as the trained one (merging into the original weights would add the quantisation
    error back)."""
    import bitsandbytes as bnb

    base = AutoModelForImageTextToText.from_pretrained(resolve(base_path))
    modules = dict(base.named_modules())
    for name, module in unwrap(model).named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            target = modules[name.removesuffix(".base_layer")]
            target.weight.data = weight.to(target.weight.dtype).cpu()
    return base


def save_merged(model, finetune: str, base_path: str, processor, out: Path) -> None:
    """A full checkpoint in `out` that `from_pretrained` loads: adapters merged into the base
    (for QLoRA into the dequantised base weights), processor beside it."""
    out.mkdir(parents=True, exist_ok=True)
    if finetune == "full":
        model.save_pretrained(out)
    elif finetune == "lora":
        model.merge_and_unload().save_pretrained(out)
    else:
        from peft import PeftModel

        with tempfile.TemporaryDirectory() as adapter_dir:
            model.save_pretrained(adapter_dir)
            merged = PeftModel.from_pretrained(dequantized_base(model, base_path), adapter_dir).merge_and_unload()
            merged.save_pretrained(out)
    processor.save_pretrained(out)


def load_processor(path: str):
    return AutoProcessor.from_pretrained(resolve(path))
