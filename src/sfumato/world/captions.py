"""Captions of scenes, and the claims a caption (or a benchmark prompt) makes about an image.

A caption is written from an `Expectation`: a structured list of what it says (which objects,
how many, their attributes, relations, background). `check` judges every claim of an
Expectation against a list of objects: the Scene's own (ground truth; a caption must pass all)
or the ones the analyzer finds in pixels. Omitting a detail is allowed; claiming a false one is
not, so counts always cover every object that fits the words used.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from sfumato.world.scenes import (
    COLORS,
    ObjectSpec,
    Scene,
    as_random,
    identity,
    relation_holds,
    vocabulary,
)

NOT = "!"  # prefix of a negated attribute value: color="!red" means "not red"


class ObjectLike(Protocol):
    shape: str
    color: str
    pattern: str
    size: str
    x: float
    y: float

    @property
    def radius(self) -> float: ...


@dataclass(frozen=True)
class ObjectQuery:
    """Objects a prompt asks for; None = not said. A value "!v" means "anything but v"."""

    shape: str | None = None
    color: str | None = None
    pattern: str | None = None
    size: str | None = None
    count: int | None = None  # exact number of objects that fit every attribute; None: not said

    def fits(self, obj: ObjectLike, attributes: Sequence[str] = ("shape", "color", "pattern", "size")) -> bool:
        return all(_value_fits(getattr(self, a), getattr(obj, a)) for a in attributes)

    def words(self) -> str:
        said = [v for v in (self.size, self.pattern, self.color, self.shape) if v]
        return " ".join(v.replace(NOT, "not ") for v in said) or "object"


@dataclass(frozen=True)
class RelationQuery:
    a: int  # index into Expectation.objects
    relation: str  # one of scenes.RELATIONS
    b: int


@dataclass(frozen=True)
class Expectation:
    """What a prompt says about an image; any part may be left out."""

    background: str | None = None
    objects: tuple[ObjectQuery, ...] = ()
    relations: tuple[RelationQuery, ...] = ()


@dataclass(frozen=True)
class Claim:
    kind: str  # background | shape | color | pattern | size | count | position
    text: str

    def __str__(self) -> str:
        return self.text


def _value_fits(expected: str | None, actual: str) -> bool:
    if expected is None:
        return True
    if expected.startswith(NOT):
        return actual != expected[1:]
    return actual == expected


def check(expectation: Expectation, objects: Sequence[ObjectLike], background: str,
          strict: bool = True) -> dict[Claim, bool]:
    """Judge each claim of `expectation` against these objects and background.

    An attribute claim ("the circle is red") holds when some object has the query's shape and
    that attribute; a count claim when exactly `count` objects fit the whole query; a relation
    when some pair of fitting objects is so placed (strict: caption-clear; else lenient).
    """
    claims: dict[Claim, bool] = {}
    if expectation.background is not None:
        claims[Claim("background", f"background is {expectation.background}")] = _value_fits(
            expectation.background, background)
    for i, query in enumerate(expectation.objects):
        for attribute in ("shape", "color", "pattern", "size"):
            value = getattr(query, attribute)
            if value is not None:
                text = f"object {i} ({query.words()}): {attribute} {value.replace(NOT, 'not ')}"
                used = ("shape", attribute)
                claims[Claim(attribute, text)] = any(query.fits(o, used) for o in objects)
        if query.count is not None:
            fitting = sum(query.fits(o) for o in objects)
            claims[Claim("count", f"object {i} ({query.words()}): count {query.count}")] = (
                fitting == query.count)
    for rel in expectation.relations:
        qa, qb = expectation.objects[rel.a], expectation.objects[rel.b]
        holds = any(oa is not ob and qa.fits(oa) and qb.fits(ob)
                    and relation_holds(oa, ob, rel.relation, strict)
                    for oa in objects for ob in objects)
        claims[Claim("position", f"{qa.words()} {rel.relation} {qb.words()}")] = holds
    return claims


# ----------------------------------------------------------------------------- what to say

def _mention(rng: random.Random, group: list[ObjectSpec], scene: Scene) -> ObjectQuery:
    """Words for a group of identical objects that fit no other object of the scene."""
    obj = group[0]
    said = {"shape": obj.shape,
            "color": obj.color if rng.random() < 0.9 else None,
            "pattern": obj.pattern if obj.pattern != "plain" and rng.random() < 0.8 else None,
            "size": obj.size if rng.random() < 0.3 else None}
    for attribute in ("color", "pattern", "size"):  # add words until only the group fits
        query = ObjectQuery(**said, count=len(group))
        if sum(query.fits(o) for o in scene.objects) == len(group):
            return query
        said[attribute] = getattr(obj, attribute)
    return ObjectQuery(**said, count=len(group))


def describe_scene(scene: Scene, rng: random.Random) -> Expectation:
    """A random true Expectation of the scene: every object mentioned, details maybe omitted."""
    groups: dict[tuple[str, str, str, str], list[ObjectSpec]] = {}
    for obj in scene.objects:
        groups.setdefault(identity(obj), []).append(obj)
    mentions = [_mention(rng, g, scene) for g in groups.values()]
    order = list(range(len(mentions)))
    rng.shuffle(order)
    mentions = [mentions[i] for i in order]
    members = [list(groups.values())[i] for i in order]
    relations: tuple[RelationQuery, ...] = ()
    singles = [i for i, m in enumerate(mentions) if m.count == 1]
    if len(singles) >= 2 and rng.random() < (0.85 if len(mentions) == 2 else 0.5):
        a, b = rng.sample(singles, 2)
        holding = [r for r in ("left of", "right of", "above", "below", "next to")
                   if relation_holds(members[a][0], members[b][0], r)]
        if holding:
            relations = (RelationQuery(a, rng.choice(holding), b),)
    background = scene.background if rng.random() < 0.9 else None
    return Expectation(background, tuple(mentions), relations)


# ----------------------------------------------------------------------------- words

NUMBERS = {2: "two", 3: "three", 4: "four"}
PLURALS = {"cross": "crosses"}
PATTERN_WORDS = {  # (adjectives before the noun, phrases after it)
    "plain": (["plain"], ["without a pattern"]),
    "striped": (["striped"], ["with stripes"]),
    "dotted": (["dotted", "polka-dot"], ["with dots", "with polka dots"]),
    "checkered": (["checkered"], ["with a checkered pattern"]),
}
SIZE_WORDS = {"small": ["small", "little"], "medium": ["medium", "medium-sized"],
              "large": ["large", "big"]}
RELATION_WORDS = {
    "left of": ["to the left of", "left of", "on the left of"],
    "right of": ["to the right of", "right of", "on the right of"],
    "above": ["above", "over"],
    "below": ["below", "under", "beneath"],
    "next to": ["next to", "beside"],
}
BACKGROUND_AFTER = {  # phrases after the objects; "{}" is a colour name
    "color": ["on a {} background", "against a {} background", "on {}"],
    "gradient sky": ["against a blue sky", "in the sky", "in a clear blue sky"],
    "grass and sky": ["in a grassy field", "on grass under a blue sky", "over a green meadow"],
    "night": ["under a night sky", "at night", "against a starry night sky"],
}
BACKGROUND_FIRST = {  # "<phrase> with <objects>"
    "color": ["a {} background", "a plain {} background"],
    "gradient sky": ["a blue sky", "a clear sky"],
    "grass and sky": ["a grassy field", "a green meadow under a blue sky"],
    "night": ["a starry night sky", "a night sky"],
}
PREFIXES = ["", "", "", "a picture of ", "an image of ", "a drawing of ", "a simple illustration of "]


def _object_phrase(rng: random.Random, query: ObjectQuery) -> str:
    count = query.count or 1
    noun = query.shape if count == 1 else PLURALS.get(query.shape, query.shape + "s")
    before, after = [], ""
    if query.size:
        before.append(rng.choice(SIZE_WORDS[query.size]))
    if query.pattern:
        adjectives, phrases = PATTERN_WORDS[query.pattern]
        if rng.random() < 0.6:
            before.append(rng.choice(adjectives))
        else:
            after = " " + rng.choice(phrases)
    if query.color:
        before.append(query.color)
    words = " ".join([*before, noun]) + after
    if count > 1:
        return f"{NUMBERS[count]} {words}"
    return f'{rng.choice(["a", "a", "a", "one", "a single"])} {words}'


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _background_phrase(rng: random.Random, background: str, table: dict[str, list[str]]) -> str:
    kind = "color" if background in COLORS else background
    return rng.choice(table[kind]).format(background)


def _fix_articles(text: str) -> str:
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def caption_text(expectation: Expectation, rng: random.Random) -> str:
    """Words for an Expectation (any of many phrasings)."""
    return _fix_articles(_phrase(expectation, rng))


def _phrase(expectation: Expectation, rng: random.Random) -> str:
    phrases = [_object_phrase(rng, q) for q in expectation.objects]
    parts: list[str] = []
    for rel in expectation.relations:
        words = rng.choice(RELATION_WORDS[rel.relation])
        parts.append(f"{phrases[rel.a]} {words} {phrases[rel.b]}")
    related = {i for rel in expectation.relations for i in (rel.a, rel.b)}
    rest = [p for i, p in enumerate(phrases) if i not in related]
    objects = ", and ".join(parts + ([_join(rest)] if rest else []))
    prefix = rng.choice(PREFIXES)
    if expectation.background is None:
        return prefix + objects
    if rng.random() < 0.25:
        return f"{prefix}{_background_phrase(rng, expectation.background, BACKGROUND_FIRST)} with {objects}"
    return f"{prefix}{objects} {_background_phrase(rng, expectation.background, BACKGROUND_AFTER)}"


def describe(scene: Scene, rng) -> tuple[str, Expectation]:
    """A caption of the scene and the structured claims it makes (all true of the scene)."""
    rng = as_random(rng)
    expectation = describe_scene(scene, rng)
    return caption_text(expectation, rng), expectation


def caption(scene: Scene, rng) -> str:
    return describe(scene, rng)[0]


def plain_caption(scene: Scene) -> str:
    """The scene in one fixed wording, every detail named: "a large red star on a white background".

    Two objects that lie clearly side by side or one above the other are joined by their relation:
    "a large red star to the left of a large blue circle on a white background".

    A curriculum's first stage (a UNet recipe's `data.captions = "plain"`): from scratch, a UNet of
    the shipped size learns shapes about twice as fast from one wording as from the world's many
    (session 20, scripts/shape_learning.py: 0.41 against 0.23 of shapes right after ~90k samples)."""
    def phrase(obj: ObjectSpec) -> str:
        pattern = "" if obj.pattern == "plain" else f"{obj.pattern} "
        return f"a {obj.size} {obj.color} {pattern}{obj.shape}"

    kind = "color" if scene.background in COLORS else scene.background
    background = BACKGROUND_AFTER[kind][0].format(scene.background)
    objects = _join([phrase(o) for o in scene.objects])  # "a" fits: a size word comes first
    if len(scene.objects) == 2:  # a lined-up pair says how it lies (a relation curriculum)
        a, b = scene.objects
        holding = [r for r in ("left of", "right of", "above", "below") if relation_holds(a, b, r)]
        if holding:
            objects = f"{phrase(a)} {RELATION_WORDS[holding[0]][0]} {phrase(b)}"
    return f"{objects} {background}"


def full_expectation(scene: Scene) -> Expectation:
    """Everything about the scene: each group of identical objects with its count."""
    groups: dict[tuple[str, str, str, str], int] = {}
    for obj in scene.objects:
        groups[identity(obj)] = groups.get(identity(obj), 0) + 1
    queries = tuple(ObjectQuery(shape, color, pattern, size, count)
                    for (shape, color, pattern, size), count in groups.items())
    return Expectation(scene.background, queries)


# The words swap_word swaps, by kind: a caption's shape, colour, relation or number swapped makes it false
# of its scene. Only the training split's shapes: a held-out concept's word must reach no model before its
# LoRA does (models up to session 24 had "hexagon" and "crescent" in CLIP's hard negatives). A relation
# swaps to its opposite ("next to" has none); "over" and "under" are left out, as the background phrases
# use them ("under a night sky").
SWAP_KINDS: dict[str, Sequence[str] | Mapping[str, str]] = {
    "shape": tuple(vocabulary("train")[0]),
    "colour": tuple(COLORS),
    "relation": {"left": "right", "right": "left", "above": "below", "below": "above", "beneath": "above"},
    "number": tuple(NUMBERS.values()),
}


def swap_word(caption: str, words: Sequence[str] | Mapping[str, str], rng: random.Random) -> str | None:
    """The caption with its first word of `words` (singular or plural, a whole word: "cross" not in
    "crosses") replaced by another of them in the same number (by its opposite, where `words` maps each
    word to one); None if it has none. A caption that now says something false of its scene: a hard
    negative for CLIP, a probe for the UNet."""
    forms = {w: w for w in words} | {PLURALS.get(w, w + "s"): w for w in words}
    match = re.search(r"\b(" + "|".join(sorted(forms, key=len, reverse=True)) + r")\b", caption)
    if match is None:
        return None
    word = forms[match[1]]
    other = words[word] if isinstance(words, Mapping) else rng.choice([w for w in words if w != word])
    if match[1] != word:  # plural
        other = PLURALS.get(other, other + "s")
    return caption[: match.start()] + other + caption[match.end():]
