"""The prompt-adherence suite: prompts of the shapes world and what each one claims.

    prompts = read_suite()                    # the shipped, versioned suite (suite_v1.jsonl)
    prompts = read_suite("mine.jsonl")        # a user's suite: same format, or bare scene specs

One JSON object a line: {"id", "category", "prompt", "negative_prompt", "expectation"}. The
shipped file is made once by `build_suite(SUITE_SEED)`; a test checks the two agree, so the
suite only changes together with SUITE_VERSION. Prompts are written by the captioner itself
(`captions.caption_text`), so every word of them is one the model's text encoder was trained on.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from sfumato.errors import SfumatoError
from sfumato.files import write_bytes_atomic
from sfumato.world.captions import NOT, Expectation, ObjectQuery, RelationQuery, caption_text, check
from sfumato.world.scenes import (
    BACKGROUND_KINDS,
    COLORS,
    PATTERNS,
    RELATIONS,
    SHAPES,
    SIZES,
    ObjectSpec,
    Scene,
    contrasts,
    held_out,
    vocabulary,
)

SUITE_VERSION = "v1"
SUITE_SEED = 0
SUITE_FILE = f"suite_{SUITE_VERSION}.jsonl"
EXCLUDED_FROM_OVERALL = ("concept",)  # taught later by a LoRA: base training never saw it
BACKGROUNDS = (*COLORS, *BACKGROUND_KINDS)


@dataclass(frozen=True)
class SuitePrompt:
    id: str
    category: str
    prompt: str
    negative_prompt: str
    expectation: Expectation


# ----------------------------------------------------------------------------- building v1

def _train_shapes() -> list[str]:
    return vocabulary("train")[0]


def _train_patterns() -> list[str]:
    return [p for p in vocabulary("train")[1] if p != "plain"]


def _seen_in_training(shape: str, color: str | None = None, pattern: str = "plain") -> bool:
    obj = ObjectSpec(shape, color or "red", "medium", 0.5, 0.5, pattern)
    return not held_out().is_heldout_pair(obj) and not held_out().is_concept(obj)


def _train_color(rng: random.Random, shape: str, avoid: tuple[str, ...] = ()) -> str:
    return rng.choice([c for c in COLORS if c not in avoid and _seen_in_training(shape, c)])


def _single_object(rng: random.Random) -> tuple[Expectation, str]:
    return Expectation(objects=(ObjectQuery(rng.choice(_train_shapes())),)), ""


def _colors(rng: random.Random) -> tuple[Expectation, str]:
    shape = rng.choice(_train_shapes())
    return Expectation(objects=(ObjectQuery(shape, _train_color(rng, shape)),)), ""


def _two_objects(rng: random.Random) -> tuple[Expectation, str]:
    a, b = rng.sample(_train_shapes(), 2)
    return Expectation(objects=(ObjectQuery(a), ObjectQuery(b))), ""


def _counting(rng: random.Random) -> tuple[Expectation, str]:
    shape = rng.choice(_train_shapes())
    color = _train_color(rng, shape) if rng.random() < 0.5 else None
    return Expectation(objects=(ObjectQuery(shape, color, count=rng.choice([1, 2, 3, 4])),)), ""


def _position(rng: random.Random) -> tuple[Expectation, str]:
    a, b = rng.sample(_train_shapes(), 2)
    relation = rng.choice([r for r in RELATIONS if r != "next to"])  # GenEval's four
    if rng.random() < 0.5:  # training captions of related objects usually name colours
        ca = _train_color(rng, a)
        queries = (ObjectQuery(a, ca), ObjectQuery(b, _train_color(rng, b, (ca,))))
    else:
        queries = (ObjectQuery(a), ObjectQuery(b))
    return Expectation(objects=queries, relations=(RelationQuery(0, relation, 1),)), ""


def _color_attribution(rng: random.Random) -> tuple[Expectation, str]:
    a, b = rng.sample(_train_shapes(), 2)
    ca = _train_color(rng, a)
    return Expectation(objects=(ObjectQuery(a, ca), ObjectQuery(b, _train_color(rng, b, (ca,))))), ""


def _background(rng: random.Random) -> tuple[Expectation, str]:
    shape, background = rng.choice(_train_shapes()), rng.choice(BACKGROUNDS)
    color = None
    if rng.random() < 0.5:
        color = rng.choice([c for c in COLORS if _seen_in_training(shape, c)
                            and contrasts(c, "plain", background)])
    return Expectation(background, (ObjectQuery(shape, color),)), ""


def _pattern(rng: random.Random) -> tuple[Expectation, str]:
    pattern = rng.choice(_train_patterns())
    shape = rng.choice([s for s in _patternable_shapes() if _seen_in_training(s, None, pattern)])
    color = _train_color(rng, shape) if rng.random() < 0.5 else None
    return Expectation(objects=(ObjectQuery(shape, color, pattern),)), ""


def _heldout_combination(rng: random.Random) -> tuple[Expectation, str]:
    rules = held_out()
    pairs = [("color", p) for p in sorted(rules.shape_color)] + [("pattern", p) for p in sorted(rules.shape_pattern)]
    kind, (shape, value) = rng.choice(pairs)
    return Expectation(objects=(ObjectQuery(shape, **{kind: value}),)), ""


def _negative(rng: random.Random) -> tuple[Expectation, str]:
    shape = rng.choice(_train_shapes())
    color = rng.choice(list(COLORS))
    return Expectation(objects=(ObjectQuery(shape, NOT + color),)), color


def _concept(rng: random.Random) -> tuple[Expectation, str]:
    rules = held_out()
    if rng.random() < 0.6:
        query = ObjectQuery(rng.choice(sorted(rules.concept_shapes)), rng.choice([None, *COLORS]))
    else:
        shape = rng.choice([s for s in _patternable_shapes() if s not in rules.concept_shapes])
        query = ObjectQuery(shape, rng.choice([None, *COLORS]), rng.choice(sorted(rules.concept_patterns)))
    return Expectation(objects=(query,)), ""


def _patternable_shapes() -> list[str]:
    return [s for s in SHAPES if s not in ("ring", "cross", "crescent")]  # too thin for a pattern


Draw = Callable[[random.Random], tuple[Expectation, str]]
# category -> (prompts in v1, what one prompt asks for). About 400 prompts without "concept".
CATEGORIES: dict[str, tuple[int, Draw]] = {
    "single_object": (32, _single_object),
    "colors": (48, _colors),
    "two_objects": (40, _two_objects),
    "counting": (48, _counting),
    "position": (48, _position),
    "color_attribution": (48, _color_attribution),
    "background": (40, _background),
    "pattern": (32, _pattern),
    "heldout_combinations": (30, _heldout_combination),
    "negative": (36, _negative),
    "concept": (30, _concept),
}


def prompt_words(expectation: Expectation, rng: random.Random) -> str:
    """The prompt for an expectation; negated attributes are left to the negative prompt."""
    def positive(value: str | None) -> str | None:
        return None if value is None or value.startswith(NOT) else value

    said = tuple(replace(q, color=positive(q.color), pattern=positive(q.pattern), size=positive(q.size))
                 for q in expectation.objects)
    background = positive(expectation.background)
    return caption_text(replace(expectation, objects=said, background=background), rng)


def build_suite(seed: int = SUITE_SEED) -> list[SuitePrompt]:
    """The v1 suite: per category, distinct (prompt, negative prompt) pairs, seeded."""
    rng = random.Random(f"sfumato-suite/{SUITE_VERSION}/{seed}")
    prompts = []
    for category, (count, draw) in CATEGORIES.items():
        seen: set[tuple[str, str]] = set()
        while len(seen) < count:
            expectation, negative = draw(rng)
            text = prompt_words(expectation, rng)
            if (text, negative) not in seen:
                seen.add((text, negative))
                prompts.append(SuitePrompt(f"{category}-{len(seen):03d}", category, text, negative, expectation))
    return prompts


# ----------------------------------------------------------------------------- JSONL

def expectation_to_dict(expectation: Expectation) -> dict:
    """Only what is said: None fields are left out, so lines stay short and readable."""
    data: dict = {}
    if expectation.background is not None:
        data["background"] = expectation.background
    data["objects"] = [{k: v for k, v in vars(q).items() if v is not None} for q in expectation.objects]
    if expectation.relations:
        data["relations"] = [vars(r) for r in expectation.relations]
    return data


def suite_lines(prompts: list[SuitePrompt]) -> str:
    return "".join(json.dumps({"id": p.id, "category": p.category, "prompt": p.prompt,
                               "negative_prompt": p.negative_prompt,
                               "expectation": expectation_to_dict(p.expectation)}) + "\n"
                   for p in prompts)


def write_suite(prompts: list[SuitePrompt], path: str | Path) -> Path:
    return write_bytes_atomic(Path(path), suite_lines(prompts).encode())


def read_suite(path: str | Path | None = None) -> list[SuitePrompt]:
    """Read a suite file (None: the shipped one). Lines are suite entries or bare scene specs
    ({"background", "objects": [ObjectSpec fields]}), whose prompt is made by the captioner."""
    if path is None:
        text = resources.files("sfumato.world").joinpath(SUITE_FILE).read_text()
        name = SUITE_FILE
    else:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise SfumatoError(f"suite {path}: cannot read it ({error})") from None
        name = str(path)
    prompts = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                prompts.append(_parse_line(line, number))
            except (ValueError, TypeError, KeyError) as error:
                raise SfumatoError(f"suite {name}, line {number}: {error}") from None
    if not prompts:
        raise SfumatoError(f"suite {name}: no prompts in it (one JSON object per line)")
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        raise SfumatoError(f"suite {name}: ids must be unique; repeated: {sorted({i for i in ids if ids.count(i) > 1})}")
    return prompts


ENTRY_KEYS = {"id", "category", "prompt", "negative_prompt", "expectation"}


def _parse_line(line: str, number: int) -> SuitePrompt:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(data, dict):
        raise ValueError("each line must be a JSON object")
    if "objects" in data and "expectation" not in data:
        return _scene_entry(data, number)
    _expect_keys(data, ENTRY_KEYS, {"prompt", "expectation"}, "a suite entry")
    if not isinstance(data["prompt"], str) or not data["prompt"].strip():
        raise ValueError("'prompt' must be non-empty text")
    if not isinstance(data.get("negative_prompt", ""), str):
        raise ValueError("'negative_prompt' must be text")
    expectation = expectation_from_dict(data["expectation"])
    return SuitePrompt(str(data.get("id", f"line-{number}")), str(data.get("category", "custom")),
                       data["prompt"], data.get("negative_prompt", ""), expectation)


def _scene_entry(data: dict, number: int) -> SuitePrompt:
    """A bare scene spec: the prompt claims everything about it (a full expectation)."""
    from sfumato.world.captions import full_expectation

    _expect_keys(data, {"background", "objects", "id", "category"}, {"background", "objects"}, "a scene spec")
    objects = data["objects"]
    if not isinstance(objects, list) or not objects:
        raise ValueError("'objects' must be a non-empty list")
    specs = []
    for i, obj in enumerate(objects):
        _expect_keys(obj, {"shape", "color", "size", "x", "y", "pattern"}, {"shape", "color", "size", "x", "y"},
                     f"object {i}")
        specs.append(ObjectSpec(**obj))
    scene = Scene(data["background"], tuple(specs))
    expectation = full_expectation(scene)
    _validate(expectation)
    return SuitePrompt(str(data.get("id", f"line-{number}")), str(data.get("category", "custom")),
                       prompt_words(expectation, random.Random(number)), "", expectation)


def _expect_keys(data: object, allowed: set[str], required: set[str], what: str) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be a JSON object")
    unknown, missing = sorted(set(data) - allowed), sorted(required - set(data))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {what}; allowed: {sorted(allowed)}")
    if missing:
        raise ValueError(f"{what} lacks {missing}")


def expectation_from_dict(data: object) -> Expectation:
    _expect_keys(data, {"background", "objects", "relations"}, {"objects"}, "'expectation'")
    assert isinstance(data, dict)  # _expect_keys made sure; this tells the type checker
    if not isinstance(data["objects"], list) or not isinstance(data.get("relations", []), list):
        raise ValueError("'objects' and 'relations' must be lists")
    objects = []
    for i, obj in enumerate(data["objects"]):
        _expect_keys(obj, {"shape", "color", "pattern", "size", "count"}, set(), f"object {i}")
        objects.append(ObjectQuery(**obj))
    relations = []
    for i, rel in enumerate(data.get("relations", [])):
        _expect_keys(rel, {"a", "relation", "b"}, {"a", "relation", "b"}, f"relation {i}")
        relations.append(RelationQuery(**rel))
    expectation = Expectation(data.get("background"), tuple(objects), tuple(relations))
    _validate(expectation)
    return expectation


def _validate(expectation: Expectation) -> None:
    """Every value in the world's vocabulary ("!v" allowed), and at least one claim."""
    _check_value("background", expectation.background, BACKGROUNDS)
    for i, q in enumerate(expectation.objects):
        for name, allowed in (("shape", SHAPES), ("color", tuple(COLORS)), ("pattern", PATTERNS),
                              ("size", tuple(SIZES))):
            _check_value(f"object {i} {name}", getattr(q, name), allowed)
        if q.count is not None and (not isinstance(q.count, int) or not 0 <= q.count <= 4):
            raise ValueError(f"object {i} count must be an integer 0..4 (got {q.count!r})")
    for i, r in enumerate(expectation.relations):
        _check_value(f"relation {i}", r.relation, RELATIONS)
        for index in (r.a, r.b):
            if not isinstance(index, int) or not 0 <= index < len(expectation.objects):
                raise ValueError(f"relation {i} refers to object {index!r}; there are {len(expectation.objects)}")
    if not check(expectation, [], "white"):
        raise ValueError("the expectation claims nothing (name a shape, colour, pattern, count or background)")


def _check_value(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value is None:
        return
    if not isinstance(value, str) or value.removeprefix(NOT) not in allowed:
        raise ValueError(f"{name} {value!r} is not one of {', '.join(allowed)} (or !value for 'not value')")


# ----------------------------------------------------------------------------- ground truth

GRID = ((0.27, 0.27), (0.73, 0.27), (0.27, 0.73), (0.73, 0.73))
RELATION_PLACES = {"left of": ((0.27, 0.5), (0.73, 0.5)), "right of": ((0.73, 0.5), (0.27, 0.5)),
                   "above": ((0.5, 0.27), (0.5, 0.73)), "below": ((0.5, 0.73), (0.5, 0.27)),
                   "next to": ((0.3, 0.5), (0.65, 0.5))}


def scene_for(expectation: Expectation) -> Scene:
    """A scene that fulfils the expectation (for suites of at most four objects whose
    relations, if any, tie two single objects): proof that a prompt can be satisfied."""
    places = list(GRID)
    if expectation.relations:
        rel = expectation.relations[0]
        places = [RELATION_PLACES[rel.relation][0 if i == rel.a else 1] for i in range(2)]
    total = sum(q.count or 1 for q in expectation.objects)
    said = expectation.background
    backgrounds = [said] if said and not said.startswith(NOT) else [b for b in BACKGROUNDS if _fits(said, b)]
    # the first background on which some colour of every object stands out
    for background in backgrounds:
        objects = []
        for query in expectation.objects:
            pattern = _pick(query.pattern, PATTERNS)
            color = next((c for c in COLORS if _fits(query.color, c) and contrasts(c, pattern, background)), None)
            size = _pick(query.size, ("medium", "small") if total <= 2 else ("small", "medium"))
            objects += [ObjectSpec(query.shape or "circle", color or "", size, *places[len(objects) + k], pattern)
                        for k in range(query.count or 1)]
        if all(o.color for o in objects):
            return Scene(background, tuple(objects))
    raise ValueError(f"no scene fulfils {expectation}")


def _fits(expected: str | None, value: str) -> bool:
    return expected is None or (value != expected[1:] if expected.startswith(NOT) else value == expected)


def _pick(expected: str | None, options: tuple[str, ...]) -> str:
    return next(v for v in options if _fits(expected, v))
