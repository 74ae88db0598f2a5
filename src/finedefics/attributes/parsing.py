"""Reading attribute lists out of LLM answers, and typing attribute keys."""

from __future__ import annotations

import ast
import json
import re

_QUOTED = re.compile(r"""'([^'\n]*)'|"([^"\n]*)\"""")
_ITEM_LINE = re.compile(r"^\s*(?:\d+[.)]|[-*\u2022])\s+(.+?)\s*$")
_MAX_KEY_WORDS = 10


class NoAttributeList(ValueError):
    """The answer holds no usable list."""


def normalise_key(text: str) -> str:
    """Lower-case, unquoted, single-spaced; explanations after ':' or ' - ' dropped."""
    text = re.split(r":|\s[-\u2013\u2014]\s", text, maxsplit=1)[0]
    text = text.strip().strip("'\"`*_").strip()
    text = re.sub(r"\s+", " ", text).rstrip(".,;").strip()
    return text.lower()


def _bracketed(text: str) -> list[str] | None:
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end <= start:
        return None
    body = text[start : end + 1]
    # adjacent quoted items lack a comma (Python would silently concatenate them): insert one first
    fixed = re.sub(r"""(['"])[ \t]*\n?[ \t]*(['"])""", r"\1, \2", body)
    for attempt in (fixed, body):
        for parse in (ast.literal_eval, json.loads):
            try:
                value = parse(attempt)
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):  # all literal_eval raises
                continue
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return value
    quoted = [a or b for a, b in _QUOTED.findall(body)]
    return quoted or None


def parse_attribute_list(text: str) -> list[str]:
    """The attribute names in an LLM answer: a Python/JSON list (commas optional) or numbered /
    bulleted lines, stray prose ignored; normalised and deduplicated in order. Any text gives
    a non-empty list or `NoAttributeList`, never another exception."""
    items = _bracketed(text)
    if items is None:
        items = [m.group(1) for line in text.splitlines() if (m := _ITEM_LINE.match(line))]
    keys: list[str] = []
    for item in items:
        key = normalise_key(item)
        core = re.sub(r"\(.*?\)", "", key)  # examples in parentheses do not count as length
        if key and len(core.split()) <= _MAX_KEY_WORDS and key not in keys:
            keys.append(key)
    if not keys:
        raise NoAttributeList("no attribute list found in the answer")
    return keys


_TYPE_WORDS = [
    ("color", ("color", "colour", "hue", "tint")),
    ("texture", ("pattern", "texture", "marking", "stripe", "spot", "patch", "fur", "feather", "plumage", "coat")),
    ("shape", ("shape", "form", "contour", "outline", "profile", "curvature")),
    ("size", ("size", "length", "width", "height", "span", "proportion", "thickness", "number", "count")),
]


def attribute_type(key: str) -> str:
    """color, texture, shape, size or other, by the words of the key (first match in that order)."""
    words = key.lower()
    for kind, cues in _TYPE_WORDS:
        if any(cue in words for cue in cues):
            return kind
    return "other"
