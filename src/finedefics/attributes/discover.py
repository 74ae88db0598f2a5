"""Useful attribute discovery (eq. 2): attribute keys per super-category, each with a type."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from finedefics.attributes.backends import TextBackend
from finedefics.attributes.parsing import NoAttributeList, attribute_type, parse_attribute_list
from finedefics.attributes.prompts import DISCOVER, GENERAL_KEY
from finedefics.data.prepared import PreparedDataset

FINER_DIR = Path(__file__).resolve().parents[1] / "reference" / "finer_attributes"
FINER_FILES = {
    "bird": ["bird_attributes.txt"],
    "car": ["car_attributes.txt"],
    "dog": ["dog_attributes.txt"],
    "flower": ["flower_attributes.txt"],
    "pet": ["pet_cat_attributes.txt", "pet_dog_attributes.txt"],
}


@dataclass(frozen=True)
class AttributeKey:
    key: str
    type: str  # color | shape | texture | size | other
    general: bool = False

    def to_dict(self) -> dict:
        return {"key": self.key, "type": self.type, "general": self.general}


def with_general(keys: list[AttributeKey]) -> list[AttributeKey]:
    """The keys with the general description key appended (once)."""
    rest = [k for k in keys if k.key.lower() != GENERAL_KEY.lower()]
    return rest + [AttributeKey(GENERAL_KEY, "other", general=True)]


def typed(names: list[str]) -> list[AttributeKey]:
    return with_general([AttributeKey(n, attribute_type(n)) for n in names])


def static_keys(dataset: PreparedDataset, file: str | None) -> tuple[list[AttributeKey], str]:
    """Keys from `file`, else the world spec's own keys, else FineR's list; with the source."""
    if file:
        return typed(parse_attribute_list(Path(file).read_text())), file
    if dataset.attributes:
        keys = [AttributeKey(k, a.type) for k, a in dataset.attributes.items()]
        return with_general(keys), "world spec"
    files = FINER_FILES.get(dataset.super_category)
    if not files:
        raise ValueError(
            f"{dataset.name}: FineR has no attribute list for {dataset.super_category!r}; "
            "set attributes.discover.file or use the hf / openai backend"
        )
    names: list[str] = []
    for name in files:
        names += [n for n in parse_attribute_list((FINER_DIR / name).read_text()) if n not in names]
    return typed(names), "FineR: " + ", ".join(files)


def discover_prompt(dataset: PreparedDataset) -> str:
    return DISCOVER.format(super_category=dataset.super_category, class_unit=dataset.unit)


def llm_keys(backend: TextBackend, dataset: PreparedDataset, retries: int) -> tuple[list[AttributeKey], str]:
    """Ask the LLM (greedy first, then sampled retries); fail with the raw answers if none parses."""
    prompt = discover_prompt(dataset)
    answers = []
    for attempt in range(retries + 1):
        answer = backend.complete([prompt], temperature=0.0 if attempt == 0 else 0.7)[0]
        answers.append(answer)
        try:
            return typed(parse_attribute_list(answer)), answer
        except NoAttributeList:
            continue
    shown = " | ".join(repr(a[:300]) for a in answers)
    raise NoAttributeList(f"{dataset.name}: no attribute list in {len(answers)} answer(s): {shown}")


def load_keys(data: dict) -> list[AttributeKey]:
    """The keys of a keys.json document."""
    return [AttributeKey(k["key"], k["type"], k.get("general", False)) for k in data["keys"]]
