"""The switches between the paper's form, the authors' release's and ours (docs/forms.md): each
release form against a hand computation or the library behaviour it selects, and the three configs. The Stage I loss forms are in test_losses.py, the QLoRA step and the merge target
in test_training.py."""

import dataclasses
import re
import shutil

import pandas as pd
import peft
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from PIL import Image
from test_faults import tiny_fit
from transformers import AutoProcessor
from typer.testing import CliRunner

from finedefics.align.finetune import load_trainable
from finedefics.align.steps import Stage2
from finedefics.align.train import fit_config
from finedefics.cli import app
from finedefics.config import ConfigError, LoraConfig, ModelConfig, Params, load_params, parse_params
from finedefics.models.clip import class_prompt
from finedefics.models.mllm import MLLM, ImageSettings, load_processor
from finedefics.models.representations import Representations, text_ids
from finedefics.models.sft import ChatExample, encode
from finedefics.protocol import foci_user_text, mc_question, query


def flat(path) -> dict:
    return load_params(path).flat()


def test_paper_takes_eq7_as_written_and_ours_differs_from_the_release_in_every_form():
    release, paper = flat(REPO / "configs" / "release.yaml"), flat(REPO / "configs" / "paper.yaml")
    assert (paper["align.ccc"], paper["align.negatives_scope"]) == ("logsumexp", "own")
    assert (release["align.ccc"], release["align.negatives_scope"]) == ("release", "batch")
    forms = ["align.ccc", "align.negatives_scope", "align.temperatures", "align.learn_temperature"]
    forms += ["align.mask_same_class", "align.contrastive_batch", "align.text_bos", "train.generation_loss"]
    forms += ["train.weight_decay", "train.mixed_precision", "model.lora.init", "model.lora.dropout"]
    forms += ["model.prepare_kbit", "model.merge_into", "evaluate.inner_user_prefix"]
    ours = Params().flat()
    same = [k for k in forms if ours[k] == release[k]]
    assert same == []  # ours differs from the release in every form


@pytest.mark.parametrize("config", ["configs/paper.yaml", "configs/release.yaml", "params.yaml"])
def test_check_and_use_config_take_each_of_the_three(tmp_path, config):
    runner = CliRunner()
    assert runner.invoke(app, ["check", str(REPO / config)]).exit_code == 0
    target = tmp_path / "params.yaml"
    result = runner.invoke(app, ["use-config", str(REPO / config), "--params", str(target)])
    assert result.exit_code == 0 and load_params(target) == load_params(REPO / config)


@pytest.mark.parametrize("prompt", ["a photo of a {}", "a photo", "{name} of {kind}", "{name"])
def test_clip_prompt_must_be_a_template_with_name(prompt):
    with pytest.raises(ConfigError, match="model.clip_prompt"):
        parse_params({"model": {"clip_prompt": prompt}})


def test_clip_prompt_fills_the_name():
    assert class_prompt("Sooty Albatross", "an image of a {name}") == "an image of a Sooty Albatross"
    assert class_prompt("Sooty Albatross", Params().model.clip_prompt) == "a photo of a Sooty Albatross."


@pytest.fixture(scope="module")
def hub_like(tiny_models, tmp_path_factory):
    """The tiny Idefics2 with its processor saved as the hub's idefics2-8b ships it: splitting on."""
    folder = tmp_path_factory.mktemp("hub") / "idefics2"
    shutil.copytree(tiny_models["vlm"], folder)
    load_processor(folder, ImageSettings(image_splitting=True)).save_pretrained(folder)
    assert AutoProcessor.from_pretrained(folder).image_processor.do_image_splitting
    return folder


def test_idefics2_processors_load_with_image_splitting_off(hub_like):
    image = Image.new("RGB", (64, 64), "red")
    crops = {}
    for splitting in (False, True):
        processor = load_processor(hub_like, ImageSettings(splitting))
        prompt = MLLM(None, processor).prompt("Which bird?")
        batch = processor(text=[prompt], images=[[image]], return_tensors="pt")
        crops[splitting] = batch["pixel_values"].shape[1]
        tokens = (batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum().item()
        assert tokens == crops[splitting] * processor.image_seq_len  # the prompt's visual tokens follow
    assert crops == {False: 1, True: 5}
    assert MLLM.load(hub_like).processor.image_processor.do_image_splitting is False
    assert load_params(REPO / "configs" / "paper.yaml").model.image_splitting is False
    assert load_params(REPO / "configs" / "release.yaml").model.image_splitting is False


def test_every_processor_is_loaded_through_the_image_settings():
    """Training, merging (the processor saved with the merged model), evaluation, analysis and
    `predict` load processors only through `load_processor` / `MLLM.load`, and the stages pass
    `model.image_splitting` and `model.qwen_pixels` (`ImageSettings.from_config(params.model)`)."""
    sources = {p: p.read_text() for p in [*(REPO / "src").rglob("*.py"), *(REPO / "stages").glob("*.py")]}
    direct = {p.name for p, text in sources.items() if "AutoProcessor.from_pretrained(" in text}
    assert direct == {"mllm.py", "resolve.py"}  # resolve: an offline check that the processor loads
    calls = [
        (p.name, line)
        for p, text in sources.items()
        for line in re.findall(r"(?:MLLM\.load|load_processor)\((.*)\)", text)
        if "def " not in line
    ]
    staged = [(name, args) for name, args in calls if name in {"evaluate.py", "analyze.py", "train.py"}]
    assert len(staged) == 3 and all("ImageSettings.from_config(params.model)" in args for _, args in staged)


def _image(tmp_path, colour="red"):
    path = tmp_path / f"{colour}.png"
    Image.new("RGB", (64, 64), colour).save(path)
    return str(path)


def test_sequence_loss_labels_every_token_and_matches_a_hand_computation(tiny_models, tmp_path):
    mllm = MLLM.load(tiny_models["vlm"])
    rows = pd.DataFrame(
        {
            "question": ["What is the name of the bird in the image?", "Describe this bird in detail."],
            "answer": ["Sooty Albatross", "a small bird with a red crown and a long thin beak"],
            "path": [_image(tmp_path, "red"), _image(tmp_path, "blue")],
        }
    )
    examples = [ChatExample(r.question, r.answer, r.path, whole=True) for r in rows.itertuples()]
    batch = encode(mllm, examples)
    mask = batch["attention_mask"].bool()
    assert torch.equal(batch["labels"][mask], batch["input_ids"][mask])  # prompt, image tokens, answer
    assert (batch["labels"][mask] == mllm.model.config.image_token_id).any()
    answer_only = encode(mllm, [dataclasses.replace(e, whole=False) for e in examples])
    assert (answer_only["labels"] != -100).sum() < mask.sum()
    with torch.no_grad():
        logits = mllm.model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        target, keep = batch["input_ids"][:, 1:], mask[:, 1:]
        hand = F.cross_entropy(logits[:, :-1][keep], target[keep])  # the token mean over the batch
        got, _ = Stage2(mllm, whole_sequence=True).loss(rows)
        ours, _ = Stage2(mllm, whole_sequence=False).loss(rows)
        labels = answer_only["labels"][:, 1:]
        answers = F.cross_entropy(logits[:, :-1][labels != -100], labels[labels != -100])
    assert got.item() == pytest.approx(hand.item(), rel=1e-5)
    assert ours.item() == pytest.approx(answers.item(), rel=1e-5)


def test_text_bos_puts_bos_before_each_text(tiny_models):
    mllm = MLLM.load(tiny_models["vlm"])
    tok = mllm.tokenizer
    plain, with_bos = text_ids(tok, ["Sooty Albatross"], False), text_ids(tok, ["Sooty Albatross"], True)
    assert tok.bos_token_id not in plain[0] and with_bos[0] == [tok.bos_token_id, *plain[0]]
    reader = Representations(mllm.model, tok.eos_token_id)
    with torch.no_grad():
        states, mask = reader.text_states(with_bos)
        # read at the EOS the reader appends after BOS + tokens
        assert mask.sum().item() == len(plain[0]) + 2
        assert torch.equal(reader.encode_texts(with_bos), states[:, len(plain[0]) + 1])
        assert not torch.allclose(reader.encode_texts(with_bos), reader.encode_texts(plain))


def _autocast_seen(mixed_precision: str) -> set:
    seen = set()

    def step(layer, x):
        seen.add((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        loss = layer(x).float().mean()
        return loss, {"loss": loss.item()}

    tiny_fit(step, None, steps=2, mixed_precision=mixed_precision)[1]()
    return seen


def test_mixed_precision_autocasts_the_step():
    assert _autocast_seen("bf16") == {(True, torch.bfloat16)}
    assert _autocast_seen("fp16") == {(True, torch.float16)}
    assert {enabled for enabled, _ in _autocast_seen("fp32")} == {False}


def _weights_after(mixed_precision: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    def step(layer, x):
        loss = layer(x).float().mean()
        return loss, {"loss": loss.item()}

    layer, run = tiny_fit(step, None, steps=steps, mixed_precision=mixed_precision)
    start = layer.weight.detach().clone()
    run()
    return start, layer.weight.detach()


def test_fp16_skips_a_step_whose_scaled_gradients_overflow():
    """Loss scaling as the Trainer's fp16: at the first scale (2^16) the fp16 weight gradient of the
    mean output over x = [[0, 1, 2], [3, 4, 5]] reaches 2^16 * 3.5 > 65504 (inf), so the step is
    skipped, not stopped, and the scale halves until the gradients fit (2^14 * 3.5 < 65504): later
    steps train."""
    start, after_one = _weights_after("fp16", 1)
    assert torch.equal(start, after_one)
    start, after_five = _weights_after("fp16", 5)
    assert not torch.equal(start, after_five) and torch.isfinite(after_five).all()
    start, fp32_one = _weights_after("fp32", 1)
    assert not torch.equal(start, fp32_one)


def test_weight_decay_shrinks_the_weights_as_adamw_by_hand():
    """With zero gradients Adam's step is 0, and AdamW's decoupled decay is w <- w (1 - lr wd)."""

    def step(layer, x):
        loss = (layer.weight * 0).sum()
        return loss, {"loss": loss.item()}

    layer, run = tiny_fit(step, None, steps=3, weight_decay=0.01)
    start = layer.weight.detach().clone()
    run()
    assert torch.allclose(layer.weight.detach(), start * (1 - 0.1 * 0.01) ** 3, atol=1e-7)
    params = Params().model_copy(update={"train": Params().train.model_copy(update={"weight_decay": 0.01})})
    assert fit_config(params, params.train.stage1).weight_decay == 0.01


def test_per_device_batch_per_stage():
    release = load_params(REPO / "configs" / "release.yaml")
    assert fit_config(release, release.train.stage1).per_device_batch_size == 2
    assert fit_config(release, release.train.stage2).per_device_batch_size == 8
    ours = Params()
    assert fit_config(ours, ours.train.stage1).per_device_batch_size == ours.train.per_device_batch_size


@pytest.mark.parametrize("init", ["default", "gaussian"])
def test_lora_init_and_dropout(tiny_models, init):
    """PEFT's gaussian init draws A from N(0, 1/r); its default is Kaiming-uniform (std
    1/sqrt(3 fan_in)). B starts at zero in both, so the model starts as the base."""
    r = 4
    cfg = ModelConfig(finetune="lora", lora=LoraConfig(r=r, alpha=8, dropout=0.2, init=init))
    model = load_trainable(str(tiny_models["vlm"]), cfg, False)
    dropouts = {m.p for n, m in model.named_modules() if n.endswith("lora_dropout.default")}
    assert dropouts == {0.2}  # model.lora.dropout (the release: 0.2)
    a = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "lora_A" in n])
    b = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "lora_B" in n])
    assert b.abs().max().item() == 0
    if init == "gaussian":
        assert a.std().item() == pytest.approx(1 / r, rel=0.1)
    else:
        assert a.std().item() < 0.5 / r


@pytest.mark.parametrize("prepare", [True, False])
def test_prepare_kbit_is_called_only_when_asked(tiny_models, monkeypatch, prepare):
    calls = []
    real = peft.prepare_model_for_kbit_training

    def spy(model, **kwargs):
        calls.append(kwargs)
        return real(model, **kwargs)

    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", spy)
    cfg = ModelConfig(finetune="qlora", prepare_kbit=prepare, lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    model = load_trainable(str(tiny_models["vlm"]), cfg, False)
    assert len(calls) == int(prepare)
    assert any(p.requires_grad for n, p in model.named_parameters() if "lora" in n)


def test_foci_inner_user_prefix_for_idefics2_only(tiny_models):
    mllm = MLLM.load(tiny_models["vlm"])
    question = mc_question(query("birds"), ["Sooty Albatross", "Laysan Albatross", "Crested Auklet", "Least Auklet"])
    plain = mllm.prompt(foci_user_text(question, mllm.family, False))
    quirk = mllm.prompt(foci_user_text(question, mllm.family, True))
    assert "User:<image>Which of these birds" in plain
    assert "User:<image>User: Which of these birds" in quirk and quirk.replace("User: Which", "Which") == plain
    assert foci_user_text(question, "llava", True) == question


def test_evaluation_decodes_in_bfloat16(tiny_models, tmp_path):
    from finedefics.evaluate.mc import Item, evaluate

    mllm = MLLM.load(tiny_models["vlm"], dtype=torch.bfloat16)
    assert {p.dtype for p in mllm.model.parameters()} == {torch.bfloat16}
    entries = [Item("x", _image(tmp_path), "a", ["a", "b", "c", "d"])]
    (result,) = evaluate(mllm, "birds", entries, inner_user_prefix=True)
    assert result["correct"] == "a" and isinstance(result["predicted_raw"], str)
