"""Does an image show what a prompt asked for? A classical analyzer for the shapes world.

    claims = analyze(image, Expectation(objects=(ObjectQuery("star", "red", count=2),)))
    # {Claim("shape", ...): True, Claim("color", ...): True, Claim("count", ...): False}

Steps: read the background off the left and right edges (every background is constant along a
row), call pixels far from it foreground, split the foreground into connected objects, then name
each object's shape (best overlap with templates drawn by the renderer itself), colour (nearest
palette colour, allowing for the pattern's second shade), pattern (how the shade pixels are laid
out) and size. The claims are judged by `captions.check`, the very function that proves captions
true of their scenes, with the lenient relation test. Classical rather than a trained network:
no weights to ship, nothing to retrain when the world changes, and every decision is readable.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, replace
from functools import lru_cache

import click
import numpy as np
from PIL import Image, ImageFilter

from sfumato.world.captions import (
    Claim,
    Expectation,
    ObjectQuery,
    RelationQuery,
    check,
    full_expectation,
)
from sfumato.world.render import background_rows, draw_shape, render
from sfumato.world.scenes import (
    BACKGROUND_KINDS,
    COLORS,
    PATTERNS,
    SHAPES,
    SIZES,
    Scene,
    can_have_pattern,
    pattern_shade,
    relation_holds,
    sample_scenes,
)

WORK_SIZE = 128  # images are analysed at this size; pixel thresholds below are for it
EDGE_COLUMNS = 4  # columns at each side that show only background
FOREGROUND_DISTANCE = 40.0  # RGB distance from the background that makes a pixel foreground
MIN_AREA = 30  # smaller blobs are noise or night-sky stars
TEMPLATE = 32  # side of the normalised object masks compared with shape templates
MIN_MAIN_SHARE = 0.3  # an object's colour covers at least this much of it (patterns: the rest)
MAX_COLOR_PIXELS = 300
ASPECT_WEIGHT = 1.0  # shape score: overlap with a template minus this times the aspect gap
PALETTE = np.array(list(COLORS.values()), np.float32)
SHADES = np.array([pattern_shade(c) for c in COLORS], np.float32)


@dataclass(frozen=True)
class Detection:
    """One object found in an image; coordinates are fractions of the image size."""

    shape: str
    color: str
    pattern: str
    size: str
    x: float
    y: float
    extent: float  # bounding-box side / image width

    @property
    def radius(self) -> float:
        return SIZES[self.size]


def as_image_array(image: np.ndarray | Image.Image) -> np.ndarray:
    """Any RGB image -> float32 (WORK_SIZE, WORK_SIZE, 3) in 0..255."""
    if isinstance(image, np.ndarray):
        array = image if image.dtype == np.uint8 else np.clip(image * 255, 0, 255).astype(np.uint8)
        image = Image.fromarray(array[..., :3])
    image = image.convert("RGB")
    if image.size != (WORK_SIZE, WORK_SIZE):
        image = image.resize((WORK_SIZE, WORK_SIZE), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32)


# ----------------------------------------------------------------------------- background

def background_profile(image: np.ndarray) -> np.ndarray:
    """(H, 3): each row's background colour, the median of its edge pixels (stars vanish)."""
    edges = np.concatenate([image[:, :EDGE_COLUMNS], image[:, -EDGE_COLUMNS:]], axis=1)
    return np.median(edges, axis=1)


def classify_background(profile: np.ndarray) -> str:
    names = [*COLORS, *BACKGROUND_KINDS]
    costs = [np.linalg.norm(profile - background_rows(n, len(profile)), axis=1).mean() for n in names]
    return names[int(np.argmin(costs))]


# ----------------------------------------------------------------------------- objects

def connected_components(mask: np.ndarray) -> np.ndarray:
    """Label 4-connected regions: each pixel ends with the smallest flat index of its region, -1
    outside. Neighbour-min sweeps plus pointer jumping, so a dependency on scipy is not needed
    for this one function."""
    h, w = mask.shape
    big = h * w
    labels = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        new = labels.copy()
        np.minimum(new[1:], labels[:-1], out=new[1:])
        np.minimum(new[:-1], labels[1:], out=new[:-1])
        np.minimum(new[:, 1:], labels[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], labels[:, 1:], out=new[:, :-1])
        new = np.where(mask, new, big)
        flat = np.append(new.ravel(), big)
        new = flat[flat[new]]  # jump to the label of the pixel our label points at
        if np.array_equal(new, labels):
            return np.where(mask, labels, -1)
        labels = new


def _dilate(mask: np.ndarray) -> np.ndarray:
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    return grown


def opened(mask: np.ndarray) -> np.ndarray:
    """Erode then dilate: drops specks (night-sky stars touching an object) 1-2 px wide."""
    return _dilate(_erode(mask, 1))


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        inner = mask.copy()
        inner[1:] &= mask[:-1]
        inner[:-1] &= mask[1:]
        inner[:, 1:] &= mask[:, :-1]
        inner[:, :-1] &= mask[:, 1:]
        mask = inner
    return mask


def normalized_mask(mask: np.ndarray, soft: np.ndarray | None = None) -> np.ndarray:
    """The object's coverage (soft, else the mask) in a square window around the mask's
    bounding box, resized to TEMPLATE px: sub-pixel edges keep small shapes apart."""
    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    side = max(y1 - y0, x1 - x0)
    window = np.zeros((side, side), np.float32)
    top, left = (side - (y1 - y0)) // 2, (side - (x1 - x0)) // 2
    inside = mask if soft is None else np.clip(soft, 0, 1) * _dilate(mask)
    window[top:top + y1 - y0, left:left + x1 - x0] = inside[y0:y1, x0:x1]
    resized = Image.fromarray(window).resize((TEMPLATE, TEMPLATE), Image.Resampling.BILINEAR)
    return np.asarray(resized)


@lru_cache(maxsize=1)  # a memo of a pure function: the templates are drawn by the renderer
def shape_templates() -> dict[str, tuple[np.ndarray, float]]:
    """shape -> (normalised masks, bounding-box side / (2 * radius)).

    Masks at two sizes, sharp and blurred: blur rounds off the points of small stars and fills
    the notches of crosses, and a generated image is seldom sharp."""
    templates = {}
    for shape in SHAPES:
        masks, extent = [], 0.0
        for radius in (SIZES["small"], SIZES["large"]):
            canvas = np.zeros((WORK_SIZE, WORK_SIZE, 3), np.float32)
            draw_shape(canvas, shape, (255, 255, 255), 0.5, 0.5, radius)
            sharp = Image.fromarray(canvas[..., 0].astype(np.uint8))
            for blur in (0.0, 1.2):
                image = sharp.filter(ImageFilter.GaussianBlur(blur)) if blur else sharp
                coverage = np.asarray(image, np.float32) / 255
                masks.append(normalized_mask(opened(coverage > 0.5), coverage))
            ys, xs = np.nonzero(canvas[..., 0] > 127)
            extent = (max(np.ptp(ys), np.ptp(xs)) + 1) / (2 * radius * WORK_SIZE)
        templates[shape] = (np.stack(masks), extent)
    return templates


def aspect(crop: np.ndarray) -> float:
    """Height / width of a soft mask, to sub-pixel precision (a hexagon is 0.87, a circle 1)."""
    return float(crop.max(axis=1).sum() / max(crop.max(axis=0).sum(), 1e-6))


def classify_shape(mask: np.ndarray, soft: np.ndarray) -> str:
    crop = normalized_mask(mask, soft)
    scores = {shape: max(np.minimum(crop, t).sum() / np.maximum(crop, t).sum()
                         - ASPECT_WEIGHT * abs(aspect(crop) - aspect(t)) for t in masks)
              for shape, (masks, _) in shape_templates().items()}
    return max(scores, key=scores.get)


def _blend_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray, thin: float) -> np.ndarray:
    """Distance from points p to the blends of a and b, plus `thin` times how far the nearest
    blend is from pure b: brown over orange must not pass for a faint black (broadcasts)."""
    ab = b - a
    t = np.clip(((p - a) * ab).sum(-1, keepdims=True) / np.maximum((ab * ab).sum(-1, keepdims=True), 1e-6), 0, 1)
    return np.linalg.norm(p - a - t * ab, axis=-1) + thin * (1 - t[..., 0]) * np.linalg.norm(ab, axis=-1)


def classify_color(pixels: np.ndarray, background: np.ndarray) -> str:
    """The palette colour that best explains the pixels as blends of itself, its pattern shade
    and the background behind each pixel (edges and blur mix all three)."""
    step = max(len(pixels) // MAX_COLOR_PIXELS, 1)  # an even subsample is as good, and faster
    p, bg = pixels[::step, None], background[::step, None]
    main, shade = PALETTE[None], SHADES[None]
    residual = np.minimum(np.minimum(_blend_distance(p, bg, main, 0.5), _blend_distance(p, bg, shade, 0.5)),
                          _blend_distance(p, main, shade, 0.0))
    main_share = (np.linalg.norm(p - main, axis=2) <= np.linalg.norm(p - shade, axis=2)).mean(axis=0)
    cost = residual.mean(axis=0) + 100.0 * np.clip(MIN_MAIN_SHARE - main_share, 0, None) / MIN_MAIN_SHARE
    return list(COLORS)[int(np.argmin(cost))]


def coverage(pixels: np.ndarray, background: np.ndarray, color: str) -> np.ndarray:
    """How much of each pixel an object of `color` (or its pattern shade) covers, 0..1 and
    beyond; a blurred straight edge keeps its 0.5 line where the sharp edge was."""
    best = np.zeros(pixels.shape[:-1], np.float32)
    for target in (COLORS[color], pattern_shade(color)):
        direction = np.array(target, np.float32) - background
        share = ((pixels - background) * direction).sum(-1) / np.maximum((direction**2).sum(-1), 1e-6)
        best = np.maximum(best, share)
    return best


def _box_blur(image: np.ndarray) -> np.ndarray:
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    return sum(padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9.0


def _purity(shade: np.ndarray, inside: np.ndarray, axis: int) -> float:
    """How uniform each row (axis=1) or column (axis=0) is: 1 when every line is all one colour."""
    counts = inside.sum(axis=axis)
    keep = counts >= 3
    share = shade.sum(axis=axis)[keep] / counts[keep]
    return float((np.maximum(share, 1 - share) * counts[keep]).sum() / max(counts[keep].sum(), 1))


def classify_pattern(image: np.ndarray, mask: np.ndarray, color: str) -> str:
    inside = _erode(mask, 3)  # edges blend with the background and can pass for the shade
    if inside.sum() < 30:
        return "plain"
    main = np.array(COLORS[color], np.float32)
    shade_rgb = np.array(pattern_shade(color), np.float32)
    shade = (np.linalg.norm(image - shade_rgb, axis=2) < np.linalg.norm(image - main, axis=2)) & inside
    share = shade.sum() / inside.sum()
    if share < 0.1:
        return "plain"
    rows, columns = _purity(shade, inside, 1), _purity(shade, inside, 0)
    if rows - columns > 0.12:
        return "striped"
    return "checkered" if share > 0.38 else "dotted"


def classify_size(extent: float, shape: str) -> str:
    radius = extent / (2 * shape_templates()[shape][1])
    return min(SIZES, key=lambda s: abs(np.log(radius / SIZES[s])))


def detect(image: np.ndarray | Image.Image) -> tuple[str, list[Detection]]:
    """(background name, objects) seen in an image."""
    pixels = as_image_array(image)
    profile = background_profile(pixels)
    background = np.broadcast_to(profile[:, None, :], pixels.shape)
    # A low threshold on a denoised copy finds every object (a bit too big); each object's
    # outline is then redrawn at half coverage of its own colour, which undoes blur.
    coarse = np.linalg.norm(_box_blur(pixels) - _box_blur(background), axis=2) > FOREGROUND_DISTANCE
    labels = connected_components(coarse)
    found, counts = np.unique(labels[labels >= 0], return_counts=True)
    detections = []
    for label in found[counts >= MIN_AREA]:
        ys, xs = np.nonzero(labels == label)
        box = np.s_[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        region, ink, behind = labels[box] == label, pixels[box], background[box]
        core = _erode(region, 1)
        core = core if core.sum() >= 10 else region
        color = classify_color(ink[core], behind[core])
        covered = coverage(ink, behind, color)
        mask = opened(region & (covered > 0.5))
        if mask.sum() < MIN_AREA:
            continue
        ys, xs = np.nonzero(mask)
        extent = (max(np.ptp(ys), np.ptp(xs)) + 1) / WORK_SIZE
        shape = classify_shape(mask, covered)
        x = (box[1].start + (xs.min() + xs.max() + 1) / 2) / WORK_SIZE
        y = (box[0].start + (ys.min() + ys.max() + 1) / 2) / WORK_SIZE
        size = classify_size(extent, shape)
        # the world never patterns small or thin shapes; their few inner pixels are noise
        pattern = classify_pattern(ink, mask, color) if can_have_pattern(shape, size) else "plain"
        detections.append(Detection(shape, color, pattern, size, x, y, extent))
    return classify_background(profile), detections


def analyze(image: np.ndarray | Image.Image, expectation: Expectation) -> dict[Claim, bool]:
    """Each claim of the expectation -> whether the image shows it."""
    background, detections = detect(image)
    return check(expectation, detections, background, strict=False)


# ----------------------------------------------------------------------------- accuracy

KINDS = ("background", "shape", "color", "pattern", "size", "count", "position")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What a generator does to a clean drawing: blur, noise, a colour cast, JPEG artefacts."""
    blurred = Image.fromarray(image).filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.0)))
    noisy = (np.asarray(blurred, np.float32) + rng.normal(0, rng.uniform(2, 8), image.shape)
             + rng.uniform(-10, 10, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(
        buffer, format="JPEG", quality=int(rng.integers(60, 90)))
    return np.asarray(Image.open(buffer).convert("RGB"))


def true_expectation(scene: Scene) -> Expectation:
    """Every attribute and count, plus every caption-clear relation between objects named, as
    prompts name them, by shape and colour (those whose shape and colour are unique)."""
    full = full_expectation(scene)
    named = [ObjectQuery(o.shape, o.color) for o in scene.objects
             if sum((p.shape, p.color) == (o.shape, o.color) for p in scene.objects) == 1]
    first = len(full.objects)
    relations = tuple(RelationQuery(first + a, rel, first + b)
                      for a, qa in enumerate(named) for b, qb in enumerate(named) if a != b
                      for rel in OPPOSITE if relation_holds(*_only(scene, qa, qb), rel))
    return Expectation(full.background, full.objects + tuple(named), relations)


def _only(scene: Scene, *queries: ObjectQuery) -> list:
    return [next(o for o in scene.objects if q.fits(o)) for q in queries]


def false_expectations(scene: Scene, rng: random.Random) -> list[tuple[str, Expectation]]:
    """(kind, expectation) pairs, each with one claim of that kind that is false of the scene."""
    full = true_expectation(scene)
    query = rng.choice([q for q in full.objects if q.count])
    same_shape = [o for o in scene.objects if o.shape == query.shape]
    others = {"shape": set(SHAPES) - {o.shape for o in scene.objects},
              "color": set(COLORS) - {o.color for o in same_shape},
              "pattern": set(PATTERNS) - {o.pattern for o in same_shape},
              "size": set(SIZES) - {o.size for o in same_shape}}
    wrong = [("background", Expectation(background=rng.choice(
        sorted((set(COLORS) | set(BACKGROUND_KINDS)) - {scene.background}))))]
    wrong += [(kind, Expectation(objects=(replace(query, **{kind: rng.choice(sorted(values))}),)))
              for kind, values in others.items() if values]
    wrong.append(("count", Expectation(objects=(replace(query, count=query.count + rng.choice(
        [-1, 1]) if query.count > 1 else 2),))))
    if full.relations:
        rel = rng.choice(full.relations)
        wrong.append(("position", replace(full, relations=(replace(rel, relation=OPPOSITE[rel.relation]),))))
    return wrong


def _claim_of_kind(claims: dict[Claim, bool], kind: str) -> Claim:
    return next(c for c in claims if c.kind == kind)


def accuracy(n: int, seed: int = 0, degraded: bool = False) -> dict[str, dict[str, float]]:
    """Per claim kind: share of true claims accepted, of false claims rejected, and overall."""
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    tallies = {k: {"true": [0, 0], "false": [0, 0]} for k in KINDS}
    for scene in sample_scenes(seed, n, "eval"):
        image = render(scene, WORK_SIZE)
        background, found = detect(degrade(image, np_rng) if degraded else image)
        expectation = true_expectation(scene)
        for claim, seen in check(expectation, found, background, strict=False).items():
            tallies[claim.kind]["true"][0] += seen
            tallies[claim.kind]["true"][1] += 1
        for kind, expectation in false_expectations(scene, rng):
            truth = check(expectation, scene.objects, scene.background, strict=False)
            claim = _claim_of_kind(truth, kind)
            if truth[claim]:
                raise AssertionError(f"not a false claim: {claim} of {scene}")
            tallies[kind]["false"][0] += not check(expectation, found, background, False)[claim]
            tallies[kind]["false"][1] += 1
    return {kind: {"true accepted": t[0] / max(t[1], 1), "false rejected": f[0] / max(f[1], 1),
                   "all": (t[0] + f[0]) / max(t[1] + f[1], 1), "claims": t[1] + f[1]}
            for kind, (t, f) in ((k, (v["true"], v["false"])) for k, v in tallies.items())}


@click.command("analyzer")
@click.option("--n", "count", type=click.IntRange(10), default=400, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def analyzer_command(count: int, seed: int) -> None:
    """Analyzer accuracy per claim kind on fresh and on degraded renders (eval split)."""
    for degraded in (False, True):
        click.echo(f"\n{'degraded' if degraded else 'fresh'} renders, {count} scenes:")
        click.echo(f"{'claim':<11}{'true accepted':>15}{'false rejected':>16}{'all':>8}{'claims':>8}")
        for kind, row in accuracy(count, seed, degraded).items():
            click.echo(f"{kind:<11}{row['true accepted']:>15.2%}{row['false rejected']:>16.2%}"
                       f"{row['all']:>8.2%}{row['claims']:>8}")
