"""`bootstrap` on the embedded default: the tiny base MLLM of the world, and the paper's diagnosis.

The base is pre-trained on (a) captions of train images that state their attribute values and
never the category name, and (b) text-only category knowledge. It never sees an image next to
a category name, so it can read attributes and knows every category, yet cannot tell which
category an image shows: the object-category misalignment of paper §2.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from jinja2 import Environment
from tqdm import tqdm

from finedefics.config import TinyMLLMConfig
from finedefics.data.prepared import PreparedDataset
from finedefics.io import load_image
from finedefics.models import world_text as wt
from finedefics.models.mllm import MLLM
from finedefics.models.sft import ChatExample, iterate
from finedefics.models.tiny import TinySizes, build_idefics2, build_llava, build_qwen2_5_vl
from finedefics.models.tokenizer import IDEFICS2_FORMAT, QWEN_FORMAT, ChatFormat, train_tokenizer
from finedefics.protocol import describe_question, mc_question, open_question, parse_choice, query, shuffled


def pretraining_examples(datasets: list[PreparedDataset], seed: int, knowledge_repeats: int = 8) -> list[ChatExample]:
    """What the base learns, never an image next to a category name:
    (a) a caption of every train image, stating its attribute values;
    (b) the category knowledge of every class, as chat and as plain statements;
    (c) a multiple-choice question on one attribute of every train image (options: values);
    (d) text-only multiple choice between category names by an attribute value.
    (c) and (d) teach the multiple-choice format without tying images to names."""
    rng = np.random.default_rng([seed, 11])
    examples = []
    for ds in datasets:
        attrs = ds.attributes
        for row in ds.train.itertuples():
            values = json.loads(row.attributes)
            examples.append(
                ChatExample(
                    wt.caption_question(ds.super_category), wt.caption(ds.super_category, ds.keys, values), row.path
                )
            )
            key = str(rng.choice(ds.keys))
            wrong = [v for v in attrs[key].values if v != values[key]]
            options = shuffled([values[key], *rng.choice(wrong, size=min(3, len(wrong)), replace=False)], rng)
            question = mc_question(f"What is the {key} of the {ds.super_category} in the image?", options)
            examples.append(ChatExample(question, "ABCD"[options.index(values[key])], row.path))
        categories = ds.categories
        for c in categories:
            text = wt.knowledge(c.name, ds.super_category, ds.keys, c.profile)
            examples += [ChatExample(wt.knowledge_question(c.name), text)] * knowledge_repeats
            examples.append(
                ChatExample("Tell me about a category.", wt.knowledge_statement(c.name, ds.keys, c.profile))
            )
            for _ in range(2):
                key = str(rng.choice(ds.keys))
                others = [o.name for o in categories if o.profile[key] != c.profile[key]]
                if len(others) < 3:
                    continue
                options = shuffled([c.name, *rng.choice(others, size=3, replace=False)], rng)
                value = c.profile[key]
                question = mc_question(
                    f"Which of these {ds.plural} has {'an' if value[0] in 'aeiou' else 'a'} {value} {key}?",
                    options,
                )
                examples.append(ChatExample(question, "ABCD"[options.index(c.name)]))
    return examples


def tokenizer_corpus(
    datasets: list[PreparedDataset], examples: list[ChatExample], fmt: ChatFormat = IDEFICS2_FORMAT
) -> list[str]:
    """Everything the pipeline will say in the world, as chat turns: the examples, the FOCI
    prompt, open-set questions and the train images' scenes (the test set's size must not change
    the base). Rendered through `fmt`'s chat template, so that
    "User" and "Assistant" become single tokens (split in pieces, "Assistant" starts with the
    letter A, which confuses the one-letter answers of multiple choice)."""
    template = Environment().from_string(fmt.template)
    turns = [(e.question, e.answer) for e in examples]
    for ds in datasets:
        names = ds.names
        turns.append((mc_question(query(ds.plural), names[:4]), "A"))
        turns += [(open_question(ds.super_category), n) for n in names]
        turns += [(describe_question(ds.super_category), s) for s in ds.train.scene if s]  # never the test set
    return [
        template.render(messages=[{"role": "user", "content": q}, {"role": "assistant", "content": a}])
        for q, a in turns
    ]


def build_base(
    datasets: list[PreparedDataset],
    cfg: TinyMLLMConfig,
    image_size: int,
    seed: int,
    family: str = "idefics2",
    pixels: tuple[int, int] | None = None,
) -> tuple[MLLM, list[ChatExample]]:
    """The tokenizer trained on the world's text and a randomly initialised tiny Idefics2 (or, for
    Table 4, LLaVA-1.5: `family="llava"`; Qwen2.5-VL: `"qwen2_5_vl"`, images resized to `pixels`
    = (min, max) pixels, the whole image by default)."""
    examples = pretraining_examples(datasets, seed)
    fmt = QWEN_FORMAT if family == "qwen2_5_vl" else IDEFICS2_FORMAT
    tok = train_tokenizer(tokenizer_corpus(datasets, examples, fmt), cfg.vocab_size, fmt)
    sizes = TinySizes.from_config(cfg, image_size)
    if family == "qwen2_5_vl":
        model, processor = build_qwen2_5_vl(tok, sizes, pixels or (image_size**2, image_size**2), seed)
    else:
        model, processor = {"idefics2": build_idefics2, "llava": build_llava}[family](tok, sizes, seed)
    return MLLM(model, processor), examples


@torch.no_grad()
def answer_all(
    mllm: MLLM, questions: list[str], images: list[str] | None, max_new_tokens: int, batch_size: int = 32
) -> list[str]:
    out: list[str] = []
    index = list(range(len(questions)))
    for chunk in tqdm(list(iterate(index, batch_size)), desc="generate", unit="batch", leave=False):
        prompts = [mllm.prompt(questions[i], image=images is not None) for i in chunk]
        pictures = [load_image(images[i]) for i in chunk] if images is not None else None
        out += mllm.generate(prompts, pictures, max_new_tokens)
    return out


# Pre-training every weight of the tiny base (and the tiny CLIPs) gives other weights under another
# torch thread count (seed 3: caption accuracy 0.79 at 1 thread, 0.93 at 2); LoRA training of the
# stages after it does not (the same experiment wrote the same dvc.lock at 1 and 2 threads). So the
# tiny models are always built with this many threads, whatever the machine or the queue's share.
THREADS = 2
DIAGNOSIS_PER_CLASS = 8  # test images per class the diagnosis reads (captions are 96 tokens long)


def diagnose(mllm: MLLM, datasets: list[PreparedDataset], seed: int) -> tuple[dict[str, float], dict[str, list[str]]]:
    """The paper's three capabilities, from generations: attributes read from test images, category
    knowledge, and zero-shot multiple choice (ground truth and 3 random wrong classes)."""
    metrics: dict[str, float] = {}
    samples: dict[str, list[str]] = {}
    for ds in datasets:
        test = ds.test.groupby("label").head(DIAGNOSIS_PER_CLASS)
        captions = answer_all(mllm, [wt.caption_question(ds.super_category)] * len(test), list(test.path), 96)
        right = [
            wt.read_values(text, ds.keys).get(k) == v
            for text, attrs in zip(captions, test.attributes)
            for k, v in json.loads(attrs).items()
        ]
        names = ds.names
        known = answer_all(mllm, [wt.knowledge_question(n) for n in names], None, 96)
        knowledge_right = [
            wt.read_values(text, ds.keys).get(k) == v
            for text, c in zip(known, ds.categories)
            for k, v in c.profile.items()
        ]
        rng = np.random.default_rng([seed, 3])
        questions, truth = [], []
        for label in test.label:
            wrong = rng.choice([i for i in range(len(names)) if i != label], size=3, replace=False)
            options = shuffled([names[label], *(names[i] for i in wrong)], rng)
            questions.append(mc_question(query(ds.plural), options))
            truth.append("ABCD"[options.index(names[label])])
        answers = answer_all(mllm, questions, list(test.path), 4)
        picks = [parse_choice(a, mllm.family) for a in answers]
        metrics.update(
            {
                f"{ds.name}/caption_attribute_accuracy": float(np.mean(right)),
                f"{ds.name}/knowledge_attribute_accuracy": float(np.mean(knowledge_right)),
                f"{ds.name}/zero_shot_mc_accuracy": float(np.mean([p == t for p, t in zip(picks, truth)])),
                f"{ds.name}/zero_shot_mc_failure_rate": float(np.mean([p is None for p in picks])),
            }
        )
        samples[ds.name] = [captions[0], known[0], answers[0]]
    for metric in (
        "caption_attribute_accuracy",
        "knowledge_attribute_accuracy",
        "zero_shot_mc_accuracy",
        "zero_shot_mc_failure_rate",
    ):
        metrics[metric] = float(np.mean([metrics[f"{ds.name}/{metric}"] for ds in datasets]))
    return metrics, samples
