"""The questions every stage asks a model, in one place: FOCI's multiple-choice prompt, option
shuffling and answer parsing (byte-equal to the benchmark), the open-set question of Stage II and
the describe prompt of Stage I's generation task. Pre-training, Stage II data and evaluation all
speak this protocol, so it lives below them."""

from __future__ import annotations

import numpy as np

LETTERS = "ABCD"
INSTRUCTION = "Answer with the letter from the given choices directly."


def query(plural: str) -> str:
    """FOCI's question per super-category, e.g. "Which of these birds is shown in the image?"."""
    return f"Which of these {plural} is shown in the image?"


def mc_question(question: str, options: list[str]) -> str:
    lines = "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(options))
    return f"{question}\nChoices:\n{lines}\n{INSTRUCTION}"


def foci_user_text(text: str, family: str, inner_user_prefix: bool) -> str:
    """The user turn's text as FOCI hands it to the chat template. For any model path containing
    "idefics", FOCI puts an extra "User: " before the question inside the template's own user turn
    (`User:<image>User: Which of ...`); the paper's Idefics2 numbers were measured that way.
    `inner_user_prefix` (evaluate.inner_user_prefix) reproduces it for the Idefics2 family."""
    return f"User: {text}" if inner_user_prefix and family == "idefics2" else text


def shuffled(options: list[str], rng: np.random.Generator) -> list[str]:
    return [options[i] for i in rng.permutation(len(options))]


# What FOCI's model wrapper keeps of a decoded answer before reading its letter, per model family:
# it splits the decoded prompt + answer at the chat template's assistant marker and keeps the text
# after the first one, i.e. the generated text up to any marker it repeats.
ASSISTANT_MARKERS = {"idefics2": "Assistant:", "llava": "ASSISTANT:", "qwen2_5_vl": "assistant"}


def foci_answer(generated: str, family: str) -> str:
    """The generated text as FOCI parses it: cut at a repeated assistant marker, stripped, and for
    Idefics2 with every "Answer: " removed (FOCI's Idefics2 wrapper does this, case-sensitively)."""
    marker = ASSISTANT_MARKERS.get(family)
    text = (generated.split(marker)[0] if marker else generated).strip()
    return text.replace("Answer: ", "") if family == "idefics2" else text


def parse_choice(output: str, family: str, n_options: int = 4) -> str | None:
    """FOCI's answer parser: the letter `foci_answer` starts with (case-insensitive) among the first
    `n_options` letters, or None, a generation failure."""
    text = foci_answer(output, family)
    if text and text[0].upper() in LETTERS[:n_options]:
        return text[0].upper()
    return None


def open_question(super_category: str) -> str:
    """Stage II's open-set question."""
    return f"What is the name of the {super_category} in the image?"


def describe_question(super_category: str) -> str:
    """The prompt of the attribute description generation task (L_G^att)."""
    return f"Describe this {super_category} in detail."
