import pytest
from hypothesis import given
from hypothesis import strategies as st

from sfumato.errors import ParamError
from sfumato.prompt import BREAK, LoraTag, extract_lora_tags, parse_weighted

# The examples in the docstring of A1111's modules/prompt_parser.py:parse_prompt_attention, with
# the results printed there.
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (
        "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
        [
            ("a ", 1.0),
            ("house", 1.5730000000000004),
            (" ", 1.1),
            ("on", 1.0),
            (" a ", 1.1),
            ("hill", 0.55),
            (", sun, ", 1.1),
            ("sky", 1.4641000000000006),
            (".", 1.1),
        ],
    ),
]


@pytest.mark.parametrize(("prompt", "expected"), A1111_EXAMPLES)
def test_a1111_docstring_examples(prompt, expected):
    assert parse_weighted(prompt) == expected


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("(word)", [("word", 1.1)]),
        ("((word))", [("word", 1.1 * 1.1)]),
        ("[word]", [("word", 1 / 1.1)]),
        ("[[word]]", [("word", 1 / 1.1 / 1.1)]),
        ("(word:1.5)", [("word", 1.5)]),
        ("(word:.5)", [("word", 0.5)]),
        ("((word:2))", [("word", 2.2)]),
        ("[(word)]", [("word", 1.1 / 1.1)]),
        ("\\(word\\)", [("(word)", 1.0)]),
        ("a \\\\ b", [("a \\ b", 1.0)]),
        ("stray) and ]", [("stray) and ]", 1.0)]),  # closers with nothing open stay text
        ("a:b", [("a:b", 1.0)]),  # a colon without a weight is text
        ("(a: 1.5)", [("a: 1.5", 1.1)]),  # A1111 allows no space before the weight
        ("[unclosed", [("unclosed", 1 / 1.1)]),
        ("", [("", 1.0)]),
    ],
)
def test_attention_rules(prompt, expected):
    got = parse_weighted(prompt)
    assert [text for text, _ in got] == [text for text, _ in expected]
    assert [weight for _, weight in got] == pytest.approx([weight for _, weight in expected])


def test_break_is_a_marker_between_texts():
    assert parse_weighted("a cat BREAK a dog") == [("a cat", 1.0), BREAK, ("a dog", 1.0)]
    assert parse_weighted("(a BREAK b)") == [("a", 1.1), BREAK, ("b", 1.1)]
    # Only the whole upper-case word: "BREAKFAST" and "break" are text.
    assert parse_weighted("BREAKFAST break") == [("BREAKFAST break", 1.0)]


def test_malformed_weight_raises_param_error():
    with pytest.raises(ParamError, match="not a number"):
        parse_weighted("(word:1.2.3)")


@given(st.text(alphabet=st.characters(blacklist_characters="\\()[]:")))
def test_plain_text_is_one_piece_of_weight_one(text):
    # Any text without syntax characters (and without the BREAK word) comes back unchanged.
    pieces = parse_weighted(text)
    if "BREAK" not in text:
        assert pieces == [(text, 1.0)]


@given(st.lists(st.sampled_from(["a", " ", "(", ")", "[", "]", "(b:0.5)"]), max_size=30))
def test_weights_are_positive_and_text_is_preserved(parts):
    prompt = "".join(parts)
    pieces = parse_weighted(prompt)
    assert all(weight > 0 for _, weight in pieces)
    letters = "".join(text for text, _ in pieces)
    assert letters.count("a") == prompt.count("a") and letters.count("b") == prompt.count("b")


@pytest.mark.parametrize(
    ("prompt", "clean", "tags"),
    [
        ("a cat", "a cat", []),
        ("a cat <lora:style>", "a cat ", [LoraTag("style", 1.0, 1.0)]),
        ("<lora:style:0.8>a cat", "a cat", [LoraTag("style", 0.8, 0.8)]),
        ("a <lora:x:0.8:0.5>cat", "a cat", [LoraTag("x", 0.8, 0.5)]),
        ("<lora:a b-c.v2:-1>, <lyco:d:0>", ", ", [LoraTag("a b-c.v2", -1.0, -1.0), LoraTag("d", 0.0, 0.0)]),
        ("<hypernet:x:1> stays", "<hypernet:x:1> stays", []),
    ],
)
def test_extract_lora_tags(prompt, clean, tags):
    assert extract_lora_tags(prompt) == (clean, tags)


@pytest.mark.parametrize("tag", ["<lora:x:abc>", "<lora:x:1:2:3>", "<lora::1>", "<lora:x:1:>"])
def test_bad_lora_tag_raises_param_error(tag):
    with pytest.raises(ParamError, match="lora"):
        extract_lora_tags(f"a cat {tag}")
