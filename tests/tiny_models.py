"""Tiny randomly initialised models for tests, saved like hub checkpoints (Auto classes load them)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import MistralForCausalLM, PreTrainedTokenizerFast

from finedefics.attributes.prompts import DISCOVER, EXTRACT, SUMMARIZE
from finedefics.models.tiny import TinySizes, build_idefics2, build_qwen2_5_vl, generation_config, text_config
from finedefics.models.tokenizer import QWEN_FORMAT, train_tokenizer

CORPUS = [
    DISCOVER,
    EXTRACT,
    SUMMARIZE,
    "['wing color', 'beak shape', 'tail shape', 'body size']",
    "the bird has a red head, a long beak and a striped wing; the flower has pink round petals",
] * 20


def build_causal_lm(tok: PreTrainedTokenizerFast, sizes: TinySizes, seed: int = 0) -> MistralForCausalLM:
    """A randomly initialised tiny text-only Mistral."""
    torch.manual_seed(seed)
    model = MistralForCausalLM(text_config(tok, sizes))
    model.generation_config = generation_config(tok)
    return model


def build(root: Path) -> dict[str, Path]:
    """A tiny Idefics2 (VLM) and a tiny Mistral (LM) with one trained tokenizer, and a tiny
    Qwen2.5-VL ("qwen") with its own, saved under root."""
    tok = train_tokenizer(CORPUS, vocab_size=400)
    sizes = TinySizes()
    vlm, processor = build_idefics2(tok, sizes)
    lm = build_causal_lm(tok, sizes)
    qwen, qwen_processor = build_qwen2_5_vl(train_tokenizer(CORPUS, 400, QWEN_FORMAT), sizes, (4096, 4096))
    paths = {"vlm": root / "vlm", "lm": root / "lm", "qwen": root / "qwen"}
    qwen.save_pretrained(paths["qwen"])
    qwen_processor.save_pretrained(paths["qwen"])
    vlm.save_pretrained(paths["vlm"])
    processor.save_pretrained(paths["vlm"])
    lm.save_pretrained(paths["lm"])
    tok.save_pretrained(paths["lm"])
    return paths


def teach(lm_dir: Path, out: Path, pairs: list[tuple[str, str]], steps: int = 150) -> Path:
    """Fine-tune the tiny LM until it answers each chat prompt with its answer (memorisation).

    Tests compare the greedy answer with the text exactly, which is safe only if every answer token
    wins by a wide margin. Measured for the three uses in test_summarize.py, with tiny LMs built
    under seeds 0-4 and 1 and 2 threads: after 150 steps, teacher-forced answer loss is 0.007-0.008,
    and each answer token's logit exceeds the runner-up's by 5.8-6.9 at every position. All 30
    greedy answers were exact, and 1 and 2 threads gave bit-identical margins. Float noise between
    machines is around 1e-5, so it cannot flip a token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lm_dir)
    model = AutoModelForCausalLM.from_pretrained(lm_dir)
    torch.manual_seed(0)
    batch = []
    for prompt, answer in pairs:
        head = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        ids_head = tok(head, add_special_tokens=False)["input_ids"]
        ids_answer = tok(" " + answer + "<end_of_utterance>", add_special_tokens=False)["input_ids"]
        batch.append((ids_head + ids_answer, [-100] * len(ids_head) + ids_answer))
    width = max(len(i) for i, _ in batch)
    input_ids = torch.tensor([i + [tok.pad_token_id] * (width - len(i)) for i, _ in batch])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
    attention = (torch.arange(width)[None] < torch.tensor([len(i) for i, _ in batch])[:, None]).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
