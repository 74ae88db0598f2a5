"""A loaded multimodal model with its processor: chat prompts, batched generation, visual tokens.

The families of `models.families` expose their visual tokens (the connector's output). Where the
LLM takes them with its default positions (Idefics2, LLaVA-1.5), one image is encoded once and
shared by a batch of questions; Qwen2.5-VL (3D positions) and other image-text-to-text models
(BLIP-2, ...) answer a plain batch with the image repeated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from finedefics.models.families import FAMILIES


@dataclass(frozen=True)
class ImageSettings:
    """How a processor sizes images, set explicitly so the visual tokens per image are known:
    Idefics2's image splitting (the hub's idefics2-8b splits each image into 4 crops + the whole:
    320 visual tokens instead of 64) and Qwen2.5-VL's pixel range (model.qwen_pixels: each image is
    resized to between min and max pixels, one visual token per 28x28 at paper scale)."""

    image_splitting: bool = False
    pixels: tuple[int, int] | None = None  # (min, max); None keeps the processor's own

    @classmethod
    def from_config(cls, cfg) -> ImageSettings:
        """The settings of a `ModelConfig`."""
        return cls(cfg.image_splitting, (cfg.qwen_pixels.min, cfg.qwen_pixels.max))

    def apply(self, processor):
        images = processor.image_processor
        if hasattr(images, "do_image_splitting"):
            images.do_image_splitting = self.image_splitting
        if self.pixels is not None and hasattr(images, "merge_size"):  # Qwen2-VL's image processors
            images.size = {"shortest_edge": self.pixels[0], "longest_edge": self.pixels[1]}
        return processor


def load_processor(path: str | Path, images: ImageSettings = ImageSettings()):
    """The processor saved with a model, its image sizing set (`ImageSettings`)."""
    return images.apply(AutoProcessor.from_pretrained(str(path)))


def embed_with_visual(model, input_ids: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """The input embeddings of `input_ids` (a transformers model, not PEFT-wrapped) with `visual`, the
    connector's output in order, in the image-token slots: the model's input without its vision tower."""
    embeds = model.get_input_embeddings()(input_ids)
    slots = (input_ids == model.config.image_token_id).unsqueeze(-1)
    return embeds.masked_scatter(slots, visual.to(embeds.dtype))


@dataclass
class MLLM:
    model: torch.nn.Module
    processor: object

    @classmethod
    def load(cls, path: str | Path, images: ImageSettings = ImageSettings(), dtype: torch.dtype | None = None) -> MLLM:
        model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype)
        model.eval()
        return cls(model, load_processor(path, images))

    @property
    def family(self) -> str:
        return self.model.config.model_type

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def turn_end(self) -> str:
        """What closes an assistant turn in this model's chat format."""
        end = "<end_of_utterance>"
        return end if end in self.tokenizer.get_vocab() else self.tokenizer.eos_token

    def prompt(self, text: str, image: bool = True) -> str:
        """`text` as one user turn (with an image slot first), ready for the assistant's answer."""
        if getattr(self.processor, "chat_template", None) is None:
            return text  # BLIP-2 style: the raw "Question: ... Answer:" prompt
        content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": text}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def visual_token_count(self, image: Image.Image) -> int:
        """How many image-token slots the processor gives `image` in a prompt."""
        ids = self.processor(text=[self.prompt("")], images=[[image]], return_tensors="pt")["input_ids"]
        return int((ids == self.model.config.image_token_id).sum())

    @torch.no_grad()
    def visual_tokens(self, images: list[Image.Image]) -> list[torch.Tensor]:
        """The connector's output for each image: a (tokens, hidden) tensor per image."""
        if self.family not in FAMILIES:
            raise NotImplementedError(f"visual tokens of {self.family} models")
        pixels = self.processor.image_processor([[im] for im in images], return_tensors="pt")  # one image per sample
        return FAMILIES[self.family].visual_tokens(self.model, pixels)

    def _decode(self, ids: torch.Tensor) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    @torch.no_grad()
    def generate(self, prompts: list[str], images: list[Image.Image] | None, max_new_tokens: int) -> list[str]:
        """Greedy answers to `prompts` (one image each, or none), in one left-padded batch."""
        self.tokenizer.padding_side = "left"
        kwargs = {"images": [[im] for im in images]} if images else {}
        inputs = self.processor(text=prompts, return_tensors="pt", padding=True, **kwargs)
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        prompt = inputs["input_ids"]
        if out.shape[1] >= prompt.shape[1] and torch.equal(out[:, : prompt.shape[1]], prompt):
            out = out[:, prompt.shape[1] :]  # decoder-only models echo the prompt; encoder-decoders do not
        return self._decode(out)

    @property
    def answers_in_one_pass(self) -> bool:
        """Whether `one_token_answers` can stand in for greedy generation: a family whose visual tokens can
        be shared (default positions) and a generation config that only takes the arg-max."""
        g = self.model.generation_config
        plain = (
            g.repetition_penalty in (None, 1.0)
            and not (g.bad_words_ids or g.suppress_tokens or g.begin_suppress_tokens or g.forced_bos_token_id)
            and not (g.min_new_tokens or (g.min_length or 0) > 0)
        )
        return plain and self.family in FAMILIES and not FAMILIES[self.family].rotary_3d

    @torch.no_grad()
    def one_token_answers(self, prompts: list[str], images: list[Image.Image], image_of: list[int]) -> list[str | None]:
        """What greedy generation answers to each prompt (about `images[image_of[i]]`, each image
        encoded once) where that answer is one token and then the end of the turn (a letter, in
        multiple choice): the arg-max of one left-padded forward pass and of one cached step after
        it, each ahead of the runner-up by more than rounding (`MARGIN`). None where it is not
        (the caller generates): no answer differs from `generate`'s, whatever the float rounding."""
        self.tokenizer.padding_side = "left"
        inputs = self.processor(text=prompts, images=[[images[j]] for j in image_of], return_tensors="pt", padding=True)
        features = self.visual_tokens(images)
        mask = inputs["attention_mask"]
        embeds = embed_with_visual(self.model, inputs["input_ids"], torch.cat([features[j] for j in image_of]))
        positions = (mask.cumsum(1) - 1).masked_fill(mask == 0, 1)  # what `generate` gives left-padded rows
        out = self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
        first, sure = _argmax(out.logits[:, -1])
        step = self.model(
            input_ids=first[:, None],
            attention_mask=torch.cat([mask, torch.ones_like(mask[:, :1])], 1),
            position_ids=positions[:, -1:] + 1,
            cache=out.past_key_values,
            use_cache=True,
        )
        second, sure_next = _argmax(step.logits[:, -1])
        ends = self.model.generation_config.eos_token_id
        ends = set(ends if isinstance(ends, list) else [ends])
        stops = torch.tensor([int(t) in ends for t in first])  # generation ends at the first token itself
        ok = sure & (stops | (sure_next & torch.tensor([int(t) in ends for t in second])))
        tokens = [[f] if stop else [f, s] for f, s, stop in zip(first.tolist(), second.tolist(), stops.tolist())]
        return [self._decode(torch.tensor([t]))[0] if k else None for t, k in zip(tokens, ok.tolist())]

    @torch.no_grad()
    def generate_shared_image(self, prompts: list[str], image: Image.Image, max_new_tokens: int) -> list[str]:
        """Answers to several questions about one image, encoding the image once where possible."""
        if self.family not in FAMILIES or FAMILIES[self.family].rotary_3d:
            return self.generate(prompts, [image] * len(prompts), max_new_tokens)
        self.tokenizer.padding_side = "left"
        inputs = self.processor(text=prompts, images=[[image]] * len(prompts), return_tensors="pt", padding=True)
        features = self.visual_tokens([image])[0]
        embeds = embed_with_visual(self.model, inputs["input_ids"], features.repeat(len(prompts), 1))
        out = self.model.generate(
            inputs_embeds=embeds,
            attention_mask=inputs["attention_mask"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
        return self._decode(out)


MARGIN = 1e-3  # logits closer than this (plus 8 rounding steps of their dtype) count as a tie: left to `generate`


def _argmax(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's arg-max and whether it leads the runner-up by more than float rounding could move it."""
    top = logits.float().topk(2, dim=-1)
    tie = MARGIN + 8 * torch.finfo(logits.dtype).eps * top.values[:, 0].abs()
    return top.indices[:, 0], top.values[:, 0] - top.values[:, 1] > tie
