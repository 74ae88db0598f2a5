"""Loading a base for fine-tuning (QLoRA / LoRA / full) and saving the merged result."""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

from finedefics.config import ModelConfig
from finedefics.models.families import family_of
from finedefics.models.paths import resolve
from finedefics.models.representations import unwrap


@contextmanager
def _peft_wrapping() -> Iterator[None]:
    """Quiet around peft wrapping a model, which reads an attribute transformers 5 deprecates."""
    with warnings.catch_warnings():
        # no upstream issue yet; peft's main still reads it: https://github.com/huggingface/peft/blob/5d602fdb/src/peft/peft_model.py#L183
        warnings.filterwarnings("ignore", r"`is_gradient_checkpointing` is deprecated", FutureWarning)
        yield


def keep_trainable_4bit(model) -> None:
    """bitsandbytes (0.50) repacks a 4-bit layer's weights for its CPU inference kernel at the first
    forward in eval mode without gradients (on CPUs with AVX512-BF16), and keeps them packed when
    training resumes: that forward then goes through the inference kernel, which has no backward. A
    model to train measures in eval mode (Stage I's alignment) and trains after, so its layers are
    never repacked."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_trainable(path: str, cfg: ModelConfig, gradient_checkpointing: bool, device: str = "cpu"):
    """The model to train: 4-bit NF4 base + LoRA (qlora), LoRA (lora), or every weight (full).
    QLoRA goes through peft's `prepare_model_for_kbit_training` when `cfg.prepare_kbit` (it keeps
    the norms and embeddings in float32); the release skips it."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    path = resolve(path)
    if cfg.finetune == "qlora":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForImageTextToText.from_pretrained(path, quantization_config=quant, device_map={"": device})
        keep_trainable_4bit(model)
        if cfg.prepare_kbit:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        elif gradient_checkpointing:
            model.gradient_checkpointing_enable()
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
        init_lora_weights="gaussian" if cfg.lora.init == "gaussian" else True,
        target_modules=family_of(model).lora_targets(cfg.lora.modules),
    )
    if gradient_checkpointing:
        model.enable_input_require_grads()
    with _peft_wrapping():
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


def save_merged(model, cfg: ModelConfig, base_path: str, processor, out: Path) -> None:
    """A full checkpoint in `out` that `from_pretrained` loads: adapters merged into the base,
    processor beside it. For QLoRA, `cfg.merge_into` picks the base: `dequantised` (the weights the
    adapters were trained with) or `original` (the full-precision checkpoint, as the release does,
    which adds the quantisation error back)."""
    out.mkdir(parents=True, exist_ok=True)
    if cfg.finetune == "full":
        model.save_pretrained(out)
    elif cfg.finetune == "lora":
        model.merge_and_unload().save_pretrained(out)
    else:
        from peft import PeftModel

        with tempfile.TemporaryDirectory() as adapter_dir:
            # the adapters are saved before the base is built. Measured on CPU (peft 0.21, bitsandbytes
            # 0.50): saving a 4-bit PEFT model moves its own outputs (by ~0.1 on the test's tiny model),
            # and a base built before that save merges into a model far from the trained one; the
            # merge test in tests/test_training.py catches the other order
            model.save_pretrained(adapter_dir)
            if cfg.merge_into == "dequantised":
                base = dequantized_base(model, base_path)
            else:
                base = AutoModelForImageTextToText.from_pretrained(resolve(base_path))
            with _peft_wrapping():
                merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
            merged.save_pretrained(out)
    processor.save_pretrained(out)
