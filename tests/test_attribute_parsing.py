import re

import pytest

from finedefics.attributes.discover import FINER_DIR, static_keys
from finedefics.attributes.parsing import NoAttributeList, attribute_type, parse_attribute_list
from finedefics.attributes.prompts import GENERAL_KEY
from finedefics.data.prepared import Attribute, PreparedDataset


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("['wing color', 'Beak Shape', 'tail shape']", ["wing color", "beak shape", "tail shape"]),
        ('Here you go: ["wing color", "beak shape"] Hope this helps!', ["wing color", "beak shape"]),
        ("['fur length' 'fur density', 'eye color']", ["fur length", "fur density", "eye color"]),
        (
            "Sure!\n```python\n[\n  'wing color'\n  'wing color',\n  \"tail shape\",\n]\n```",
            ["wing color", "tail shape"],
        ),
        (
            "Useful attributes:\n1. Wing color: the hue of the wings\n2) beak shape\n3. Tail shape - forked or not.\nThat is all.",
            ["wing color", "beak shape", "tail shape"],
        ),
        (
            "- **Petal color**\n* petal shape\n\u2022 Leaf shape.\nThese help a lot.",
            ["petal color", "petal shape", "leaf shape"],
        ),
        (
            "['wing color', 'it is a really long explanation that goes on and on about birds and their many features']",
            ["wing color"],
        ),
    ],
)
def test_parses_messy_llm_answers(answer, expected):
    assert parse_attribute_list(answer) == expected


@pytest.mark.parametrize("answer", ["I cannot help with that.", "", "[]", "[1, 2, 3]"])
def test_no_usable_list_is_an_error(answer):
    with pytest.raises(NoAttributeList):
        parse_attribute_list(answer)


@pytest.mark.parametrize("path", sorted(FINER_DIR.glob("*.txt")), ids=lambda p: p.name)
def test_every_finer_list_parses_to_its_quoted_items(path):
    text = path.read_text()
    quoted = [q.strip().lower() for q in re.findall(r"'([^']*)'", text)]
    assert parse_attribute_list(text) == list(dict.fromkeys(quoted))


@pytest.mark.parametrize(
    "key, kind",
    [
        ("wing color", "color"),
        ("coat colour", "color"),
        ("breast pattern", "texture"),
        ("fur texture", "texture"),
        ("bill shape", "shape"),
        ("tail length", "size"),
        ("body size", "size"),
        ("number of engines", "size"),
        ("habitat", "other"),
    ],
)
def test_attribute_types(key, kind):
    assert attribute_type(key) == kind


def real(name: str, super_category: str) -> PreparedDataset:
    return PreparedDataset(name, "real", super_category, f"{super_category}s", "types", [])


def test_static_keys_of_the_world_finer_and_a_file(tmp_path):
    attributes = {"wing color": Attribute("color", ["red"]), "beak shape": Attribute("shape", ["hooked"])}
    world = PreparedDataset("toy-bird", "world", "bird", "birds", "species", [], attributes)
    keys, source = static_keys(world, None)
    assert [(k.key, k.type, k.general) for k in keys] == [
        ("wing color", "color", False),
        ("beak shape", "shape", False),
        (GENERAL_KEY, "other", True),
    ]
    assert source == "world spec"
    pets, source = static_keys(real("pet-37", "pet"), None)
    names = [k.key for k in pets]
    assert "coat color" in names and "ear shape" in names and len(names) == len(set(names)) and names[-1] == GENERAL_KEY
    assert "pet_cat_attributes.txt" in source and "pet_dog_attributes.txt" in source
    with pytest.raises(ValueError, match="FineR has no attribute list for 'aircraft'"):
        static_keys(real("aircraft-102", "aircraft"), None)
    listing = tmp_path / "aircraft.txt"
    listing.write_text("1. wing shape\n2. engine number\n3. tail color\n")
    keys, _ = static_keys(real("aircraft-102", "aircraft"), str(listing))
    assert [(k.key, k.type) for k in keys[:3]] == [
        ("wing shape", "shape"),
        ("engine number", "size"),
        ("tail color", "color"),
    ]
