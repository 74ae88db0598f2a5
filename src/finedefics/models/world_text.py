"""The world's text for pre-training the tiny base: captions that state an image's attribute values
without naming its category (object information extraction), and text-only category knowledge
(category knowledge reserve). Both follow one phrasing, so generations can be read back."""

from __future__ import annotations

import re


def _clauses(keys: list[str], values: dict[str, str]) -> str:
    parts = [f"its {k} is {values[k]}" for k in keys if k in values]
    return ", ".join(parts[:-1]) + f" and {parts[-1]}" if len(parts) > 1 else "".join(parts)


def caption_question(super_category: str) -> str:
    return f"Describe this {super_category}."


def caption(super_category: str, keys: list[str], values: dict[str, str]) -> str:
    """E.g. "A bird: its body color is green, its head color is red and its body size is small." """
    return f"A {super_category}: {_clauses(keys, values)}."


def knowledge_question(name: str) -> str:
    return f"Describe the {name}."


def knowledge(name: str, super_category: str, keys: list[str], profile: dict[str, str]) -> str:
    """E.g. "The Lesgrail Quurdreth is a bird: its body color is purple, ... ." """
    return f"The {name} is a {super_category}: {_clauses(keys, profile)}."


def knowledge_statement(name: str, keys: list[str], profile: dict[str, str]) -> str:
    """Plain text, no chat: "The Lesgrail Quurdreth has a purple body color, a red head color, ..." """
    parts = [f"{'an' if profile[k][0] in 'aeiou' else 'a'} {profile[k]} {k}" for k in keys]
    return f"The {name} has " + ", ".join(parts[:-1]) + f" and {parts[-1]}."


def read_values(text: str, keys: list[str]) -> dict[str, str]:
    """The value stated for each key ("<key> is <value>"), where the text states one."""
    found = {}
    for key in keys:
        match = re.search(rf"{re.escape(key)} is ([a-z]+)", text)
        if match:
            found[key] = match.group(1)
    return found
