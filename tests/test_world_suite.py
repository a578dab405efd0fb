import json
import random
import re
from importlib import resources

import pytest

from sfumato.errors import SfumatoError
from sfumato.world.analyzer import analyze
from sfumato.world.captions import NOT, check
from sfumato.world.render import render
from sfumato.world.scenes import ObjectSpec, Scene, contrasts, held_out, sample_scene
from sfumato.world.suite import (
    CATEGORIES,
    SUITE_FILE,
    build_suite,
    read_suite,
    scene_for,
    suite_lines,
    write_suite,
)


@pytest.fixture(scope="module")
def suite():
    return read_suite()


def test_shipped_file_is_what_the_generator_makes(suite):
    shipped = resources.files("sfumato.world").joinpath(SUITE_FILE).read_text()
    assert shipped == suite_lines(build_suite())
    assert suite == build_suite()  # and it reads back to the same prompts


def test_categories_and_counts(suite):
    counts = {c: sum(p.category == c for p in suite) for c in CATEGORIES}
    assert all(n >= 30 for n in counts.values()), counts
    assert 350 <= sum(n for c, n in counts.items() if c != "concept") <= 450
    assert len({p.id for p in suite}) == len(suite)
    for category in CATEGORIES:  # never the same prompt twice in a category
        pairs = [(p.prompt, p.negative_prompt) for p in suite if p.category == category]
        assert len(set(pairs)) == len(pairs), category


def test_every_prompt_can_be_fulfilled(suite):
    for prompt in suite:
        scene = scene_for(prompt.expectation)
        claims = check(prompt.expectation, scene.objects, scene.background)
        assert claims and all(claims.values()), (prompt, scene)
        assert all(contrasts(o.color, o.pattern, scene.background) for o in scene.objects)
        assert render(scene, 64).shape == (64, 64, 3)


def test_analyzer_accepts_renders_of_fulfilling_scenes(suite):
    """The benchmark's ceiling: a perfect model (the renderer itself) scores on every category."""
    for category in CATEGORIES:
        for prompt in [p for p in suite if p.category == category][:3]:
            scene = scene_for(prompt.expectation)
            claims = analyze(render(scene, 128), prompt.expectation)
            assert all(claims.values()), (prompt, scene, claims)


def words(text):
    return set(re.findall(r"[a-z-]+", text))


def test_prompts_use_only_words_of_training_captions(suite):
    from sfumato.world.captions import caption

    vocabulary = {split: set() for split in ("train", "concept")}
    for split, seen in vocabulary.items():
        rng = random.Random(split)
        for _ in range(3000):
            seen |= words(caption(sample_scene(rng, split), rng))
    for prompt in suite:
        split = "concept" if prompt.category == "concept" else "train"
        assert words(prompt.prompt) <= vocabulary[split], (prompt.prompt, words(prompt.prompt) - vocabulary[split])


def test_held_out_things_appear_only_in_their_categories(suite):
    rules = held_out()
    for prompt in suite:
        for query in prompt.expectation.objects:
            said = query.color if query.color and not query.color.startswith(NOT) else "red"
            obj = ObjectSpec(query.shape, said, "medium", 0.5, 0.5, query.pattern or "plain")
            assert rules.is_concept(obj) == (prompt.category == "concept"), prompt
            assert rules.is_heldout_pair(obj) == (prompt.category == "heldout_combinations"), prompt


def test_negative_prompts_name_what_must_be_absent(suite):
    negatives = [p for p in suite if p.category == "negative"]
    for prompt in negatives:
        (query,) = prompt.expectation.objects
        assert query.color == NOT + prompt.negative_prompt
        assert prompt.negative_prompt not in words(prompt.prompt)
    assert all(p.negative_prompt == "" for p in suite if p.category != "negative")


def test_write_and_read_round_trip(tmp_path, suite):
    path = write_suite(suite[:5], tmp_path / "s.jsonl")
    assert read_suite(path) == suite[:5]
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temp file behind


def test_bare_scene_specs_are_a_suite(tmp_path):
    scene = Scene("night", (ObjectSpec("star", "yellow", "medium", 0.3, 0.5),
                            ObjectSpec("circle", "red", "small", 0.7, 0.5, "plain")))
    path = tmp_path / "scenes.jsonl"
    path.write_text(scene.to_json() + "\n\n" + json.dumps({**json.loads(scene.to_json()), "id": "mine"}) + "\n")
    first, second = read_suite(path)
    assert second.id == "mine" and first.id != second.id
    assert "star" in first.prompt and "circle" in first.prompt
    claims = check(first.expectation, scene.objects, scene.background)
    assert len(claims) >= 5 and all(claims.values())


GOOD = {"id": "x", "category": "colors", "prompt": "a red star", "negative_prompt": "",
        "expectation": {"objects": [{"shape": "star", "color": "red"}]}}


def with_expectation(**expectation):
    return json.dumps({**GOOD, "expectation": expectation})


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    (json.dumps({**GOOD, "colour": "red"}), "unknown key(s) ['colour']"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "prompt"}), "lacks ['prompt']"),
    (with_expectation(objects=[{"shape": "pentagon"}]), "'pentagon' is not one of"),
    (with_expectation(objects=[{"shape": "star", "color": "!mauve"}]), "'!mauve' is not one of"),
    (with_expectation(objects=[{"shape": "star", "count": 9}]), "count must be an integer 0..4"),
    (with_expectation(objects=[{"shape": "star"}], relations=[{"a": 0, "relation": "above", "b": 1}]),
     "refers to object 1"),
    (with_expectation(objects=[{}]), "claims nothing"),
    (with_expectation(background="plaid", objects=[]), "'plaid' is not one of"),
])
def test_bad_lines_are_reported_with_their_number(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(SfumatoError, match=r"line 2: ") as error:
        read_suite(path)
    assert message in str(error.value)


def test_unreadable_empty_and_duplicate_suites(tmp_path):
    with pytest.raises(SfumatoError, match="cannot read"):
        read_suite(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(SfumatoError, match="no prompts"):
        read_suite(tmp_path / "empty.jsonl")
    (tmp_path / "twice.jsonl").write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")
    with pytest.raises(SfumatoError, match="unique"):
        read_suite(tmp_path / "twice.jsonl")
