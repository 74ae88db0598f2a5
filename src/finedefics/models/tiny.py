"""Tiny models built from configs with a locally trained tokenizer: an Idefics2 (SigLIP-style encoder,
perceiver connector, Mistral LM), a LLaVA-1.5 and a Qwen2.5-VL. They load with the Auto classes like
any hub checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    GenerationConfig,
    Idefics2Config,
    Idefics2ForConditionalGeneration,
    Idefics2Processor,
    MistralConfig,
    PreTrainedTokenizerFast,
)
from transformers.models.idefics2.image_processing_idefics2 import Idefics2ImageProcessor

from finedefics.config import TinyMLLMConfig
from finedefics.models.tokenizer import CHAT_TEMPLATE, END_OF_UTTERANCE, IMAGE


@dataclass(frozen=True)
class TinySizes:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vision_hidden: int = 64
    vision_layers: int = 2
    patch: int = 8
    image_size: int = 64
    latents: int = 16
    max_positions: int = 512

    @classmethod
    def from_config(cls, cfg: TinyMLLMConfig, image_size: int) -> TinySizes:
        """The sizes `bootstrap.mllm` asks for, on images of `image_size`."""
        names = ("hidden", "layers", "heads", "kv_heads", "vision_hidden", "vision_layers", "patch", "latents")
        return cls(image_size=image_size, **{n: getattr(cfg, n) for n in names})


def text_config(tok: PreTrainedTokenizerFast, s: TinySizes) -> MistralConfig:
    """The language model of the tiny models: a Mistral (the tiny Qwen2.5-VL takes its sizes)."""
    return MistralConfig(
        vocab_size=len(tok),
        hidden_size=s.hidden,
        intermediate_size=2 * s.hidden,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        max_position_embeddings=s.max_positions,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )


def generation_config(tok: PreTrainedTokenizerFast) -> GenerationConfig:
    """Greedy decoding that stops at EOS or at the end of an utterance."""
    stop = [tok.eos_token_id, tok.convert_tokens_to_ids(END_OF_UTTERANCE)]
    return GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=stop, pad_token_id=tok.pad_token_id, do_sample=False
    )


def build_idefics2(
    tok: PreTrainedTokenizerFast, sizes: TinySizes, seed: int = 0
) -> tuple[Idefics2ForConditionalGeneration, Idefics2Processor]:
    """A randomly initialised tiny Idefics2 and its processor (no image splitting)."""
    text = text_config(tok, sizes)
    config = Idefics2Config(
        vision_config=dict(
            hidden_size=sizes.vision_hidden,
            intermediate_size=2 * sizes.vision_hidden,
            num_hidden_layers=sizes.vision_layers,
            num_attention_heads=sizes.heads,
            image_size=sizes.image_size,
            patch_size=sizes.patch,
        ),
        perceiver_config=dict(
            hidden_act="silu",
            hidden_size=sizes.hidden,
            rms_norm_eps=1e-6,
            resampler_n_latents=sizes.latents,
            resampler_depth=1,
            resampler_n_heads=sizes.heads,
            resampler_head_dim=sizes.hidden // sizes.heads,
            num_key_value_heads=sizes.kv_heads,
        ),
        text_config=text.to_dict(),
        image_token_id=tok.convert_tokens_to_ids(IMAGE),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Idefics2ForConditionalGeneration(config)
    # Idefics2's connector is meant to be trained from a pre-trained start. From scratch, two of its
    # initial values drown the image: the perceiver's latent queries are all ones (identical queries
    # whose residual dwarfs what they read), and its output norm puts visual tokens at ~50x the scale
    # of token embeddings (std 0.02). Small random latents and an output scale matching the token
    # embeddings let the images through.
    resampler = model.model.connector.perceiver_resampler
    with torch.no_grad():
        resampler.latents.normal_(0.0, 0.02)
        resampler.norm.weight.fill_(config.text_config.initializer_range)
    model.generation_config = generation_config(tok)
    image_processor = Idefics2ImageProcessor(
        do_image_splitting=False, size={"longest_edge": sizes.image_size, "shortest_edge": sizes.image_size}
    )
    processor = Idefics2Processor(
        image_processor=image_processor, tokenizer=tok, image_seq_len=sizes.latents, chat_template=CHAT_TEMPLATE
    )
    return model, processor


def build_llava(tok: PreTrainedTokenizerFast, sizes: TinySizes, seed: int = 0):
    """A randomly initialised tiny LLaVA-1.5 (CLIP-style vision tower, MLP projector, Mistral LM)."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    vision = CLIPVisionConfig(
        hidden_size=sizes.vision_hidden,
        intermediate_size=2 * sizes.vision_hidden,
        num_hidden_layers=max(2, sizes.vision_layers),
        num_attention_heads=sizes.heads,
        image_size=sizes.image_size,
        patch_size=sizes.patch,
        projection_dim=sizes.vision_hidden,
    )
    config = LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text_config(tok, sizes).to_dict(),
        image_token_id=tok.convert_tokens_to_ids(IMAGE),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config = generation_config(tok)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": sizes.image_size}, crop_size={"height": sizes.image_size, "width": sizes.image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=sizes.patch,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    return model, processor


def _mrope_section(head_dim: int) -> list[int]:
    """Qwen2.5-VL's split of a head's rotary frequencies over (time, height, width); the hub's
    [16, 24, 24] for 128-wide heads, scaled to `head_dim`."""
    half = head_dim // 2
    spatial = (half - half // 4) // 2
    return [half - 2 * spatial, spatial, spatial]


def build_qwen2_5_vl(tok: PreTrainedTokenizerFast, sizes: TinySizes, pixels: tuple[int, int], seed: int = 0):
    """A randomly initialised tiny Qwen2.5-VL (windowed ViT, 2x2 patch merger, Qwen2 LM with
    multimodal rotary positions) and its processor, resizing images to `pixels` = (min, max) pixels."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    from finedefics.models.tokenizer import QWEN_IMAGE, QWEN_VIDEO, QWEN_VISION_END, QWEN_VISION_START

    ids = tok.convert_tokens_to_ids
    text = text_config(tok, sizes).to_dict()
    text.update(
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": _mrope_section(sizes.hidden // sizes.heads),
        },
    )
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(
            depth=sizes.vision_layers,
            hidden_size=sizes.vision_hidden,
            intermediate_size=2 * sizes.vision_hidden,
            num_heads=sizes.heads,
            patch_size=sizes.patch,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=sizes.image_size,  # one attention window per image at the world's size
            fullatt_block_indexes=[sizes.vision_layers - 1],
            out_hidden_size=sizes.hidden,
        ),
        image_token_id=ids(QWEN_IMAGE),
        video_token_id=ids(QWEN_VIDEO),
        vision_start_token_id=ids(QWEN_VISION_START),
        vision_end_token_id=ids(QWEN_VISION_END),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[tok.eos_token_id, tok.pad_token_id], pad_token_id=tok.pad_token_id, do_sample=False
    )
    image_processor = Qwen2VLImageProcessor(
        min_pixels=pixels[0], max_pixels=pixels[1], patch_size=sizes.patch, merge_size=2, temporal_patch_size=2
    )
    video_processor = Qwen2VLVideoProcessor(patch_size=sizes.patch, merge_size=2, temporal_patch_size=2)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tok, video_processor=video_processor, chat_template=tok.chat_template
    )
    return model, processor
