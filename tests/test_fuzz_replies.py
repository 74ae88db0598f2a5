"""Property-based tests of the parsers that read what models and servers send back: any input gives
a value or the parser's one documented error, never another exception."""

import json
import string

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from finedefics.attributes.backends import MalformedReply, reply_content, reply_text
from finedefics.attributes.parsing import NoAttributeList, normalise_key, parse_attribute_list
from finedefics.protocol import LETTERS, foci_answer, parse_choice

FUZZ = settings(max_examples=200, deadline=None)

# --------------------------------------------------------------------------- the LLM attribute-list parser

words = st.text(string.ascii_lowercase, min_size=1, max_size=8)
keys = st.lists(words, min_size=1, max_size=3).map(" ".join)
prose = st.text(st.characters(blacklist_characters="[]'\"", blacklist_categories=("Cs",)), max_size=40)
list_syntax = st.sampled_from(["[", "]", "'", '"', ",", "\n", " ", "(", ")", "{", "}", ":", "-", "1.", "*", "\\"])


def attribute_list_answers():
    """Answers as models write them: a list in Python or JSON syntax or as bullets, amid prose,
    with their syntax broken at random."""
    rendered = st.lists(keys, min_size=1, max_size=6).flatmap(
        lambda items: st.sampled_from(
            [
                str(items),
                json.dumps(items),
                "[" + "\n".join(f"'{i}'" for i in items) + "]",  # commas missing
                "\n".join(f"{n + 1}. {i}" for n, i in enumerate(items)),
                "\n".join(f"- {i}: an explanation" for i in items),
            ]
        )
    )
    answer = st.tuples(prose, rendered, prose).map("".join)
    mutated = st.tuples(answer, st.integers(0, 300), list_syntax).map(lambda t: t[0][: t[1]] + t[2] + t[0][t[1] :])
    return st.one_of(answer, mutated, st.text(max_size=200), st.lists(list_syntax, max_size=60).map("".join))


def check_attribute_list(text: str) -> list[str] | None:
    try:
        parsed = parse_attribute_list(text)
    except NoAttributeList:
        return None
    assert isinstance(parsed, list) and parsed and all(isinstance(k, str) and k for k in parsed)
    assert len(set(parsed)) == len(parsed)  # deduplicated
    return parsed


@FUZZ
@given(attribute_list_answers())
@example("[" * 100_000 + "]" * 100_000)  # was RecursionError (json)
@example("[" + '{"a":' * 5000 + "1" + "}" * 5000 + "]")  # was RecursionError (json)
@example("[" + "+".join(["1"] * 100_000) + "]")  # was RecursionError (ast)
@example("[" + "-" * 100_000 + "1]")  # was MemoryError (ast)
@example("['a\x00b']")
@example("[" + "9" * 10_000 + "]")
def test_attribute_list_parser_gives_a_list_or_no_attribute_list(text):
    check_attribute_list(text)


@FUZZ
@given(st.lists(keys, min_size=1, max_size=8), prose, prose)
def test_a_python_or_json_list_amid_prose_gives_its_keys_in_order(items, before, after):
    expected = list(dict.fromkeys(normalise_key(i) for i in items))
    assert parse_attribute_list(f"{before}{items}{after}") == expected
    assert parse_attribute_list(f"{before}{json.dumps(items)}{after}") == expected


# --------------------------------------------------------------------------- the answer-letter parser


FAMILY = st.sampled_from(["idefics2", "llava", "qwen2_5_vl", "blip-2"])


@FUZZ
@given(st.text(max_size=50), st.integers(1, len(LETTERS)), FAMILY)
def test_answer_letter_parser_gives_an_offered_letter_or_none(output, n_options, family):
    letter = parse_choice(output, family, n_options)
    assert letter is None or (letter in LETTERS[:n_options] and len(letter) == 1)
    if letter is not None:
        assert foci_answer(output, family)[0].upper() == letter


@FUZZ
@given(
    st.text(" \t\n", max_size=3),
    st.integers(0, len(LETTERS) - 1),
    st.booleans(),
    st.text(max_size=30),
    FAMILY,
    st.data(),
)
def test_an_answer_starting_with_an_offered_letter_gives_that_letter(space, index, lower, rest, family, data):
    n_options = data.draw(st.integers(index + 1, len(LETTERS)))
    letter = LETTERS[index].lower() if lower else LETTERS[index]
    assert parse_choice(space + letter + rest, family, n_options) == LETTERS[index]


# --------------------------------------------------------------------------- OpenAI-compatible replies

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


def near_replies():
    """Replies in the OpenAI shape with any level swapped for, or extended by, arbitrary JSON."""
    content = st.one_of(
        st.text(max_size=30),
        json_values,
        st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": json_values})),
    )
    message = st.one_of(
        st.fixed_dictionaries({"role": st.just("assistant"), "content": content}, optional={"refusal": json_values}),
        json_values,
    )
    choice = st.one_of(st.fixed_dictionaries({"index": st.integers(0, 3), "message": message}), json_values)
    choices = st.one_of(st.lists(choice, max_size=3), json_values)
    error = st.fixed_dictionaries({"message": json_values})
    return st.one_of(
        st.fixed_dictionaries({"choices": choices}, optional={"error": error, "object": json_values}), json_values
    )


def check_reply(payload) -> str | None:
    try:
        text = reply_content(payload)
    except MalformedReply as err:
        assert str(err)  # says what is wrong
        return None
    assert isinstance(text, str) and text == text.strip()
    return text


@FUZZ
@given(near_replies())
@example({"choices": []})
@example({"choices": [{"message": {"content": None}}]})
@example({"choices": [{"message": {"content": []}}]})
def test_a_decoded_reply_gives_its_text_or_malformed_reply(payload):
    check_reply(payload)


@FUZZ
@given(st.text(max_size=40), st.dictionaries(st.text(max_size=5), json_values, max_size=3))
def test_a_well_formed_reply_gives_its_stripped_content(content, extra):
    payload = {**extra, "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
    assert reply_text(json.dumps(payload)) == content.strip()
    parts = [{"type": "text", "text": content}, {"type": "text", "text": "!"}]
    assert reply_content({"choices": [{"message": {"content": parts}}]}) == (content + "!").strip()


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=100),
        near_replies().map(lambda p: json.dumps(p).encode()),
        st.tuples(near_replies(), st.integers(0, 200)).map(lambda t: json.dumps(t[0]).encode()[: t[1]]),  # cut off
        st.tuples(near_replies(), st.sampled_from(["utf-8", "utf-16", "utf-32", "latin-1"])).map(
            lambda t: json.dumps(t[0], ensure_ascii=False).encode(t[1], errors="replace")
        ),
    )
)
@example(b"[" * 100_000 + b"]" * 100_000)  # deeper than the JSON decoder recurses
@example(b"\xff\xfe\x00garbage")
@example(b"")
@example("1" * 10_000)  # more digits than int() takes
def test_a_reply_body_gives_its_text_or_malformed_reply(raw):
    try:
        text = reply_text(raw)
    except MalformedReply:
        return
    assert isinstance(text, str) and text == text.strip()


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        ({"choices": []}, "no choices"),
        ({"choices": [{"message": {"content": None}}]}, "message content is null"),
        ({"error": {"message": "overloaded"}}, "is an error: 'overloaded'"),
        ([1], "is an array, not an object"),
        ({"choices": [{}]}, "first choice has no message"),
    ],
)
def test_malformed_reply_says_what_is_wrong(payload, says):
    with pytest.raises(MalformedReply, match=says):
        reply_content(payload)
