"""The MLLM families this pipeline trains and evaluates (Idefics2, LLaVA-1.5, Qwen2.5-VL; Table 4),
in one registry: where each keeps its LLM, connector and vision tower, which `model.base` value
builds a tiny one for the world, how it turns images into visual tokens, and the positions its LLM
needs beside them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

LORA_PROJECTIONS = ("down_proj", "gate_proj", "up_proj", "k_proj", "q_proj", "v_proj", "o_proj", "linear_1", "linear_2")


@dataclass(frozen=True)
class Family:
    name: str  # the transformers `model_type`
    tiny_base: str  # the `model.base` value for which `bootstrap` builds a tiny one
    text_model: str  # module path of the LLM body inside the model
    connector: str  # regex alternatives naming the connector's modules
    vision: str
    extra_layers: tuple[str, ...] = ()  # Linear names beyond LORA_PROJECTIONS (regexes)
    rotary_3d: bool = False  # the LLM places visual tokens by (time, height, width): Qwen2.5-VL's M-RoPE

    def lora_targets(self, modules: list[str]) -> str:
        """A PEFT `target_modules` regex over the chosen parts."""
        parts = {"text_model": self.text_model.split(".")[-1], "connector": self.connector, "vision_model": self.vision}
        chosen = "|".join(parts[m] for m in modules)
        return rf".*({chosen}).*({'|'.join(LORA_PROJECTIONS + self.extra_layers)})$"

    def visual_tokens(self, model, pixels: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """A (tokens, hidden) tensor per image: what the connector of `model` (unwrapped) feeds its LLM."""
        if self.name == "idefics2":
            out = model.get_image_features(pixels["pixel_values"], pixels.get("pixel_attention_mask"))
        elif self.name == "qwen2_5_vl":
            out = model.get_image_features(pixels["pixel_values"], pixels["image_grid_thw"])
        else:
            cfg = model.config
            out = model.get_image_features(
                pixels["pixel_values"],
                vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            )
        return list(out.pooler_output)

    def positions(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The position ids a processor batch needs when it enters the LLM as input embeddings: for
        Qwen2.5-VL the 3D rotary positions its own forward derives from the token ids and image
        grids; None (the LLM's default 1D positions) for the other families."""
        if not self.rotary_3d:
            return None
        return model.model.get_rope_index(
            batch["input_ids"],
            batch["mm_token_type_ids"],
            image_grid_thw=batch["image_grid_thw"],
            attention_mask=batch["attention_mask"],
        )[0]


FAMILIES = {
    "idefics2": Family(
        "idefics2", "tiny", "model.text_model", "modality_projection|perceiver_resampler", "vision_model"
    ),
    "llava": Family("llava", "tiny-llava", "model.language_model", "multi_modal_projector", "vision_tower"),
    "qwen2_5_vl": Family(
        "qwen2_5_vl",
        "tiny-qwen2.5-vl",
        "model.language_model",
        "merger",
        "visual",
        extra_layers=(r"mlp\.0", r"mlp\.2", r"attn\.qkv", r"attn\.proj"),  # the merger's Linears, the ViT's attention
        rotary_3d=True,
    ),
}
TINY_BASES = {f.tiny_base: f for f in FAMILIES.values()}  # model.base values `bootstrap` builds


def family_of(model) -> Family:
    """The family of a transformers model (not PEFT-wrapped)."""
    kind = model.config.model_type
    if kind not in FAMILIES:
        raise ValueError(f"A^3 supports {', '.join(FAMILIES)} models, not {kind!r}")
    return FAMILIES[kind]
