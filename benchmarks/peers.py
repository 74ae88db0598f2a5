"""Ours against the tools a researcher would use instead, on the same model and data, in one run.

    python benchmarks/peers.py [--foci-questions 600] [--sft-steps 40]

- Evaluation against FOCI's loop as the benchmark runs it (gregor-ge/FOCI-Benchmark,
  `benchmark/evaluate.py` and `benchmark/model/model.py`'s Idefics2Model, copied minimally below):
  one image at a time, the chat template applied to each question, the processor on PIL images,
  `generate(do_sample=False, max_new_tokens=10)`, the whole sequence decoded and cut at
  "Assistant:", "Answer: " removed, the letter read by `startswith`. Questions/s of each on the
  workspace's final model and option sets, and whether the chosen options agree.
- Stage II against TRL's `SFTTrainer` (what LLaMA-Factory and most MLLM recipes build on), on the
  workspace's Stage I model: the same LoRA, examples, global batch, learning rate, schedule and
  steps. Steps/s of each and the mean loss of the last 10 steps.

Needs a workspace after `dvc repro` and TRL (`pip install -e '.[bench]'`). Ratios are measured in
this run, with torch on 2 threads.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path("stages").resolve()))

from evaluate import option_sets  # noqa: E402  (the stage's own questions)

from finedefics.config import Params, load_params  # noqa: E402
from finedefics.evaluate.mc import FAILURE, Item, evaluate  # noqa: E402
from finedefics.models.mllm import MLLM, ImageSettings  # noqa: E402
from finedefics.protocol import LETTERS, mc_question, query  # noqa: E402


def foci_loop(mllm: MLLM, plural: str, entries: list[Item], user_prefix: bool, batch_size: int = 1) -> list[dict]:
    """FOCI's multiple-choice loop for Idefics2 (its collate, generate and parsing), on our items;
    `user_prefix`: its `model_template` "User: {}" for a model named "idefics..." (our
    `evaluate.inner_user_prefix`)."""
    from PIL import Image

    template = "User: {}" if user_prefix else "{}"  # FOCI's model_template
    out = []
    for start in range(0, len(entries), batch_size):
        batch = entries[start : start + batch_size]
        texts = [template.format(mc_question(query(plural), e.options)) for e in batch]
        messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}] for t in texts]
        prompts = [mllm.processor.apply_chat_template(m, add_generation_prompt=True) for m in messages]
        images = [[Image.open(e.path)] for e in batch]
        inputs = mllm.processor(text=prompts, images=images, return_tensors="pt", padding=True)
        generation = mllm.model.generate(**inputs, do_sample=False, max_new_tokens=10)
        captions = mllm.processor.batch_decode(generation, skip_special_tokens=True)
        captions = [c.split("Assistant:")[1].strip().replace("Answer: ", "") for c in captions]
        for e, raw in zip(batch, captions):
            letter = next((x for x in LETTERS if raw.lower().startswith(x.lower())), None)
            out.append({"predicted": e.options[LETTERS.index(letter)] if letter else FAILURE + raw})
    return out


def bench_foci(params: Params, n: int) -> None:
    mllm = MLLM.load("models/finedefics", ImageSettings.from_config(params.model))
    name = next(iter(params.datasets))
    dataset, entries = option_sets(params, name)
    entries = entries[:n]
    with torch.no_grad():
        start = time.perf_counter()
        theirs = foci_loop(mllm, dataset.plural, entries, params.evaluate.inner_user_prefix)
        t_foci = time.perf_counter() - start
    start = time.perf_counter()
    ours = evaluate(mllm, dataset.plural, entries, max_new_tokens=params.evaluate.max_new_tokens, desc="ours")
    t_ours = time.perf_counter() - start
    same = sum(a["predicted"] == b["predicted"] for a, b in zip(theirs, ours))
    print(f"\nEvaluation: {len(entries)} questions of {name} on models/finedefics")
    print("| loop | questions/s |\n| --- | --- |")
    print(f"| FOCI (one image at a time, generate) | {len(entries) / t_foci:.1f} |")
    print(f"| ours (batched, one pass) | {len(entries) / t_ours:.1f} |")
    print(f"ratio {t_foci / t_ours:.1f}x; the same chosen option in {same} of {len(entries)} questions")


def ours_stage2(params: Params, rows, steps: int) -> tuple[float, list[float]]:
    """Seconds and per-step losses of our Stage II (`align.train`'s step and `fit`) for `steps` steps."""
    from finedefics.align.finetune import load_trainable
    from finedefics.align.steps import Stage2
    from finedefics.align.train import fit_config
    from finedefics.models.mllm import load_processor
    from finedefics.training import fit, plan

    cfg = params.train.stage2
    torch.manual_seed(params.train.seed)
    model = load_trainable("models/stage1", params.model, params.train.gradient_checkpointing)
    stage2 = Stage2(MLLM(model, load_processor("models/stage1", ImageSettings.from_config(params.model))))
    batches = plan(len(rows), cfg.batch_size, cfg.epochs, params.train.seed)[:steps]
    losses: list[float] = []
    start = time.perf_counter()
    fit(
        [model],
        batches,
        lambda idx: stage2.loss(rows.iloc[idx]),
        fit_config(params, cfg),
        None,
        "ours",
        log=lambda values, step: losses.append(values["loss"]),
    )
    return time.perf_counter() - start, losses


def trl_stage2(params: Params, rows, steps: int, own_collator: bool) -> tuple[float, list[float]]:
    """Seconds and per-step losses of TRL's `SFTTrainer` on the same LoRA model, examples, global
    batch, rate, schedule, warm-up, weight decay, clipping and steps. `own_collator`: TRL's
    vision-language collator on prompt-completion pairs (its chat rendering labels one more token,
    the newline after the end of the turn, so its loss is not ours); else our collator
    (`sft.encode`: the tokens and labels our Stage II trains on), so only the trainer differs."""
    import tempfile

    from datasets import Dataset
    from PIL import Image
    from trl import SFTConfig, SFTTrainer

    from finedefics.align.finetune import load_trainable
    from finedefics.models.mllm import load_processor
    from finedefics.models.sft import ChatExample, encode

    cfg = params.train.stage2
    torch.manual_seed(params.train.seed)
    model = load_trainable("models/stage1", params.model, params.train.gradient_checkpointing)
    processor = load_processor("models/stage1", ImageSettings.from_config(params.model))
    if own_collator:
        examples = Dataset.from_list(
            [
                {
                    "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r.question}]}],
                    "completion": [{"role": "assistant", "content": [{"type": "text", "text": r.answer}]}],
                    "images": [Image.open(r.path).convert("RGB")],
                }
                for r in rows.itertuples()
            ]
        )
        collator, extra = None, {}
    else:
        examples = Dataset.from_list(
            [{"question": r.question, "answer": r.answer, "path": r.path} for r in rows.itertuples()]
        )
        mllm = MLLM(model, processor)

        def collator(batch: list[dict]) -> dict:
            return encode(mllm, [ChatExample(b["question"], b["answer"], b["path"]) for b in batch])

        extra = {"remove_unused_columns": False, "dataset_kwargs": {"skip_prepare_dataset": True}}
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=cfg.batch_size,
            learning_rate=cfg.lr,
            lr_scheduler_type="linear",
            warmup_steps=cfg.warmup_steps,
            weight_decay=params.train.weight_decay,
            max_grad_norm=1.0,
            completion_only_loss=own_collator,
            max_length=None,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=params.train.seed,
            dataloader_num_workers=0,
            disable_tqdm=True,
            log_level="warning",
            **extra,
        )
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=examples, processing_class=processor, data_collator=collator
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    return seconds, [h["loss"] for h in trainer.state.log_history if "loss" in h]


def bench_sft(params: Params, steps: int) -> None:
    from finedefics.artefacts import STAGE2

    rows = STAGE2.read(Path("data/instructions/stage2.parquet"))
    t_ours, ours = ours_stage2(params, rows, steps)
    t_theirs, theirs = trl_stage2(params, rows, steps, own_collator=False)
    t_native, native = trl_stage2(params, rows, steps, own_collator=True)
    tail = min(10, steps)

    def mean(xs: list[float]) -> float:
        return sum(xs[-tail:]) / tail

    print(
        f"\nStage II: {steps} steps of {params.train.stage2.batch_size} examples on models/stage1, "
        f"LoRA r={params.model.lora.r}, each trainer in its own data order"
    )
    print("| trainer | steps/s | mean loss, last 10 steps |\n| --- | --- | --- |")
    print(
        f"| TRL SFTTrainer, its vision-language collator (labels one more token) | {steps / t_native:.2f} | {mean(native):.3f} |"
    )
    print(
        f"| TRL SFTTrainer, our collator (the same tokens and labels) | {steps / t_theirs:.2f} | {mean(theirs):.3f} |"
    )
    print(f"| ours (`fit`) | {steps / t_ours:.2f} | {mean(ours):.3f} |")
    gap = abs(mean(theirs) - mean(ours)) / mean(ours)
    print(
        f"ratio {t_theirs / t_ours:.2f}x against TRL on the same batches ({t_native / t_ours:.2f}x against its own collator);"
    )
    print(f"loss gap {gap:.1%} of ours (tolerance 10%: {'within' if gap <= 0.10 else 'OUTSIDE'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--foci-questions", type=int, default=600)
    parser.add_argument("--sft-steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(2)
    params = load_params("params.yaml")
    bench_foci(params, args.foci_questions)
    bench_sft(params, args.sft_steps)


if __name__ == "__main__":
    main()
