import numpy as np
import pytest

from sfumato.world.render import SDFS, background_rows, render
from sfumato.world.scenes import COLORS, SHAPES, ObjectSpec, Scene, pattern_shade, sample_scenes


def single(shape="circle", color="red", size="large", pattern="plain", background="white"):
    return Scene(background, (ObjectSpec(shape, color, size, 0.5, 0.5, pattern),))


def object_mask(image, background="white"):
    return np.abs(image.astype(int) - COLORS[background]).sum(-1) > 30


@pytest.mark.parametrize("size", [32, 64, 100, 128])
def test_any_size_gives_uint8_rgb(size):
    image = render(sample_scenes(0, 1)[0], size)
    assert image.shape == (size, size, 3) and image.dtype == np.uint8


def test_same_scene_same_pixels():
    for scene in sample_scenes(4, 10, "eval"):
        assert np.array_equal(render(scene, 64), render(scene, 64))


def test_every_shape_has_a_true_distance_field_near_its_edge():
    # |grad d| ~ 1 near the boundary is what makes clip(0.5 - d_px) a correct anti-aliasing
    u, v = np.meshgrid(np.linspace(-1.3, 1.3, 301), np.linspace(-1.3, 1.3, 301))
    step = u[0, 1] - u[0, 0]
    for shape in SHAPES:
        d = SDFS[shape](u, v)
        gy, gx = np.gradient(d, step)
        near = np.abs(d) < 0.03
        assert near.any() and (d < 0).any(), shape
        assert np.median(np.hypot(gx, gy)[near]) == pytest.approx(1.0, abs=0.05), shape


def test_shapes_fill_their_size_and_keep_their_colour():
    for shape in SHAPES:
        image = render(single(shape, "blue"), 128)
        mask = object_mask(image)
        ys, xs = np.nonzero(mask)
        extent = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
        assert 44 <= extent <= 52, shape  # large = 0.38 of the width
        solid = (image[mask] == COLORS["blue"]).all(-1)
        assert solid.mean() > 0.6, shape


def test_small_shapes_stay_recognisable_at_128px():
    for shape in SHAPES:
        mask = object_mask(render(single(shape, size="small"), 128))
        ys, xs = np.nonzero(mask)
        assert 18 <= max(xs.max() - xs.min(), ys.max() - ys.min()) + 1 <= 23, shape


def test_edges_are_anti_aliased():
    image = render(single("circle", "black"), 64).astype(int)
    grey = image[..., 0]
    partial = (grey > COLORS["black"][0] + 5) & (grey < COLORS["white"][0] - 5)
    assert partial.sum() > 20  # a ring of in-between pixels around the disc


def test_circle_area_matches_geometry():
    mask = object_mask(render(single("circle", "black", "medium"), 128))
    assert mask.sum() == pytest.approx(np.pi * (0.13 * 128) ** 2, rel=0.06)


@pytest.mark.parametrize("pattern", ["striped", "dotted", "checkered"])
def test_patterns_show_a_second_shade_but_keep_the_colour(pattern):
    image = render(single("square", "green", pattern=pattern), 128)
    inside = image[object_mask(image)].astype(int)
    near_main = (np.abs(inside - COLORS["green"]).sum(-1) < 20).mean()
    near_shade = (np.abs(inside - pattern_shade("green")).sum(-1) < 20).mean()
    assert near_shade > 0.15 and near_main >= near_shade - 0.05
    plain = render(single("square", "green"), 128)
    assert not (np.abs(plain[object_mask(plain)].astype(int) - pattern_shade("green")).sum(-1) < 20).any()


def test_backgrounds():
    night = render(Scene("night", ()), 128)
    assert night.mean() < 60 and (night.max(-1) > 150).sum() > 5  # dark, with stars
    grass = background_rows("grass and sky", 128)
    assert grass[0, 2] > grass[0, 1] and grass[-1, 1] > grass[-1, 2]  # blue above, green below
    sky = background_rows("gradient sky", 64)
    assert (np.diff(sky.sum(-1)) > 0).all()  # lighter towards the horizon
