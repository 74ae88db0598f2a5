"""Stand-ins for `scripts/rehearse.sh`: the paper's components in their real formats, tiny and built
here (nothing is downloaded), and the loopback LLM server.

    python scripts/rehearsal.py build [--data DIR]   # rehearsal/ stand-ins and data/raw/<name> trees
    python scripts/rehearsal.py serve                # the OpenAI-compatible server; prints its URL

`build` writes, under rehearsal/:
- idefics2-8b/: an Idefics2ForConditionalGeneration with the hub processor of HuggingFaceM4/idefics2-8b
  (longest edge 980, shortest 378, 64 visual tokens, image splitting on as shipped), patch 14;
- llava-1.5-7b-hf/: a LlavaForConditionalGeneration with llava-hf/llava-1.5-7b-hf's processor
  (336 pixels, patch 14, CLIP's normalisation, its USER/ASSISTANT chat template);
- llm/: a tiny causal LM taught to answer the discovery prompt of each of the six datasets with an
  attribute list (an untaught one answers noise, which discovery rightly refuses);
- clip/<architecture>.pt: randomly initialised weights of two registered open_clip architectures;
and the six datasets under data/raw/<name>: the closed fixture trees of tests/real_fixtures.py (the
published layouts, real FOCI test keys, every class their option sets name), or links to DIR/<name>
with --data.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from finedefics.config import read_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tests' fixture trees, tiny LM and server

OUT = Path("rehearsal")
DATASETS = list(read_config(REPO / "configs" / "paper.yaml")["datasets"])  # the six, named once
CLIP_ARCHITECTURES = ("ViT-S-32-alt", "ViT-S-32")  # the smallest registered ones: mining, evaluate@clip
ATTRIBUTES = "['main color', 'body shape', 'surface texture', 'overall size']"

# HuggingFaceM4/idefics2-8b's preprocessor_config.json and processor_config.json
IDEFICS2_IMAGES = dict(do_image_splitting=True, size={"longest_edge": 980, "shortest_edge": 378})
IDEFICS2_VISUAL_TOKENS = 64
# llava-hf/llava-1.5-7b-hf's chat template
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}{{ part['text'] + ' ' }}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def tokenizer():
    from finedefics.attributes.prompts import DISCOVER, EXTRACT, SUMMARIZE
    from finedefics.models.tokenizer import train_tokenizer
    from finedefics.protocol import mc_question, query

    corpus = [DISCOVER, EXTRACT, SUMMARIZE, ATTRIBUTES, mc_question(query("birds"), list("ABCD"))] * 20
    return train_tokenizer(corpus, vocab_size=512)


def build_idefics2(tok, out: Path) -> None:
    from transformers import Idefics2Processor
    from transformers.models.idefics2.image_processing_idefics2 import Idefics2ImageProcessor

    from finedefics.models.tiny import TinySizes, build_idefics2
    from finedefics.models.tokenizer import CHAT_TEMPLATE

    sizes = TinySizes(vision_layers=1, patch=14, image_size=980, latents=IDEFICS2_VISUAL_TOKENS)
    model, _ = build_idefics2(tok, sizes)
    processor = Idefics2Processor(
        image_processor=Idefics2ImageProcessor(**IDEFICS2_IMAGES),
        tokenizer=tok,
        image_seq_len=IDEFICS2_VISUAL_TOKENS,
        chat_template=CHAT_TEMPLATE,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)


def build_llava(tok, out: Path) -> None:
    from finedefics.models.tiny import TinySizes, build_llava

    model, processor = build_llava(tok, TinySizes(patch=14, image_size=336))
    processor.chat_template = LLAVA_CHAT_TEMPLATE
    model.save_pretrained(out)
    processor.save_pretrained(out)


def build_llm(tok, out: Path) -> None:
    """A tiny Mistral taught each dataset's discovery prompt (the tests' `teach`)."""
    from tiny_models import build_causal_lm, teach

    from finedefics.attributes.discover import discover_prompt
    from finedefics.data.real import REAL_DATASETS
    from finedefics.models.tiny import TinySizes

    untaught = out.with_name(out.name + "-untaught")
    build_causal_lm(tok, TinySizes()).save_pretrained(untaught)
    tok.save_pretrained(untaught)
    specs = [REAL_DATASETS[name] for name in DATASETS]
    prompts = {discover_prompt(SimpleNamespace(super_category=s.super_category, unit=s.class_unit)) for s in specs}
    teach(untaught, out, [(p, ATTRIBUTES) for p in sorted(prompts)])


def build_clips(out: Path) -> None:
    import open_clip
    import torch

    out.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(CLIP_ARCHITECTURES):
        torch.manual_seed(seed)  # open_clip's model class, as its factory builds it (without "no weights" warnings)
        model = open_clip.CLIP(**open_clip.get_model_config(name))
        torch.save(model.state_dict(), out / f"{name}.pt")


def place_data(raw: Path, data: Path | None) -> None:
    """data/raw/<name>: the fixture trees, or links to the user's DIR/<name> (rehearse.sh checks they exist)."""
    from real_fixtures import MAKERS

    raw.mkdir(parents=True, exist_ok=True)
    for name in DATASETS:
        target = raw / name
        if data is None:
            target.mkdir()
            MAKERS[name](target, closed=True)
        else:
            target.symlink_to((data / name).resolve(), target_is_directory=True)


def build(args: argparse.Namespace) -> None:
    start = time.time()
    tok = tokenizer()
    build_idefics2(tok, OUT / "idefics2-8b")
    build_llava(tok, OUT / "llava-1.5-7b-hf")
    build_llm(tok, OUT / "llm")
    build_clips(OUT / "clip")
    place_data(Path("data/raw"), args.data)
    print(f"stand-ins built in {time.time() - start:.0f} s", flush=True)


def serve(args: argparse.Namespace) -> None:
    """Serve the taught LM over HTTP until killed; the URL goes to `--url-file` once listening."""
    import signal

    from openai_server import ModelServer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finedefics.attributes.backends import HFText

    model = AutoModelForCausalLM.from_pretrained(args.lm).eval()
    with ModelServer(lm=HFText(model, AutoTokenizer.from_pretrained(args.lm), args.max_new_tokens)) as server:
        args.url_file.write_text(server.base_url + "\n")
        signal.sigwait({signal.SIGTERM, signal.SIGINT})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(required=True)
    b = sub.add_parser("build")
    b.add_argument("--data", type=Path, help="a folder of the six datasets in their published layouts")
    b.set_defaults(run=build)
    s = sub.add_parser("serve")
    s.add_argument("--lm", type=Path, default=OUT / "llm")
    s.add_argument("--url-file", type=Path, required=True)
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.set_defaults(run=serve)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
