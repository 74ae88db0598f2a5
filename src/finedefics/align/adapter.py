"""One interface over the MLLM families A^3 trains (Idefics2, LLaVA-1.5; Table 4).

What Stage I needs from a model: its visual tokens (the connector's output), its LLM as a
sequence encoder (last-layer hidden state at an appended EOS), and which modules LoRA adapts
("text_model" and "connector", as in the paper). Everything goes through the models' public
submodules; nothing in the libraries is patched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from finedefics.models.sft import load_image

LORA_PROJECTIONS = "(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|o_proj|linear_1|linear_2)"


@dataclass(frozen=True)
class Family:
    name: str
    text_model: str  # module path of the LLM body inside the model
    connector: str  # regex alternatives naming the connector's modules
    vision: str

    def lora_targets(self, modules: list[str]) -> str:
        """A PEFT `target_modules` regex over the chosen parts."""
        parts = {"text_model": self.text_model.split(".")[-1], "connector": self.connector, "vision_model": self.vision}
        chosen = "|".join(parts[m] for m in modules)
        return rf".*({chosen}).*{LORA_PROJECTIONS}$"


FAMILIES = {
    "idefics2": Family("idefics2", "model.text_model", "modality_projection|perceiver_resampler", "vision_model"),
    "llava": Family("llava", "model.language_model", "multi_modal_projector", "vision_tower"),
}


def family_of(model) -> Family:
    kind = model.config.model_type
    if kind not in FAMILIES:
        raise ValueError(f"A^3 supports {', '.join(FAMILIES)} models, not {kind!r}")
    return FAMILIES[kind]


def unwrap(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@dataclass
class Adapter:
    """Global representations of objects and texts from one MLLM (paper §3.2)."""

    model: torch.nn.Module  # the trained model, possibly PEFT-wrapped
    eos_id: int

    @property
    def family(self) -> Family:
        return family_of(unwrap(self.model))

    @property
    def text_model(self) -> torch.nn.Module:
        module = unwrap(self.model)
        for part in self.family.text_model.split("."):
            module = getattr(module, part)
        return module

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return unwrap(self.model).get_input_embeddings()(ids)

    def visual_tokens(self, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        """(batch, tokens, hidden): what the connector feeds the LLM for each image."""
        base = unwrap(self.model)
        if self.family.name == "idefics2":
            out = base.get_image_features(pixels["pixel_values"], pixels.get("pixel_attention_mask"))
        else:
            cfg = base.config
            out = base.get_image_features(
                pixels["pixel_values"],
                vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            )
        return torch.stack(list(out.pooler_output))

    def states(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The LLM's last-layer states of right-padded input embeddings."""
        return self.text_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state

    def object_states(self, pixels: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(states, mask) of each image's visual tokens followed by an EOS embedding."""
        visual = self.visual_tokens(pixels)
        eos = self.embed(torch.full((len(visual), 1), self.eos_id, dtype=torch.long, device=visual.device)).to(
            visual.dtype
        )
        embeds = torch.cat([visual, eos], dim=1)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=visual.device)
        return self.states(embeds, mask), mask

    def text_states(self, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(states, mask) of each token sequence with EOS appended, in one right-padded pass."""
        lengths = [len(t) + 1 for t in ids]
        width = max(lengths)
        device = next(self.model.parameters()).device
        batch = torch.full((len(ids), width), self.eos_id, dtype=torch.long, device=device)
        mask = torch.zeros((len(ids), width), dtype=torch.long, device=device)
        for i, tokens in enumerate(ids):
            batch[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            mask[i, : lengths[i]] = 1
        return self.states(self.embed(batch), mask), mask

    def encode_objects(self, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        """ô: the state at the EOS after each image's visual tokens."""
        return last(*self.object_states(pixels))

    def encode_texts(self, ids: list[list[int]]) -> torch.Tensor:
        """â / ĉ: the state at the EOS appended to each token sequence."""
        return last(*self.text_states(ids))


def last(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The state of each right-padded sequence's last real element."""
    return states[torch.arange(len(states)), mask.sum(1) - 1]


def mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The states averaged over each sequence's real elements."""
    return (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


def pixels(mllm, paths: list[str]) -> dict[str, torch.Tensor]:
    """The image processor's tensors for one image per path, on the model's device."""
    device = next(mllm.model.parameters()).device
    batch = mllm.processor.image_processor([[load_image(p)] for p in paths], return_tensors="pt")
    return {k: v.to(device) for k, v in batch.items()}
