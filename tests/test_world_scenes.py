import json
import math
import random
from importlib import resources

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sfumato.errors import SfumatoError
from sfumato.world.scenes import (
    COLORS,
    EDGE_MARGIN,
    SHAPES,
    SPLITS,
    Scene,
    held_out,
    relation_holds,
    sample_scene,
    sample_scenes,
    snap_to_grid,
)

RULES = json.loads(resources.files("sfumato.world").joinpath("heldout.json").read_text())
seeds = st.integers(0, 2**32)


def test_same_seed_same_scenes():
    for split in SPLITS:
        assert sample_scenes(7, 40, split) == sample_scenes(7, 40, split)
    assert sample_scenes(7, 40) != sample_scenes(8, 40)
    a = sample_scene(np.random.default_rng(3))
    assert a == sample_scene(np.random.default_rng(3))
    assert sample_scene(random.Random(5)) == sample_scene(random.Random(5))


def test_scene_json_round_trip():
    for scene in sample_scenes(1, 20, "eval"):
        assert Scene.from_json(scene.to_json()) == scene


def test_unknown_split_is_a_user_error():
    with pytest.raises(SfumatoError, match="allowed"):
        sample_scene(random.Random(0), "test")


def test_held_out_rules_come_from_the_data_file():
    rules = held_out()
    assert rules.concept_shapes == set(RULES["concept_shapes"]) and rules.concept_shapes
    assert rules.shape_color == {tuple(p) for p in RULES["shape_color"]}
    assert {s for s, _ in rules.shape_color} <= set(SHAPES)
    assert {c for _, c in rules.shape_color} <= set(COLORS)


@settings(max_examples=150, deadline=None)
@given(seeds)
def test_train_split_never_shows_held_out_things(seed):
    for obj in sample_scene(random.Random(seed), "train").objects:
        assert obj.shape not in RULES["concept_shapes"]
        assert obj.pattern not in RULES["concept_patterns"]
        assert [obj.shape, obj.color] not in RULES["shape_color"]
        assert [obj.shape, obj.pattern] not in RULES["shape_pattern"]


@settings(max_examples=60, deadline=None)
@given(seeds)
def test_heldout_and_concept_splits_contain_what_they_promise(seed):
    held = sample_scene(random.Random(seed), "heldout").objects
    assert any([o.shape, o.color] in RULES["shape_color"] or [o.shape, o.pattern] in RULES["shape_pattern"]
               for o in held)
    assert not any(o.shape in RULES["concept_shapes"] for o in held)
    concept = sample_scene(random.Random(seed), "concept").objects
    assert any(o.shape in RULES["concept_shapes"] or o.pattern in RULES["concept_patterns"]
               for o in concept)


@settings(max_examples=150, deadline=None)
@given(seeds, st.sampled_from(SPLITS))
def test_scenes_are_drawable_and_readable(seed, split):
    scene = sample_scene(random.Random(seed), split)
    assert 1 <= len(scene.objects) <= 4
    for i, a in enumerate(scene.objects):
        assert a.color != scene.background
        assert a.x - a.radius >= EDGE_MARGIN - 1e-9 and a.x + a.radius <= 1 - EDGE_MARGIN + 1e-9
        assert a.y - a.radius >= EDGE_MARGIN - 1e-9 and a.y + a.radius <= 1 - EDGE_MARGIN + 1e-9
        if a.size == "small":
            assert a.pattern == "plain"  # too few pixels to show a pattern
        for b in scene.objects[i + 1:]:
            assert math.dist((a.x, a.y), (b.x, b.y)) >= a.radius + b.radius - 1e-9


@settings(max_examples=150, deadline=None)
@given(seeds)
def test_snapping_puts_objects_on_the_grid_and_keeps_the_scene_valid(seed):
    scene = sample_scene(random.Random(seed), "train")
    snapped = snap_to_grid(scene, 16)
    assert [(o.shape, o.color, o.size, o.pattern) for o in snapped.objects] == [
        (o.shape, o.color, o.size, o.pattern) for o in scene.objects]
    for i, (a, old) in enumerate(zip(snapped.objects, scene.objects, strict=True)):
        assert abs(a.x - old.x) <= 1 / 16 and abs(a.y - old.y) <= 1 / 16
        assert a.x - a.radius >= EDGE_MARGIN - 1e-9 and a.x + a.radius <= 1 - EDGE_MARGIN + 1e-9
        for b in snapped.objects[i + 1:]:
            assert math.dist((a.x, a.y), (b.x, b.y)) >= a.radius + b.radius
    if snapped != scene:  # else two objects would have come too close: the scene stays as drawn
        assert all(round(o.x * 16, 9).is_integer() and round(o.y * 16, 9).is_integer() for o in snapped.objects)


def test_almost_every_scene_snaps():
    scenes = sample_scenes(3, 400, "train")
    assert sum(snap_to_grid(s, 16) != s for s in scenes) >= 390


def test_relations_are_exclusive_and_mirror_each_other():
    opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
    for scene in sample_scenes(2, 300, "eval"):
        for a in scene.objects:
            for b in scene.objects:
                if a is b:
                    continue
                for rel, other in opposite.items():
                    assert relation_holds(a, b, rel) == relation_holds(b, a, other)
                    if relation_holds(a, b, rel):
                        assert not relation_holds(a, b, other, strict=False)


def test_a_simple_scene_is_one_large_plain_object_on_a_plain_colour():
    from sfumato.world.scenes import ObjectSpec, Scene, is_simple

    star = ObjectSpec("star", "red", "large", 0.5, 0.5)
    assert is_simple(Scene("white", (star,)))
    assert not is_simple(Scene("night", (star,)))  # a sky is not a plain colour
    assert not is_simple(Scene("white", (ObjectSpec("star", "red", "medium", 0.5, 0.5),)))
    assert not is_simple(Scene("white", (ObjectSpec("star", "red", "large", 0.5, 0.5, "striped"),)))
    assert not is_simple(Scene("white", (star, ObjectSpec("ring", "blue", "small", 0.1, 0.1))))


def test_simple_scenes_drawn_directly_keep_to_their_backgrounds_and_split():
    from sfumato.world.scenes import held_out, is_simple, sample_simple_scene, scene_in_split

    rng = random.Random(0)
    scenes = [sample_simple_scene(rng, "train", ("white", "black")) for _ in range(300)]
    assert all(is_simple(s) and scene_in_split(s, "train") for s in scenes)
    assert {s.background for s in scenes} == {"white", "black"}
    assert not any(s.objects[0].color == s.background for s in scenes)
    heldout = [sample_simple_scene(rng, "heldout") for _ in range(20)]
    assert all(held_out().is_heldout_pair(s.objects[0]) for s in heldout)
    with pytest.raises(SfumatoError, match="not night; allowed: red"):
        sample_simple_scene(rng, "train", ("night",))


def test_simple_pairs_are_two_different_large_plain_objects_lined_up_on_a_plain_colour():
    from sfumato.world.scenes import identity, sample_simple_scene, scene_in_split

    rng = random.Random(1)
    pairs = [sample_simple_scene(rng, "train", objects=2) for _ in range(200)]
    for scene in pairs:
        a, b = scene.objects
        assert scene.background in COLORS and scene_in_split(scene, "train") and identity(a) != identity(b)
        assert all(o.size == "large" and o.pattern == "plain" and o.color != scene.background for o in (a, b))
        assert sum(relation_holds(a, b, r) for r in ("left of", "right of", "above", "below")) == 1
    beside = [relation_holds(*s.objects, "left of") or relation_holds(*s.objects, "right of") for s in pairs]
    assert 0.35 < np.mean(beside) < 0.65  # side by side as often as one above the other
    with pytest.raises(SfumatoError, match="1 object or a lined-up pair of 2, not 3"):
        sample_simple_scene(rng, "train", objects=3)


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_pair_scenes_are_two_different_objects_lined_up_and_keep_to_their_split(split):
    from sfumato.world.scenes import sample_pair_scene, scene_in_split

    rng = random.Random(1)
    scenes = [sample_pair_scene(rng, split) for _ in range(200)]
    assert all(len(s.objects) == 2 and s.objects[0] != s.objects[1] and scene_in_split(s, split) for s in scenes)
    looks = [{(o.shape, o.color, o.pattern, o.size) for o in s.objects} for s in scenes]
    assert all(len(look) == 2 for look in looks)
    # lined up: one coordinate shared (the jitter is at most 0.04), so most pairs hold a clear relation
    aligned = [min(abs(a.x - b.x), abs(a.y - b.y)) <= 0.04 + 1e-9 for a, b in (s.objects for s in scenes)]
    assert np.mean(aligned) > 0.95
    clear = [any(relation_holds(a, b, r) for r in ("left of", "right of", "above", "below"))
             for a, b in (s.objects for s in scenes)]
    assert np.mean(clear) > 0.8
