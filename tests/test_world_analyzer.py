import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sfumato.world.analyzer import (
    KINDS,
    accuracy,
    analyze,
    connected_components,
    degrade,
    detect,
    false_expectations,
    true_expectation,
)
from sfumato.world.analyzer_shapes import fit_shape, shape_coverage
from sfumato.world.captions import Expectation, ObjectQuery, RelationQuery, check
from sfumato.world.render import render
from sfumato.world.scenes import SHAPES, ObjectSpec, Scene, relation_holds, sample_scenes


def test_connected_components_label_separate_blobs():
    mask = np.zeros((20, 20), bool)
    mask[2:6, 2:6] = True
    mask[10:18, 3] = True
    mask[10, 3:15] = True  # an L shape: one region
    labels = connected_components(mask)
    assert len(np.unique(labels[labels >= 0])) == 2
    assert (labels[~mask] == -1).all()


def test_detects_a_simple_scene():
    scene = Scene("night", (ObjectSpec("star", "yellow", "medium", 0.25, 0.3),
                            ObjectSpec("ring", "red", "large", 0.7, 0.65, "plain")))
    background, found = detect(Image.fromarray(render(scene, 128)))
    assert background == "night"
    assert sorted((d.shape, d.color, d.size) for d in found) == [
        ("ring", "red", "large"), ("star", "yellow", "medium")]


def test_partial_and_negative_prompts():
    scene = Scene("white", (ObjectSpec("circle", "blue", "large", 0.3, 0.5),
                            ObjectSpec("square", "red", "medium", 0.75, 0.5)))
    image = render(scene, 256)  # any size is analysed
    assert all(analyze(image, Expectation(objects=(ObjectQuery("circle"),))).values())
    not_red = analyze(image, Expectation(objects=(ObjectQuery("circle", "!red"),)))
    assert all(not_red.values())
    not_blue = analyze(image, Expectation(objects=(ObjectQuery("circle", "!blue"),)))
    assert [c.kind for c, v in not_blue.items() if not v] == ["color"]
    left = Expectation(objects=(ObjectQuery("circle"), ObjectQuery("square")),
                       relations=(RelationQuery(0, "left of", 1),))
    assert all(analyze(image, left).values())
    right = Expectation(objects=left.objects, relations=(RelationQuery(0, "right of", 1),))
    assert not all(analyze(image, right).values())


def test_mismatched_specs_are_false_of_their_scene():
    rng = random.Random(0)
    for scene in sample_scenes(5, 40, "eval"):
        assert all(check(true_expectation(scene), scene.objects, scene.background).values())
        for kind, expectation in false_expectations(scene, rng):
            truth = check(expectation, scene.objects, scene.background, strict=False)
            assert not next(v for c, v in truth.items() if c.kind == kind)


def test_accuracy_thresholds_on_a_small_sample():
    clean = accuracy(60, seed=1)
    degraded = accuracy(60, seed=2, degraded=True)
    assert set(clean) == set(KINDS)
    for kind in KINDS:
        assert clean[kind]["all"] >= 0.99, (kind, clean[kind])
        # one misread object fails every relation it is in: 2-4 of ~150 position claims here
        floor = 0.95 if kind == "position" else 0.97
        assert degraded[kind]["all"] >= floor, (kind, degraded[kind])


def test_false_relations_include_near_misses_and_next_to():
    rng = random.Random(3)
    relations = [e.relations[0] for scene in sample_scenes(8, 60, "eval")
                 for kind, e in false_expectations(scene, rng) if kind == "position"]
    assert {r.relation for r in relations} == {"left of", "right of", "above", "below", "next to"}


@pytest.mark.parametrize("shape", SHAPES)
def test_fit_shape_recovers_shape_size_and_centre_through_blur(shape):
    radius, x, y = 10.24, 16.3, 15.8  # a small object, off the pixel grid
    drawn = shape_coverage(shape, 32, 32, x, y, radius)
    blurred = Image.fromarray((drawn * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.0))
    fit = fit_shape(np.asarray(blurred, np.float32) / 255)
    assert fit.shape == shape
    assert abs(fit.radius / radius - 1) < 0.04
    assert abs(fit.x - x) < 0.3 and abs(fit.y - y) < 0.3


@pytest.mark.parametrize("background, obj", [
    # small shapes whose pattern shade lies near the background, or on the line from the
    # background to their colour: edge pixels must not pass for shade and fill holes/points
    ("white", ObjectSpec("ring", "blue", "small", 0.5, 0.5)),
    ("green", ObjectSpec("ring", "white", "small", 0.5, 0.5)),
    ("brown", ObjectSpec("star", "yellow", "small", 0.5, 0.5)),
    ("pink", ObjectSpec("hexagon", "orange", "small", 0.52, 0.47)),
    # grey with its dark shade against black with its light one
    ("brown", ObjectSpec("square", "gray", "large", 0.5, 0.5, "checkered")),
    ("gradient sky", ObjectSpec("square", "black", "large", 0.5, 0.5, "checkered")),
    ("white", ObjectSpec("heart", "black", "medium", 0.5, 0.5, "checkered")),  # collinear colours
    ("gray", ObjectSpec("circle", "pink", "medium", 0.5, 0.5, "checkered")),
    ("gray", ObjectSpec("circle", "pink", "medium", 0.5, 0.5, "dotted")),
])
def test_hard_objects_are_read_right_when_degraded(background, obj):
    image = render(Scene(background, (obj,)), 128)
    rng = np.random.default_rng(0)
    for _ in range(4):
        _, found = detect(degrade(image, rng))
        assert [(d.shape, d.color, d.pattern, d.size) for d in found] == [
            (obj.shape, obj.color, obj.pattern, obj.size)]
        assert abs(found[0].x - obj.x) < 0.01 and abs(found[0].y - obj.y) < 0.01


def test_relations_in_the_tolerance_band_are_accepted():
    # left by 0.2 and up by 0.15: too diagonal for a caption to say "left of" (or "above"),
    # near enough to it for the analyzer to accept "left of"
    a, b = ObjectSpec("circle", "red", "small", 0.35, 0.4), ObjectSpec("square", "blue", "small", 0.55, 0.55)
    assert not relation_holds(a, b, "left of") and relation_holds(a, b, "left of", strict=False)
    image = render(Scene("white", (a, b)), 128)
    queries = (ObjectQuery("circle", "red"), ObjectQuery("square", "blue"))
    said = analyze(image, Expectation(objects=queries, relations=(RelationQuery(0, "left of", 1),)))
    assert all(said.values())
    wrong = analyze(image, Expectation(objects=queries, relations=(RelationQuery(0, "above", 1),)))
    assert not all(wrong.values())
