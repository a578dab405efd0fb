"""Which shape is an object, how big and where? Analysis by synthesis with the renderer itself.

An object's coverage (0..1 per pixel) keeps two things that blur does not change: its sum (the
area) and its centroid. For each shape of the world that fixes a radius and a centre; the shape
is then drawn there by the renderer, blurred by a few amounts, and the shape whose drawing is
closest to the coverage wins. Measuring the outline instead (a thresholded mask) loses what
tells small shapes apart: blur rounds a small star's points and a small hexagon's corners.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from sfumato.world.render import draw_shape
from sfumato.world.scenes import SHAPES

BLURS = (0.0, 0.6, 1.0, 1.5)  # Gaussian sigmas (px) tried: generated images are seldom sharp
GEOMETRY_SIZE = 256  # canvas on which each shape's constants are measured, once
GEOMETRY_RADIUS = 0.35


@dataclass(frozen=True)
class Geometry:
    """A shape's constants for radius 1: area, centroid minus centre, bounding-box side / 2."""

    area: float
    offset_x: float
    offset_y: float
    extent: float


@dataclass(frozen=True)
class ShapeFit:
    """The best-fitting shape; lengths and positions in pixels of the analysed crop."""

    shape: str
    x: float
    y: float
    radius: float
    extent: float  # bounding-box side


def shape_coverage(shape: str, height: int, width: int, x: float, y: float, radius: float) -> np.ndarray:
    """(height, width) coverage of a shape centred at pixel position (x, y), drawn by the renderer."""
    canvas = np.zeros((height, width, 3), np.float32)
    draw_shape(canvas, shape, (1, 1, 1), x / width, y / height, radius / width)
    return canvas[..., 0]


def centroid(coverage: np.ndarray) -> tuple[float, float, float]:
    """(area, x, y) of a coverage map; pixel (i, j) has its centre at (j + 0.5, i + 0.5)."""
    area = float(coverage.sum())
    ys, xs = np.indices(coverage.shape)
    return (area, float((coverage * xs).sum()) / area + 0.5, float((coverage * ys).sum()) / area + 0.5)


@lru_cache(maxsize=1)  # a memo of a pure function: the constants come from the renderer
def shape_geometry() -> dict[str, Geometry]:
    radius = GEOMETRY_RADIUS * GEOMETRY_SIZE
    centre = GEOMETRY_SIZE / 2
    geometry = {}
    for shape in SHAPES:
        drawn = shape_coverage(shape, GEOMETRY_SIZE, GEOMETRY_SIZE, centre, centre, radius)
        area, x, y = centroid(drawn)
        ys, xs = np.nonzero(drawn > 0.5)
        side = max(np.ptp(ys), np.ptp(xs)) + 1
        geometry[shape] = Geometry(area / radius**2, (x - centre) / radius, (y - centre) / radius,
                                   side / (2 * radius))
    return geometry


@lru_cache(maxsize=256)  # a memo of a pure function of a crop side
def blur_matrices(side: int) -> np.ndarray:
    """(len(BLURS), side, side): M @ image blurs the image's columns by each of BLURS, with
    zeros beyond the ends. As matrices, all blurs of all shapes are one batched product: far quicker on small
    crops than filtering each image."""
    offsets = np.arange(side)[:, None] - np.arange(side)[None, :]
    matrices = []
    for sigma in BLURS:
        if sigma <= 0:
            matrices.append(np.eye(side))
            continue
        taps = np.exp(-0.5 * (np.arange(-3 * side, 3 * side + 1) / sigma) ** 2)
        matrices.append(np.exp(-0.5 * (offsets / sigma) ** 2) / taps.sum())
    stacked = np.stack(matrices).astype(np.float32)
    stacked.setflags(write=False)
    return stacked


def fit_shape(coverage: np.ndarray) -> ShapeFit:
    """The shape whose drawing, at the area and centroid of `coverage` and blurred a little,
    differs least from it. `coverage`: 0..1, zero away from the object, with room for blur."""
    area, x, y = centroid(coverage)
    height, width = coverage.shape
    candidates, drawings = [], []
    for shape, geometry in shape_geometry().items():
        radius = math.sqrt(area / geometry.area)
        centre_x, centre_y = x - geometry.offset_x * radius, y - geometry.offset_y * radius
        drawings.append(shape_coverage(shape, height, width, centre_x, centre_y, radius))
        candidates.append(ShapeFit(shape, centre_x, centre_y, radius, 2 * geometry.extent * radius))
    # (blurs, shapes, height, width): every drawing under every blur (the matrices are
    # symmetric, so the same ones blur the rows from the right)
    blurred = blur_matrices(height)[:, None] @ np.stack(drawings)[None] @ blur_matrices(width)[:, None]
    errors = np.abs(blurred - coverage).sum(axis=(2, 3)).min(axis=0)
    return candidates[int(np.argmin(errors))]
