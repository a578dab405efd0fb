"""A1111 prompt syntax: LoRA tags, attention weights and BREAK.

Pure Python (no torch) so that the CLI and the server can check a prompt cheaply.

Attention syntax, as in A1111's `prompt_parser.parse_prompt_attention`:

    (word)        weight x 1.1          ((word))   x 1.21
    [word]        weight / 1.1          (word:1.5) x 1.5
    \\( \\) \\[ \\] \\\\   the literal character
    BREAK         start a new 75-token chunk

A bracket left open applies to the end of the prompt; a closing bracket with nothing open is
kept as text. Written here by hand because no maintained library parses this exact syntax
(compel's is different), and images must match A1111's for the same prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sfumato.errors import ParamError

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

# parse_weighted marks a BREAK with this (text, weight) pair, as A1111 does.
BREAK = ("BREAK", -1.0)

# <lora:name>, <lora:name:te>, <lora:name:te:unet>; A1111 also accepts the LyCORIS spelling.
LORA_TAG = re.compile(r"<(?:lora|lyco):([^>]*)>")

# One token of the attention syntax per match, tried in this order.
ATTENTION_TOKEN = re.compile(
    r"""
    \\[()\[\]\\]            # escaped bracket or backslash: the literal character
    | \\                    # a lone backslash: dropped, as A1111 does
    | \(                    # open round
    | \[                    # open square
    | :([+-]?[.\d]+)\)       # explicit weight closing a round bracket (no spaces, as A1111)
    | \)                    # close round
    | \]                    # close square
    | [^\\()\[\]:]+         # plain text
    | :                     # a colon that is not a weight
    """,
    re.VERBOSE,
)

BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")


@dataclass(frozen=True)
class LoraTag:
    name: str
    te_weight: float
    unet_weight: float


def _parse_weight(text: str, tag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ParamError(
            f"LoRA tag {tag!r}: weight {text!r} is not a number; "
            "use <lora:name>, <lora:name:weight> or <lora:name:text_weight:unet_weight>"
        ) from None


def _parse_lora_tag(body: str, tag: str) -> LoraTag:
    name, *weights = (part.strip() for part in body.split(":"))
    if not name or len(weights) > 2:
        raise ParamError(
            f"LoRA tag {tag!r} is malformed; "
            "use <lora:name>, <lora:name:weight> or <lora:name:text_weight:unet_weight>"
        )
    te_weight = _parse_weight(weights[0], tag) if weights else 1.0
    # A single weight applies to both the text encoder and the UNet.
    unet_weight = _parse_weight(weights[1], tag) if len(weights) == 2 else te_weight
    return LoraTag(name, te_weight, unet_weight)


def extract_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """Remove <lora:...> tags from a prompt; return the rest of the prompt and the tags in order."""
    tags = [_parse_lora_tag(m.group(1), m.group(0)) for m in LORA_TAG.finditer(prompt)]
    return LORA_TAG.sub("", prompt), tags


def _text_with_breaks(text: str) -> list[list]:
    parts = BREAK_WORD.split(text)
    pieces: list[list] = [[parts[0], 1.0]]
    for part in parts[1:]:
        pieces += [list(BREAK), [part, 1.0]]
    return pieces


def _is_break(piece: list) -> bool:
    return tuple(piece) == BREAK


def _merge_equal_weights(pieces: list[list]) -> list[tuple[str, float]]:
    merged: list[list] = []
    for piece in pieces:
        if merged and merged[-1][1] == piece[1] and not _is_break(piece) and not _is_break(merged[-1]):
            merged[-1][0] += piece[0]
        else:
            merged.append(list(piece))
    return [(text, weight) for text, weight in merged]


def parse_weighted(prompt: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs; a BREAK keyword appears as the pair `BREAK`.

    >>> parse_weighted("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    pieces: list[list] = []  # [text, weight], mutable so open brackets can scale them later
    open_round: list[int] = []  # index into pieces where each open bracket started
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        # A1111 scales a BREAK inside brackets too, which turns it into the word "BREAK" with a
        # negative weight; we keep it a BREAK.
        for piece in pieces[start:]:
            if not _is_break(piece):
                piece[1] *= factor

    for match in ATTENTION_TOKEN.finditer(prompt):
        token, explicit_weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(pieces))
        elif token == "[":
            open_square.append(len(pieces))
        elif explicit_weight is not None and open_round:
            scale_from(open_round.pop(), _explicit_weight(explicit_weight))
        elif token == ")" and open_round:
            scale_from(open_round.pop(), ROUND_MULTIPLIER)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_MULTIPLIER)
        else:  # text, or a bracket with nothing to close: kept as written
            pieces += _text_with_breaks(token)

    # Brackets never closed apply to the end of the prompt.
    for start in open_round:
        scale_from(start, ROUND_MULTIPLIER)
    for start in open_square:
        scale_from(start, SQUARE_MULTIPLIER)

    return _merge_equal_weights(pieces) if pieces else [("", 1.0)]


def _explicit_weight(text: str) -> float:
    try:
        return float(text)
    except ValueError:  # e.g. "1.2.3": A1111 would crash; say what is allowed instead
        raise ParamError(
            f"prompt weight {text!r} is not a number; write (text:1.2) with a decimal weight"
        ) from None
