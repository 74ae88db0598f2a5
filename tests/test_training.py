"""Stage I / Stage II training on tiny models: what is trained, QLoRA on CPU, merging, resuming,
the one-pass text encoding, every paradigm and objective, and LLaVA-1.5."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_world_workdir, run_stage, set_params
from transformers import AutoModelForImageTextToText

from finedefics.align.finetune import load_trainable, save_merged
from finedefics.align.instructions import stage1_frame, stage2_frame
from finedefics.align.losses import LossForm, Temperatures
from finedefics.align.steps import Stage1, Stage2
from finedefics.artefacts import STAGE1, STAGE2
from finedefics.config import LoraConfig, ModelConfig
from finedefics.data.prepared import load_prepared
from finedefics.models import world_text as wt
from finedefics.models.mllm import MLLM, load_processor
from finedefics.models.sft import ChatExample, encode
from finedefics.training import FitConfig, fit, plan

TRAIN = {
    "train.stage1": {"epochs": 1, "lr": 1e-3, "warmup_steps": 1, "batch_size": 4},
    "train.stage2": {"epochs": 1, "lr": 1e-3, "warmup_steps": 1, "batch_size": 4},
    "train.per_device_batch_size": 2,
    "train.checkpoint_every": 1,
}


def fit_steps(modules, n, step, *, epochs, lr, batch_size, per_device_batch_size, checkpoint_every, resume, desc):
    """Stage training's loop over `n` examples: full `lr` at the first step, linear decay to zero."""
    cfg = FitConfig(
        lr=lr,
        warmup_steps=0,
        batch_size=batch_size,
        per_device_batch_size=per_device_batch_size,
        checkpoint_every=checkpoint_every,
        schedule="linear",
        weight_decay=0.0,
        max_grad_norm=1.0,
    )
    return fit(modules, plan(n, batch_size, epochs, seed=0), step, cfg, resume, desc)


def write_instructions(root: Path, name: str = "toy-bird", seed: int = 0) -> None:
    """Stage I / II data for the prepared world in root: descriptions are the captions, negatives
    are random wrong classes (what `mine` would write, without CLIP)."""
    dataset = load_prepared(name, root / "data" / "prepared")
    keys, train = dataset.keys, dataset.train
    captions = {r.image_id: wt.caption("bird", keys[:3], json.loads(r.attributes)) for r in train.itertuples()}
    descriptions = pd.DataFrame({"image_id": list(captions), "description": list(captions.values())})
    rng = np.random.default_rng(seed)
    names = dataset.names
    first = train.groupby("label").image_id.first()
    rows = []
    for r in train.itertuples():
        wrong = rng.choice([i for i in range(len(names)) if i != r.label], size=3, replace=False)
        rows.append(
            {
                "image_id": r.image_id,
                "label": r.label,
                "negative_categories": [names[i] for i in wrong],
                "negative_descriptions": [captions[first[i]] for i in wrong],
                "distractor_categories": [names[i] for i in wrong],
            }
        )
    negatives = pd.DataFrame(rows)
    target = root / "data" / "instructions"
    target.mkdir(parents=True, exist_ok=True)
    STAGE1.write(target / "stage1.parquet", stage1_frame(dataset, descriptions, negatives))
    STAGE2.write(target / "stage2.parquet", stage2_frame(dataset, negatives, "open+closed", seed))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_models):
    root = make_world_workdir(
        tmp_path_factory.mktemp("train"), categories=6, cluster_size=3, train_per_class=2, test_per_class=1
    )
    write_instructions(root)
    set_params(root, **{"model.base": str(tiny_models["vlm"]), **TRAIN})
    return root


def stage1_for(mllm: MLLM, rows: pd.DataFrame, objective="obj-att-cat", negatives=True, grouped=True) -> Stage1:
    names = sorted(set(rows.category) | {c for cs in rows.negative_categories for c in cs})
    return Stage1(
        mllm,
        Temperatures(0.07, two=False, learn=True),
        objective,
        negatives,
        {n: i for i, n in enumerate(names)},
        LossForm(),
        grouped=grouped,
    )


def rows_of(root: Path, n: int = 4) -> pd.DataFrame:
    frame = pd.read_parquet(root / "data" / "instructions" / "stage1.parquet")
    frame["path"] = [str(root / p) for p in frame.path]
    return frame.iloc[:n]


def trainable(path, finetune: str):
    model = load_trainable(str(path), ModelConfig(finetune=finetune, lora=LoraConfig(r=4, alpha=8, dropout=0.0)), False)
    return MLLM(model, load_processor(str(path)))


def test_the_release_forms_train_the_adapters_and_leave_the_temperatures(workdir, tiny_models):
    """Stage I with every release switch (configs/release.yaml): a QLoRA step runs, the loss has
    each term, the frozen temperatures get no gradient, the LoRA weights do."""
    mllm = trainable(tiny_models["vlm"], "qlora")
    rows = rows_of(workdir)
    names = sorted(set(rows.category) | {c for cs in rows.negative_categories for c in cs})
    stage = Stage1(
        mllm,
        Temperatures(0.07, two=True, learn=False),
        "obj-att-cat",
        True,
        {n: i for i, n in enumerate(names)},
        LossForm(mask_same_class=False, ccc="release", negatives_scope="batch", contrastive_batch="device"),
        text_bos=True,
        whole_sequence=True,
    )
    loss, values = stage.loss(rows)
    loss.backward()
    assert {"loss_oa", "loss_ao", "loss_ac", "loss_ca", "loss_ccc", "loss_generation"} <= set(values)
    assert values["temperature"] == values["temperature_ac"] == pytest.approx(0.07)
    assert list(stage.temperature.parameters()) == []
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in mllm.model.named_parameters() if "lora" in n)


@pytest.mark.parametrize("finetune", ["lora", "qlora", "full"])
def test_gradients_reach_only_what_is_trained(workdir, tiny_models, finetune):
    mllm = trainable(tiny_models["vlm"], finetune)
    stage = stage1_for(mllm, rows_of(workdir))
    loss, _ = stage.loss(rows_of(workdir))
    loss.backward()
    named = dict(mllm.model.named_parameters())
    with_grad = {n for n, p in named.items() if p.grad is not None and p.grad.abs().sum() > 0}
    assert stage.temperature.oa.grad is not None and stage.temperature.oa.grad != 0
    if finetune == "full":
        assert all(p.requires_grad for p in named.values())
        for part in ("vision_model", "connector", "text_model", "lm_head"):
            assert any(part in n for n in with_grad), part
    else:
        assert with_grad and all("lora_" in n for n in with_grad)
        assert {n for n, p in named.items() if p.requires_grad} == {n for n in named if "lora_" in n}
        assert any("text_model" in n for n in with_grad) and any("connector" in n for n in with_grad)
        assert not any("vision_model" in n for n in named if "lora_" in n)  # LoRA on text model + connector


def test_qlora_trains_on_cpu_and_its_loss_falls(workdir, tiny_models):
    torch.manual_seed(0)  # LoRA's A matrices are drawn from the global RNG: seeded, the run is fixed
    mllm = trainable(tiny_models["vlm"], "qlora")
    assert any("Linear4bit" in type(m).__name__ for m in mllm.model.modules())
    rows = rows_of(workdir)
    stage = stage1_for(mllm, rows)
    losses = []

    def step(idx):
        loss, values = stage.loss(rows)
        losses.append(values["loss"])
        return loss, values

    fit_steps(
        [mllm.model, stage.temperature],
        4,
        step,
        epochs=12,
        lr=1e-2,
        batch_size=4,
        per_device_batch_size=4,
        checkpoint_every=100,
        resume=None,
        desc="qlora",
    )
    # last/first loss, measured under torch seeds 0-19 (0-4 with 1 and with 2 threads, bit-identical):
    # 0.778-0.886, first loss 7.745 (LoRA B starts at zero); seed 0 gives 0.805. The old bar of 0.8
    # failed 4 of the first 5 seeds, and test order decided the seed. 0.95 is 0.06 above the worst seed.
    # Re-measured on finedefics.training.fit (transformers' linear schedule), seeds 0-4 with 1 and with 2
    # threads, bit-identical: 0.845-0.861, first loss 7.675.
    assert len(losses) == 12 and losses[-1] < 0.95 * losses[0]


def _tuned(tiny_models, workdir, finetune, model="vlm", steps=None, initial=None):
    """`tiny_models[model]` after 3 Stage I steps; each step's loss values are appended to `steps`
    and the trainable parameters before training put in `initial`, where given."""
    torch.manual_seed(0)  # the LoRA initialisation: fixed, whichever tests ran before
    mllm = trainable(tiny_models[model], finetune)
    if initial is not None:
        initial.update({n: p.detach().clone() for n, p in mllm.model.named_parameters() if p.requires_grad})
    rows = rows_of(workdir)
    stage = stage1_for(mllm, rows)

    def step(idx):
        loss, values = stage.loss(rows)
        if steps is not None:
            steps.append(values)
        return loss, values

    fit_steps(
        [mllm.model, stage.temperature],
        4,
        step,
        epochs=3,
        lr=1e-2,
        batch_size=4,
        per_device_batch_size=4,
        checkpoint_every=100,
        resume=None,
        desc=f"{model} {finetune}",
    )
    return mllm, rows


@pytest.mark.parametrize("finetune,atol", [("lora", 1e-4), ("qlora", 0.2)])
def test_merged_checkpoint_gives_the_adapter_models_logits(workdir, tiny_models, tmp_path, finetune, atol):
    """QLoRA computes in bf16 through bitsandbytes' kernels, so its tolerance is bf16's; merging into
    the dequantised base halves the difference of merging into the original weights.

    Measured under torch seeds 0-14 (0-4 with 1 and with 2 threads, bit-identical). Max |difference|:
    lora 2.4e-7 to 3.9e-7; qlora 0.019 to 0.053. Mean |difference| / std(logits): lora 2e-7; qlora
    0.019 to 0.034. Two failures the test must catch (qlora, seeds 0-4): merging into the original
    weights gives mean/std 0.071 to 0.079 (max 0.078 to 0.110), and not merging (the bare base) gives
    0.59 to 0.66 (max 0.63 to 0.78). The max bar (0.2) is 4x the worst seed, the mean bar (0.05) lies
    between the seeds and the first failure."""
    mllm, rows = _tuned(tiny_models, workdir, finetune)
    batch = encode(mllm, [ChatExample("Describe this bird in detail.", rows.description.iloc[0], rows.path.iloc[0])])
    with torch.no_grad():
        before = mllm.model(**batch).logits.float()
    save_merged(mllm.model, ModelConfig(finetune=finetune), str(tiny_models["vlm"]), mllm.processor, tmp_path)
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        after = merged(**batch).logits
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert (after - before).abs().max().item() < atol
    assert (after - before).abs().mean().item() < 0.05 * before.std().item()


def test_merging_into_the_original_base_adds_the_quantisation_error_back(workdir, tiny_models, tmp_path):
    """model.merge_into: the release merges QLoRA adapters into the original full-precision weights;
    the adapters were trained against the dequantised NF4 ones, so that merge is further from the
    trained model (measured above: mean |difference| / std 0.071-0.079 against 0.019-0.034)."""
    mllm, rows = _tuned(tiny_models, workdir, "qlora")
    batch = encode(mllm, [ChatExample("Describe this bird in detail.", rows.description.iloc[0], rows.path.iloc[0])])
    with torch.no_grad():
        before = mllm.model(**batch).logits.float()
    error = {}
    for target in ("dequantised", "original"):
        cfg = ModelConfig(finetune="qlora", merge_into=target)
        save_merged(mllm.model, cfg, str(tiny_models["vlm"]), mllm.processor, tmp_path / target)
        merged = AutoModelForImageTextToText.from_pretrained(tmp_path / target).eval()
        with torch.no_grad():
            error[target] = (merged(**batch).logits - before).abs().mean().item() / before.std().item()
    assert error["dequantised"] < 0.05 < error["original"]


def test_resumed_training_equals_an_uninterrupted_run(workdir, tiny_models, tmp_path):
    frame = rows_of(workdir, n=12)

    def run(resume: Path | None, crash_at: int | None = None):
        torch.manual_seed(0)
        model = load_trainable(
            str(tiny_models["vlm"]), ModelConfig(finetune="lora", lora=LoraConfig(r=4, alpha=8, dropout=0.1)), False
        )
        mllm = MLLM(model, load_processor(str(tiny_models["vlm"])))
        stage = stage1_for(mllm, frame)
        calls = []

        def step(idx):
            if crash_at is not None and len(calls) == crash_at:
                raise KeyboardInterrupt("killed")
            calls.append(list(idx))
            return stage.loss(frame.iloc[idx])

        fit_steps(
            [model, stage.temperature],
            len(frame),
            step,
            epochs=2,
            lr=5e-3,
            batch_size=4,
            per_device_batch_size=2,
            checkpoint_every=2,
            resume=resume,
            desc="resume",
        )
        return (
            {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
            stage.temperature.oa.item(),
            calls,
        )

    whole, tau, calls = run(None)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, crash_at=7)  # mid-way through optimizer step 4: steps 1-2 are checkpointed
    resumed, tau_resumed, calls_after = run(tmp_path)
    assert calls_after == calls[4:]  # only micro-batches after the checkpoint are recomputed
    assert tau_resumed == pytest.approx(tau, abs=1e-6)
    for n in whole:
        torch.testing.assert_close(resumed[n], whole[n], rtol=1e-5, atol=1e-6)


def test_grouped_passes_equal_separate_passes(workdir, tiny_models):
    mllm = MLLM.load(tiny_models["vlm"])
    rows = rows_of(workdir, n=6)
    with torch.no_grad():
        one, v1 = stage1_for(mllm, rows, grouped=True).loss(rows)
        sep, v2 = stage1_for(mllm, rows, grouped=False).loss(rows)
    assert abs(one.item() - sep.item()) < 1e-5
    for k in v1:
        assert abs(v1[k] - v2[k]) < 1e-5, k


@pytest.mark.parametrize(
    "objective,negatives,terms",
    [
        ("obj-att-cat", True, {"oa", "ao", "ac", "ca", "ccc", "generation"}),
        ("obj-att-cat", False, {"oa", "ao", "ac", "ca", "generation"}),
        ("obj-cat", True, {"oc", "co", "ccc"}),
        ("none", True, {"generation"}),
    ],
)
def test_each_objective_has_its_terms(workdir, tiny_models, objective, negatives, terms):
    mllm = MLLM.load(tiny_models["vlm"])
    rows = rows_of(workdir)
    loss, values = stage1_for(mllm, rows, objective, negatives).loss(rows)
    assert {k.removeprefix("loss_") for k in values if k.startswith("loss_")} == terms
    assert torch.isfinite(loss)
    assert values["loss"] == pytest.approx(loss.item())


def test_stage2_loss_is_the_answer_cross_entropy(workdir, tiny_models):
    mllm = MLLM.load(tiny_models["vlm"])
    frame = pd.read_parquet(workdir / "data" / "instructions" / "stage2.parquet").iloc[:4]
    frame["path"] = [str(workdir / p) for p in frame.path]
    loss, _ = Stage2(mllm).loss(frame)
    batch = encode(mllm, [ChatExample(r.question, r.answer, r.path) for r in frame.itertuples()])
    logits = mllm.model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits[keep], targets[keep]).item(), rel=1e-5)


@pytest.mark.parametrize("paradigm", ["two-stage", "one-stage", "stage2-only", "stage1-only"])
def test_every_paradigm_runs_the_two_training_stages(workdir, tmp_path, monkeypatch, paradigm):
    root = tmp_path / "w"
    shutil.copytree(workdir, root)
    set_params(root, **{"align.paradigm": paradigm})
    for stage in ("train_stage1.py", "train_stage2.py"):
        proc = run_stage(root, stage)
        assert proc.returncode == 0, proc.stderr[-3000:]
    s1 = json.loads((root / "metrics" / "train_stage1.json").read_text())
    s2 = json.loads((root / "metrics" / "train_stage2.json").read_text())
    trains_stage1 = paradigm in ("two-stage", "stage1-only")
    assert s1["trained"] == int(trains_stage1) and s2["trained"] == int(paradigm != "stage1-only")
    assert (root / "models" / "stage1" / "config.json").is_file() == trains_stage1
    monkeypatch.chdir(root)  # pointers name folders relative to the repository, like DVC paths
    final = Path("models/finedefics")
    from finedefics.models.paths import resolve

    assert (Path(resolve(final)) / "config.json").is_file()
    if trains_stage1:
        assert s1["alignment_start"] != s1["alignment_end"]
    if paradigm == "one-stage":
        assert s2["steps"] == 3 and "alignment_end" in s2  # each step: Stage I triples and their questions
    MLLM.load(resolve(final))


def test_a_pass_through_pointer_changes_with_the_model_it_points_at(tmp_path, monkeypatch):
    """DVC hashes the pointer a skipped stage writes: it must differ when the model behind the same
    path does (another base, another seed's Stage I model), or the run cache restores stale stages."""
    from finedefics.models.paths import POINTER, pass_through, resolve

    monkeypatch.chdir(tmp_path)
    model = Path("models/stage1")
    model.mkdir(parents=True)
    pointers = []
    for weights in (b"seed 0", b"seed 1", b"seed 0"):
        (model / "model.safetensors").write_bytes(weights)
        out = Path(f"out{len(pointers)}")
        pass_through(model, out)
        pointers.append((out / POINTER).read_bytes())
        assert resolve(out) == str(model)
    assert pointers[0] != pointers[1] and pointers[0] == pointers[2]
    pass_through(Path("out1"), Path("chained"))  # a pointer to a pointer names the model itself
    assert resolve("chained") == str(model) and (Path("chained") / POINTER).read_bytes() == pointers[2]


def test_llava_trains_a_step(tiny_models, workdir, tmp_path):
    from transformers import AutoTokenizer

    from finedefics.models.tiny import TinySizes, build_llava

    tok = AutoTokenizer.from_pretrained(tiny_models["lm"])
    model, processor = build_llava(tok, TinySizes())
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    mllm = trainable(tmp_path, "lora")
    assert mllm.model.get_base_model().config.model_type == "llava"
    assert any("multi_modal_projector" in n and "lora_" in n for n, _ in mllm.model.named_parameters())
    rows = rows_of(workdir)
    stage = stage1_for(mllm, rows)
    before = {n: p.detach().clone() for n, p in mllm.model.named_parameters() if p.requires_grad}
    fit_steps(
        [mllm.model, stage.temperature],
        4,
        lambda idx: stage.loss(rows),
        epochs=1,
        lr=1e-2,
        batch_size=4,
        per_device_batch_size=4,
        checkpoint_every=100,
        resume=None,
        desc="llava",
    )
    changed = [n for n, p in mllm.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("lora_B" in n for n in changed)
    loss, _ = Stage2(mllm).loss(
        pd.DataFrame(
            {"question": ["What is the name of the bird in the image?"], "answer": ["x"], "path": [rows.path.iloc[0]]}
        )
    )
    assert torch.isfinite(loss)


@pytest.mark.parametrize("family", ["idefics2", "llava", "qwen2_5_vl"])
def test_stage1_shares_the_vision_pass_with_the_same_loss_and_gradients(tiny_models, workdir, tmp_path, family):
    """Stage I runs the vision tower once per step; its generation loss, fed those visual tokens as
    input embeddings, equals the model's own forward on the pixels, and so do the vision tower's
    gradients."""
    from transformers import AutoTokenizer

    from finedefics.align.steps import lm_loss
    from finedefics.models.representations import pixels
    from finedefics.models.tiny import TinySizes, build_llava
    from finedefics.protocol import describe_question

    if family == "llava":
        model, processor = build_llava(AutoTokenizer.from_pretrained(tiny_models["lm"]), TinySizes())
        model.save_pretrained(tmp_path)
        processor.save_pretrained(tmp_path)
        source = tmp_path
    else:
        source = tiny_models["qwen" if family == "qwen2_5_vl" else "vlm"]
    rows = rows_of(workdir)
    grads = []
    for shared in (True, False):
        mllm = trainable(source, "full")
        stage = stage1_for(mllm, rows)
        if shared:
            loss = stage.generation_loss(rows, stage.reader.visual(pixels(mllm, list(rows.path))))
        else:
            examples = [
                ChatExample(describe_question(r.super_category), r.description, r.path) for r in rows.itertuples()
            ]
            loss = lm_loss(mllm, examples)
        loss.backward()
        vision = {n: p.grad for n, p in mllm.model.named_parameters() if stage.reader.family.vision in n}
        assert any(g is not None and g.abs().sum() > 0 for g in vision.values())
        grads.append((loss.item(), vision))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    for n, g in grads[0][1].items():
        torch.testing.assert_close(g, grads[1][1][n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("per_example", [True, False])
def test_a_batch_run_in_length_groups_has_the_one_pass_loss(tiny_models, workdir, per_example):
    from finedefics.models.sft import answer_loss, by_length, chat_loss
    from finedefics.protocol import describe_question

    mllm = MLLM.load(tiny_models["vlm"])
    rows = rows_of(workdir, n=6)
    long = [ChatExample(describe_question(r.super_category), r.description, r.path) for r in rows.itertuples()]
    short = [ChatExample("Which one? A. x B. y", "B", r.path) for r in rows.itertuples()]
    mixed = [e for pair in zip(long, short) for e in pair]
    groups = by_length(mixed)
    assert sorted(map(sorted, groups)) == [list(range(0, 12, 2)), list(range(1, 12, 2))]  # captions apart
    assert by_length(long) == [list(range(6))]  # similar lengths: one pass
    with torch.no_grad():
        split = chat_loss(mllm, mixed, per_example)
        one = answer_loss(mllm.model, encode(mllm, mixed), per_example)
    assert split.item() == pytest.approx(one.item(), rel=1e-5)


def test_qwen_object_representation_is_its_own_forward_of_an_image_then_eos(tiny_models, workdir, tmp_path):
    """Qwen2.5-VL's object representation: the image's visual tokens with the 3D rotary positions
    its own forward gives an image at the start of a sequence, then EOS; the same states as the
    model's forward on that image alone, also in a batch whose images have different token counts
    (a 64x48 image gets 20, a square one 16). 1D positions would differ."""
    from PIL import Image

    from finedefics.models.representations import Representations, last, pixels

    mllm = MLLM.load(tiny_models["qwen"])
    reader = Representations(mllm.model, mllm.tokenizer.eos_token_id)
    square = rows_of(workdir, n=1).path.iloc[0]
    wide = str(tmp_path / "wide.png")
    Image.open(square).convert("RGB").resize((64, 48)).save(wide)
    visual = reader.visual(pixels(mllm, [square, wide]))
    assert [len(t) for t in visual.tokens] == [16, 20]  # 8x8 patches merged 2x2; 8x10 for 64x48 scaled up
    image_id = mllm.model.config.image_token_id
    with torch.no_grad():
        ours = last(*reader.visual_states(visual))
        for i, path in enumerate([square, wide]):
            ids = torch.tensor([[image_id] * len(visual.tokens[i]) + [mllm.tokenizer.eos_token_id]])
            own = mllm.model.model(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                mm_token_type_ids=(ids == image_id).int(),
                **pixels(mllm, [path]),
            ).last_hidden_state[:, -1]
            torch.testing.assert_close(ours[i : i + 1], own, rtol=1e-5, atol=1e-5)
        flat = reader.states(
            torch.cat([visual.tokens[0][None], reader.embed(ids[:, -1:])], 1), torch.ones(1, 17, dtype=torch.long)
        )[:, -1]
    assert (flat - ours[:1]).abs().max() > 1e-3


def test_qwen_lora_targets_the_language_model_and_the_merger(tiny_models):
    mllm = trainable(tiny_models["qwen"], "lora")
    adapted = {n.removesuffix(".lora_A.default.weight") for n, _ in mllm.model.named_parameters() if "lora_A" in n}
    assert any(n.endswith("visual.merger.mlp.0") for n in adapted) and any(n.endswith("merger.mlp.2") for n in adapted)
    assert any("language_model.layers.0.self_attn.q_proj" in n for n in adapted)
    assert not any("visual.blocks" in n for n in adapted)  # the vision tower stays frozen
    trainable_names = [n for n, p in mllm.model.named_parameters() if p.requires_grad]
    assert trainable_names and all("lora_" in n for n in trainable_names)


@pytest.mark.parametrize("finetune", ["lora", "qlora"])
def test_qwen_trains_stage1_and_merges_into_a_checkpoint_with_its_logits(tiny_models, workdir, tmp_path, finetune):
    """A Stage I step changes Qwen2.5-VL's adapters (LoRA, and QLoRA through bitsandbytes for real);
    the merged checkpoint reloads through the Auto classes with the adapter model's logits, and its
    processor gives the same 16 visual tokens. LoRA: to float error. QLoRA computes in bf16, which on
    this tiny Qwen2.5-VL moves the logits more than on the tiny Idefics2 (mean |difference| / std
    0.080 to 0.095 with random adapters under seeds 0-2, merged into the dequantised or the original
    base alike); the test asks that the merged model be at least 3x closer to the adapter model than
    the unmerged base is."""
    before, losses = {}, []
    mllm, rows = _tuned(tiny_models, workdir, finetune, model="qwen", steps=losses, initial=before)
    assert {"loss_oa", "loss_ac", "loss_generation"} <= set(losses[0])
    changed = [n for n, p in mllm.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("lora_B" in n and "merger" in n for n in changed)
    assert any("lora_B" in n and "language_model" in n for n in changed)
    batch = encode(mllm, [ChatExample("Describe this bird in detail.", rows.description.iloc[0], rows.path.iloc[0])])
    with torch.no_grad():
        ours = mllm.model(**batch).logits.float()
    save_merged(mllm.model, ModelConfig(finetune=finetune), str(tiny_models["qwen"]), mllm.processor, tmp_path)
    merged = MLLM.load(tmp_path)
    with torch.no_grad():
        theirs = merged.model(**batch).logits
    assert merged.family == "qwen2_5_vl" and not any("lora" in n for n, _ in merged.model.named_parameters())
    error = (theirs - ours).abs().mean().item()
    if finetune == "lora":
        assert (theirs - ours).abs().max().item() < 1e-4
    else:
        with torch.no_grad():
            bare = MLLM.load(tiny_models["qwen"]).model(**batch).logits
        assert error < (bare - ours).abs().mean().item() / 3
    from finedefics.io import load_image

    assert merged.visual_token_count(load_image(rows.path.iloc[0])) == 16
