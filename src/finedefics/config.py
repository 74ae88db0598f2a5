"""The params schema: `params.yaml` is validated against it before a stage does any work.

Every stage calls `load_params()` (or `load_or_exit()` from its entry file); no other
module reads `params.yaml`. Unknown keys, wrong types and unknown choices are errors that
name the key, the bad value and what is allowed, in one line.

The defaults here are the values of the committed `params.yaml` (the embedded default, a test
checks `Params() == load_params("params.yaml")`); the files in configs/ are overlays holding only
the values where they differ (`extends:` names another overlay to start from). Library functions
take these values from the caller and carry no competing default of their own.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class Schema(BaseModel):
    """Base for every params section: unknown keys are errors, and so are infinite and NaN numbers
    (YAML's `.inf` and `.nan`), in every float field of every section."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class WorldConfig(Schema):
    """Sizes of the synthetic FGVR world (per super-category)."""

    categories: int = Field(12, ge=2)
    cluster_size: int = Field(3, ge=1)
    train_per_class: int = Field(20, ge=1)
    test_per_class: int = Field(50, ge=1)  # 50: the 95% CI of the two-dataset average is within +/-3 points
    image_size: int = Field(64, ge=32, le=512)
    deviation_rate: float = Field(0.1, ge=0.0, le=1.0)
    sibling_distance: int = Field(2, ge=1)  # siblings differ in 1 to this many attributes (1: hardest)
    test_shift: float = Field(0.0, ge=0.0, le=1.0)  # test images' tilt and background beyond the train images'
    unseen: int = Field(0, ge=0)  # categories whose images training never shows (test only)

    @field_validator("cluster_size")
    @classmethod
    def _fits(cls, v: int, info: Any) -> int:
        categories = info.data.get("categories")
        if categories is not None and v > categories:
            raise ValueError(f"must be at most categories ({categories})")
        return v

    @field_validator("unseen")
    @classmethod
    def _leaves_seen(cls, v: int, info: Any) -> int:
        categories = info.data.get("categories")
        if categories is not None and v > categories - 4:
            raise ValueError(f"must leave at least 4 seen categories of {categories}")
        return v


class RealConfig(Schema):
    """Real datasets (data/raw/<name>)."""

    per_class: int | None = Field(None, ge=1)  # keep this many train and test images per class (a rehearsal); None: all


class BackendConfig(Schema):
    """Where a model answers: `hf` loads `model` (hub id or local path) with transformers; `openai`
    posts to an OpenAI-compatible chat endpoint at `base_url` with the key from `api_key_env`."""

    model: str | None = None
    base_url: str = "http://localhost:8000/v1"
    api_key_env: str = "OPENAI_API_KEY"
    max_new_tokens: int = Field(64, ge=1)
    retries: int = Field(3, ge=0)
    timeout_s: float = Field(120.0, gt=0)


class DiscoverConfig(BackendConfig):
    """Attribute discovery (eq. 2). `static` reads the keys from `file`, else from the world spec or
    FineR's list for the super-category."""

    backend: Literal["static", "hf", "openai"] = "static"
    file: str | None = None
    max_new_tokens: int = Field(256, ge=1)


class ExtractConfig(BackendConfig):
    """Visual attribute extraction by VQA (eq. 3). `oracle` answers with the ground truth."""

    backend: Literal["oracle", "hf", "openai"] = "oracle"
    shard_size: int = Field(32, ge=1)  # images per resumable shard
    concurrency: int = Field(8, ge=1)  # openai: requests in flight
    max_failure_rate: float = Field(0.05, ge=0.0, le=1.0)
    max_new_tokens: int = Field(24, ge=1)


class SummarizeConfig(BackendConfig):
    """Attribute description summarisation (eq. 4). `template` writes deterministic sentences."""

    backend: Literal["template", "hf", "openai"] = "template"
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(160, ge=1)


class AttributesConfig(Schema):
    """Attribute description construction and its ablations (Tables 5, 6c-e).

    `types` keeps the keys of these types (Table 5); keys typed `other` and the general
    description are always kept."""

    types: list[Literal["color", "shape", "texture", "size"]] = ["color", "shape", "texture", "size"]
    quality: Literal["complete", "noisy"] = "complete"
    noise_rate: float = Field(0.3, ge=0.0, le=1.0)  # share of values replaced when quality is noisy
    level: Literal["long", "short"] = "long"
    construction: Literal["per-sample", "tag-based", "ground-truth"] = "per-sample"
    discover: DiscoverConfig = DiscoverConfig()
    extract: ExtractConfig = ExtractConfig()
    summarize: SummarizeConfig = SummarizeConfig()


class AlignConfig(Schema):
    """Attribute augmented alignment (Tables 3b, 3c, 6b)."""

    objective: Literal["obj-att-cat", "obj-cat", "none"] = "obj-att-cat"
    paradigm: Literal["two-stage", "one-stage", "stage2-only", "stage1-only"] = "two-stage"
    mask_same_class: bool = True  # leave other images of the positive's class out of the denominators
    # eq. 7: against the name itself, as written (unbounded below), or as the release computes it
    ccc: Literal["bounded", "logsumexp", "release"] = "bounded"
    negatives_scope: Literal["own", "batch"] = "own"  # each sample's K negatives, or the micro-batch's B*K (release)
    temperatures: Literal["one", "two"] = "one"  # one for every term, or OA+CCC and AC apart (release)
    learn_temperature: bool = True  # the release's stay at their initial value (PEFT freezes them)
    temperature: float = Field(0.07, ge=0.001, le=0.5)  # initial value, clamped to [0.001, 0.5]
    contrastive_batch: Literal["global", "device"] = "global"  # gathered across processes, or per device (release)
    text_bos: bool = False  # BOS before each text of the representation pass (release)


class InstructionsConfig(Schema):
    """Stage II instruction data (Table 3a)."""

    stage2: Literal["open+closed", "open"] = "open+closed"


class LoraConfig(Schema):
    r: int = Field(16, ge=1)  # paper: 8
    alpha: int = Field(32, ge=1)  # paper: 8
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # release: 0.2; CPU: masks cost 1/3 of a step
    init: Literal["default", "gaussian"] = "default"  # PEFT's init_lora_weights (release: gaussian)
    modules: list[Literal["text_model", "connector", "vision_model"]] = ["text_model", "connector"]


class PixelRange(Schema):
    """Qwen2.5-VL's processor resizes each image to between `min` and `max` pixels, aspect kept, sides
    multiples of patch x 2: one visual token per 28x28 pixels at paper scale, per 16x16 on the world's
    tiny base. Square images then all get the same number of visual tokens; other shapes vary."""

    min: int = Field(4096, ge=256)
    max: int = Field(4096, ge=256)

    @field_validator("max")
    @classmethod
    def _at_least_min(cls, v: int, info: Any) -> int:
        if v < info.data.get("min", 0):
            raise ValueError(f"must be at least min ({info.data['min']})")
        return v


class ModelConfig(Schema):
    """Base MLLM, CLIP for mining, the CLIP baseline, and how they are fine-tuned (Table 4)."""

    # "tiny" / "tiny-llava" / "tiny-qwen2.5-vl" (built by `bootstrap`: Idefics2 / LLaVA-1.5 / Qwen2.5-VL),
    # or an Idefics2 / LLaVA-1.5 / Qwen2.5-VL hub id or local path
    base: str = "tiny"
    clip: str = "tiny"  # "tiny" (built by `bootstrap`) or "<open_clip name>:<pretrained tag>"
    # evaluate@clip's second CLIP, one that did not pick the options: "tiny" (bootstrap trains another
    # tiny CLIP with seed + 1) or "<open_clip name>:<pretrained tag>" (paper scale: a SigLIP)
    clip_baseline: str = "tiny"
    finetune: Literal["qlora", "lora", "full"] = "lora"  # paper: qlora (4-bit needs bitsandbytes' kernels)
    lora: LoraConfig = LoraConfig()
    prepare_kbit: bool = True  # qlora: peft's prepare_model_for_kbit_training (the release does not call it)
    merge_into: Literal["dequantised", "original"] = "dequantised"  # qlora: the base the adapters merge into
    image_splitting: bool = False  # Idefics2's processor: 5 crops per image (the hub's default) or one image
    qwen_pixels: PixelRange = PixelRange()  # Qwen2.5-VL's processor: fixed so the visual tokens per image are known
    clip_prompt: str = "a photo of a {name}."  # CLIP's text for a class (mining; the world's options)

    @field_validator("base", "clip", "clip_baseline")
    @classmethod
    def _not_blank(cls, v: str, info: Any) -> str:
        if not v.strip():
            clip = "<architecture>:<pretrained tag>"
            wanted = {"base": "a hub id (org/name) or a local folder", "clip": clip, "clip_baseline": clip}
            raise ValueError(f"must not be empty: tiny, {wanted[info.field_name]}")
        return v

    @field_validator("clip_prompt")
    @classmethod
    def _has_name(cls, v: str) -> str:
        try:
            v.format(name="x")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"must be a template with {{name}} and no other field ({err})") from None
        if "{name}" not in v:
            raise ValueError("must contain {name}")
        return v


class StageTrainConfig(Schema):
    epochs: float = Field(10.0, gt=0)
    lr: float = Field(5e-4, gt=0)
    warmup_steps: int = Field(10, ge=0)
    batch_size: int = Field(32, ge=1)  # global: per-device batch x processes x accumulation
    per_device_batch_size: int | None = Field(None, ge=1)  # None: train.per_device_batch_size


class TrainConfig(Schema):
    seed: int = 0  # initialisation, data order and dropout of both stages (`seed` fixes the world and data)
    # the world's regime (reports/regimes.md); paper scale: 1 epoch each (configs/paper.yaml)
    stage1: StageTrainConfig = StageTrainConfig(epochs=3, lr=2e-3)
    stage2: StageTrainConfig = StageTrainConfig(epochs=6, lr=2e-3, batch_size=16)
    num_processes: int = Field(1, ge=1)  # > 1: the training stages re-launch through `accelerate launch`
    per_device_batch_size: int = Field(16, ge=1)
    gradient_checkpointing: bool = False
    generation_loss: Literal["answer", "sequence"] = "answer"  # labels: the answer, or every token (release)
    weight_decay: float = Field(0.0, ge=0.0)
    mixed_precision: Literal["fp32", "fp16", "bf16"] = "fp32"  # autocast of the training steps (release: fp16)
    checkpoint_every: int = Field(20, ge=1)  # optimizer steps between resumable checkpoints


class EvaluateConfig(Schema):
    """FOCI multiple choice: each test image is shown in `permutations` option orders, each seeded."""

    permutations: int = Field(3, ge=1)
    dtype: Literal["float32", "bfloat16"] = "float32"  # the weights while decoding (FOCI as run: bfloat16)
    inner_user_prefix: bool = False  # FOCI's extra "User: " before an Idefics question (as the release ran)
    max_new_tokens: int = Field(5, ge=1)  # the letter is the answer's first character (FOCI: 10; the release: 1000)


class TinyMLLMConfig(Schema):
    """The tiny Idefics2 `bootstrap` builds and pre-trains for the world (model.base: tiny)."""

    vocab_size: int = Field(1024, ge=300)
    hidden: int = Field(128, ge=16)
    layers: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    kv_heads: int = Field(2, ge=1)
    vision_hidden: int = Field(64, ge=16)  # multiples of 64 keep bitsandbytes 4-bit CPU kernels happy
    vision_layers: int = Field(3, ge=1)
    patch: int = Field(8, ge=2)
    latents: int = Field(16, ge=1)  # visual tokens per image (perceiver resampler)
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(5e-4, gt=0)  # the vision tower and connector learn from scratch: 1e-3 already diverges


class TinyCLIPConfig(Schema):
    """The tiny open_clip model `bootstrap` trains for mining (model.clip: tiny)."""

    embed_dim: int = Field(64, ge=8)
    width: int = Field(64, ge=16)
    layers: int = Field(2, ge=1)
    patch: int = Field(8, ge=2)
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0)


class BootstrapConfig(Schema):
    mllm: TinyMLLMConfig = TinyMLLMConfig()
    clip: TinyCLIPConfig = TinyCLIPConfig()


class TrackingConfig(Schema):
    experiment: str = Field("finedefics", min_length=1)


class Params(Schema):
    """The whole of `params.yaml`."""

    seed: int = 0
    datasets: dict[str, str] = Field(
        default_factory=lambda: {"toy-bird": "world/toy-bird.yaml", "toy-flower": "world/toy-flower.yaml"}
    )
    world: WorldConfig = WorldConfig()
    real: RealConfig = RealConfig()
    negatives: Literal["hard", "simple", "none"] = "hard"
    attributes: AttributesConfig = AttributesConfig()
    align: AlignConfig = AlignConfig()
    instructions: InstructionsConfig = InstructionsConfig()
    model: ModelConfig = ModelConfig()
    bootstrap: BootstrapConfig = BootstrapConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("datasets")
    @classmethod
    def _names(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("must name at least one dataset")
        for name in v:
            if not name or "/" in name or name.startswith("."):
                raise ValueError(f"dataset name {name!r} must be a plain folder name")
        return v

    def flat(self) -> dict[str, Any]:
        """Params as dotted keys, for logging."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                out[prefix] = value

        walk("", self.model_dump())
        return out


class ConfigError(ValueError):
    """A params file that does not fit the schema; the message is one line."""


def _allowed(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names allowed at the parent of `loc` (for unknown-key errors)."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return list(model.model_fields)


def _one_line(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = tuple(first["loc"])
    key = ".".join(str(p) for p in loc)
    value = first.get("input")
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    kind = first["type"]
    if kind == "extra_forbidden":
        allowed = ", ".join(_allowed(Params, loc))
        return f"{source}: unknown key '{key}' (value {value!r}); allowed keys here: {allowed}{more}"
    if kind == "literal_error":
        return f"{source}: {key} = {value!r} is not allowed; allowed values: {first['ctx']['expected']}{more}"
    if kind == "missing":
        return f"{source}: {key} is missing{more}"
    return f"{source}: {key} = {value!r}: {first['msg']}{more}"


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a loaded YAML mapping; raises `ConfigError` with a one-line message."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_one_line(err, source)) from None


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None


def _overlay(base: dict[str, Any], top: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """`top` over `base`: sections of the schema merge key by key; any other value (a list, the
    `datasets` mapping) replaces the base's whole."""
    merged = dict(base)
    for key, value in top.items():
        field = model.model_fields.get(key)
        section = field.annotation if field else None
        if isinstance(section, type) and issubclass(section, BaseModel) and isinstance(value, dict):
            merged[key] = _overlay(merged.get(key) or {}, value, section)
        else:
            merged[key] = value
    return merged


def read_config(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A params file as a mapping, with `extends: <file>` (relative to it) resolved: the file's keys
    over the one it extends. Keys a file leaves out take the schema's defaults when validated."""
    path = Path(path)
    raw = _read_yaml(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    base = raw.pop("extends", None)
    if base is None:
        return raw
    parent = (path.parent / str(base)).resolve()
    if parent in _seen:
        raise ConfigError(f"{path}: extends {base}, which extends it again")
    return _overlay(read_config(parent, (*_seen, path.resolve())), raw, Params)


def load_params(path: str | Path = "params.yaml", assignments: Sequence[str] = ()) -> Params:
    """A params file (or overlay) validated, with `assignments` ("train.stage1.lr=1e-4", values read
    as YAML) set over it."""
    raw = read_config(path)
    for assignment in assignments:
        dotted, sep, value = assignment.partition("=")
        if not sep or not dotted or any(not part for part in dotted.split(".")):
            raise ConfigError(f"{assignment!r}: expected <dotted.key>=<value>, e.g. train.stage1.lr=1e-4")
        *sections, last = dotted.split(".")
        node = raw
        for part in sections:
            if not isinstance(node.get(part, {}), dict):
                raise ConfigError(f"{assignment!r}: {part} is a value, not a section")
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    return parse_params(raw, str(path) + "".join(f" --set {a}" for a in assignments))


def dump_params(params: Params, header: str) -> str:
    """The full params file DVC reads (every key: DVC's params deps name them), under a comment."""
    lines = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return lines + yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False, width=120)


def load_or_exit(path: str | Path = "params.yaml") -> Params:
    """For stage entry files: on a bad params file print one line and exit with code 2."""
    try:
        return load_params(path)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":  # `python -m finedefics.config [params.yaml]`
    load_or_exit(sys.argv[1] if len(sys.argv) > 1 else "params.yaml")
    print("params ok")
