"""Global representations of objects and texts from one MLLM (paper §3.2), for Stage I and the analyses.

An object is its visual tokens (the connector's output) followed by an EOS embedding, run through
the LLM; a text is its tokens and an appended EOS. The representation is the last-layer state at
that EOS (or, for the analyses, the states averaged over the sequence). Qwen2.5-VL's visual tokens
keep the 3D rotary positions its own forward gives an image at the start of a sequence. Everything
goes through the models' public submodules; nothing in the libraries is patched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from finedefics.io import load_image
from finedefics.models.families import Family, family_of
from finedefics.models.mllm import embed_with_visual


@dataclass
class Visual:
    """The connector's output for a batch of images: a (tokens, hidden) tensor per image (Qwen2.5-VL's
    count depends on the image's size), and the image grids where the family has them."""

    tokens: list[torch.Tensor]
    grid: torch.Tensor | None = None  # Qwen2.5-VL's image_grid_thw

    def flat(self) -> torch.Tensor:
        """Every visual token in order: what fills the image-token slots of a batch."""
        return torch.cat(self.tokens)


def unwrap(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@dataclass
class Representations:
    """Reads the global representations of one model."""

    model: torch.nn.Module  # possibly PEFT-wrapped
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

    def states(self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The LLM's last-layer states of right-padded input embeddings."""
        return self.text_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state

    def visual(self, pixels: dict[str, torch.Tensor]) -> Visual:
        """The connector's output for the image processor's tensors."""
        return Visual(self.family.visual_tokens(unwrap(self.model), pixels), pixels.get("image_grid_thw"))

    def object_states(self, pixels: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(states, mask) of each image's visual tokens followed by an EOS embedding."""
        return self.visual_states(self.visual(pixels))

    def visual_states(self, visual: Visual) -> tuple[torch.Tensor, torch.Tensor]:
        """`object_states` of visual tokens already computed (`visual`), right-padded."""
        model = unwrap(self.model)
        counts = [len(t) for t in visual.tokens]
        width = max(counts) + 1
        device = visual.tokens[0].device
        image_id = model.config.image_token_id
        ids = torch.full((len(counts), width), self.eos_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, n in enumerate(counts):
            ids[i, :n] = image_id
            mask[i, : n + 1] = 1
        embeds = embed_with_visual(model, ids, visual.flat())
        positions = self.family.positions(
            model,
            {
                "input_ids": ids,
                "mm_token_type_ids": (ids == image_id).int(),
                "image_grid_thw": visual.grid,
                "attention_mask": mask,
            },
        )
        return self.states(embeds, mask, positions), mask

    def with_visual(self, batch: dict[str, torch.Tensor], visual: Visual) -> dict[str, torch.Tensor]:
        """A processor batch (one image per sample) with its pixels replaced by input embeddings
        that carry `visual` in the image-token slots (and, for Qwen2.5-VL, the positions its forward
        would derive): the model's forward without the vision tower."""
        model = unwrap(self.model)
        device = visual.tokens[0].device
        batch = {k: v.to(device) for k, v in batch.items() if k not in ("pixel_values", "pixel_attention_mask")}
        positions = self.family.positions(model, batch)
        out = {k: v for k, v in batch.items() if k in ("attention_mask", "labels")}
        out["inputs_embeds"] = embed_with_visual(model, batch["input_ids"], visual.flat())
        if positions is not None:
            out["position_ids"] = positions
        return out

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


def text_ids(tokenizer, texts: list[str], bos: bool) -> list[list[int]]:
    """The texts' token ids for the representation pass: no special tokens, or BOS first when `bos`
    (align.text_bos; the release's tokenizer adds BOS, and the EOS this module appends)."""
    if bos and tokenizer.bos_token_id is None:
        raise ValueError("align.text_bos is true, but this model's tokenizer has no BOS token (Qwen2.5-VL's has none)")
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [[tokenizer.bos_token_id, *t] for t in ids] if bos else ids


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
