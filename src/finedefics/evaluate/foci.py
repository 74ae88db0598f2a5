"""The FOCI multiple-choice protocol: prompts and answer parsing, byte-equal to the benchmark."""

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


def shuffled(options: list[str], rng: np.random.Generator) -> list[str]:
    return [options[i] for i in rng.permutation(len(options))]


def parse_choice(output: str, n_options: int = 4) -> str | None:
    """The letter the output starts with (case-insensitive), or None: a generation failure."""
    text = output.strip()
    if text and text[0].upper() in LETTERS[:n_options]:
        return text[0].upper()
    return None
