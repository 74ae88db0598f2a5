"""CLIP for hard-negative mining: a tiny open_clip model trained on the world, or a published one.

`model.clip` is `tiny` (the model `bootstrap` trains and saves under models/clip as an open_clip
local-dir checkpoint), `<architecture>:<pretrained tag or weights file>` (e.g.
`ViT-L-14:laion2b_s32b_b82k`), or `local-dir:<folder>`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
from tqdm import tqdm

from finedefics.config import TinyCLIPConfig
from finedefics.io import load_image

TINY_NAME = "finedefics-tiny-clip"
TINY_DIR = Path("models/clip")


def train_prompt(name: str, super_category: str) -> str:
    return f"a photo of a {name}, a type of {super_category}."


def class_prompt(name: str, template: str) -> str:
    """The text side of mining and of the world's option sets: `template` (model.clip_prompt) with
    the class name; FOCI generated its options with "an image of a {name}"."""
    return template.format(name=name)


def tiny_model_config(cfg: TinyCLIPConfig, image_size: int) -> dict:
    return {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {
            "image_size": image_size,
            "layers": cfg.layers,
            "width": cfg.width,
            "patch_size": cfg.patch,
            "head_width": 32,
        },
        "text_cfg": {
            "context_length": 32,
            "vocab_size": 49408,
            "width": cfg.width,
            "heads": cfg.width // 32,
            "layers": cfg.layers,
        },
    }


def register_tiny(cfg: TinyCLIPConfig, image_size: int, folder: Path) -> None:
    """Register the tiny architecture with open_clip under TINY_NAME (a config file in `folder`)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{TINY_NAME}.json").write_text(json.dumps(tiny_model_config(cfg, image_size), indent=2))
    open_clip.add_model_config(folder / f"{TINY_NAME}.json")


def untrained_tiny(cfg: TinyCLIPConfig, image_size: int) -> tuple[open_clip.CLIP, Callable]:
    """A randomly initialised tiny CLIP and its inference transform, from open_clip's model class: its
    factory would build the same weights, and log "No pretrained weights loaded" for a model to train."""
    model = open_clip.CLIP(**tiny_model_config(cfg, image_size), output_dict=True)
    return model, open_clip.image_transform(model.visual.image_size, is_train=False)


@dataclass
class Clip:
    model: torch.nn.Module
    preprocess: object
    tokenizer: object

    @classmethod
    def load(cls, spec: str, tiny_dir: Path = TINY_DIR) -> Clip:
        if spec == "tiny":
            spec = f"local-dir:{tiny_dir}"
        if spec.startswith(("local-dir:", "hf-hub:")):
            model, _, preprocess = open_clip.create_model_and_transforms(spec)
            tokenizer = open_clip.get_tokenizer(spec)
        else:
            name, pretrained = spec.split(":", 1)
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
            tokenizer = open_clip.get_tokenizer(name)
        model.eval()
        return cls(model, preprocess, tokenizer)

    @torch.no_grad()
    def embed_images(self, paths: list[str], batch_size: int = 128, desc: str = "embed images") -> np.ndarray:
        """L2-normalised image embeddings, one row per path."""
        out = []
        for start in tqdm(range(0, len(paths), batch_size), desc=desc, unit="batch"):
            pixels = torch.stack([self.preprocess(load_image(p)) for p in paths[start : start + batch_size]])
            out.append(torch.nn.functional.normalize(self.model.encode_image(pixels), dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    @torch.no_grad()
    def embed_texts(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[start : start + batch_size])
            out.append(torch.nn.functional.normalize(self.model.encode_text(tokens), dim=-1).numpy())
        return np.concatenate(out)

    @property
    def dim(self) -> int:
        return int(self.model.text_projection.shape[1]) if hasattr(self.model, "text_projection") else 0


def train_tiny(
    cfg: TinyCLIPConfig,
    image_size: int,
    images: list[str],
    texts: list[str],
    seed: int,
    folder: Path,
    log=None,
) -> Clip:
    """Train the tiny open_clip model with open_clip's contrastive loss on (image, text) pairs:
    AdamW at a constant rate, the logit scale clamped to [0, log 100] as open_clip trains it."""
    from finedefics.training import FitConfig, fit, plan  # here: `embed` and `mine` only read a CLIP

    register_tiny(cfg, image_size, folder)
    torch.manual_seed(seed)
    model, preprocess = untrained_tiny(cfg, image_size)
    tokenizer = open_clip.get_tokenizer(TINY_NAME)
    pixels = torch.stack([preprocess(load_image(p)) for p in images])
    tokens = tokenizer(texts)
    loss_fn = open_clip.ClipLoss()

    def step(idx: np.ndarray) -> tuple[torch.Tensor, dict[str, float]]:
        out = model(pixels[idx], tokens[idx])
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        return loss, {"loss": loss.item()}

    def clamp() -> None:
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))

    batch = min(cfg.batch_size, len(images))
    fit_cfg = FitConfig(
        lr=cfg.lr,
        warmup_steps=0,
        batch_size=batch,
        per_device_batch_size=batch,
        checkpoint_every=0,
        schedule="constant",
        weight_decay=0.1,
        max_grad_norm=None,
    )
    batches = plan(len(images), batch, cfg.epochs, seed)
    fit([model], batches, step, fit_cfg, resume=None, desc="train CLIP", log=log, after_step=clamp)
    save_local_dir(model, cfg, image_size, folder)
    return Clip(model, preprocess, tokenizer)


def save_local_dir(model: torch.nn.Module, cfg: TinyCLIPConfig, image_size: int, folder: Path) -> None:
    """An open_clip `local-dir:` checkpoint: open_clip_config.json + open_clip_model.safetensors."""
    from safetensors.torch import save_file

    config = {"model_cfg": tiny_model_config(cfg, image_size), "preprocess_cfg": {}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))


def zero_shot_accuracy(clip: Clip, paths: list[str], labels: list[int], names: list[str], template: str) -> float:
    images = clip.embed_images(paths, desc="zero-shot")
    texts = clip.embed_texts([class_prompt(n, template) for n in names])
    return float(np.mean((images @ texts.T).argmax(1) == np.asarray(labels)))
