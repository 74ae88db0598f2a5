"""Byte-level BPE tokenizers trained on the world's text, with the special tokens and chat format
of the family they serve (Idefics2 and LLaVA-1.5 share one; Qwen2.5-VL has its own)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
FAKE_IMAGE, IMAGE, END_OF_UTTERANCE = "<fake_token_around_image>", "<image>", "<end_of_utterance>"

# Idefics2's chat format ("User:<image>question<end_of_utterance>\nAssistant: answer<end_of_utterance>\n");
# content may be a plain string (text-only use) or a list of {"type": "image"|"text"} parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'].capitalize() }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% elif part['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

QWEN_END, QWEN_PAD, QWEN_IMAGE, QWEN_VIDEO = "<|im_end|>", "<|endoftext|>", "<|image_pad|>", "<|video_pad|>"
QWEN_VISION_START, QWEN_VISION_END = "<|vision_start|>", "<|vision_end|>"

# Qwen2.5-VL-Instruct's chat format: ChatML turns, a default system turn, and the image as
# <|vision_start|><|image_pad|><|vision_end|> (the processor repeats <|image_pad|> per visual token).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class ChatFormat:
    """A family's special tokens and chat template, as its hub tokenizer has them."""

    template: str
    eos: str
    pad: str
    bos: str | None  # prepended to every text (None: the family's tokenizer adds nothing)
    unk: str | None
    extra: tuple[str, ...]  # the other special tokens

    @property
    def specials(self) -> list[str]:
        return [t for t in (self.unk, self.bos, self.eos, self.pad) if t] + list(self.extra)


IDEFICS2_FORMAT = ChatFormat(CHAT_TEMPLATE, EOS, PAD, BOS, UNK, (FAKE_IMAGE, IMAGE, END_OF_UTTERANCE))
QWEN_FORMAT = ChatFormat(
    QWEN_CHAT_TEMPLATE,
    QWEN_END,
    QWEN_PAD,
    None,
    None,
    ("<|im_start|>", QWEN_VISION_START, QWEN_VISION_END, QWEN_IMAGE, QWEN_VIDEO),
)


def train_tokenizer(
    texts: Iterable[str], vocab_size: int, fmt: ChatFormat = IDEFICS2_FORMAT
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` with `fmt`'s special tokens and chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=fmt.specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    if fmt.bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{fmt.bos} $A",
            pair=f"{fmt.bos} $A {fmt.bos} $B",
            special_tokens=[(fmt.bos, tok.token_to_id(fmt.bos))],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=fmt.bos,
        eos_token=fmt.eos,
        unk_token=fmt.unk,
        pad_token=fmt.pad,
        additional_special_tokens=list(fmt.extra),
        chat_template=fmt.template,
        padding_side="left",
    )
