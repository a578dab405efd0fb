"""Does an image show what a prompt asked for? A classical analyzer for the shapes world.

    claims = analyze(image, Expectation(objects=(ObjectQuery("star", "red", count=2),)))
    # {Claim("shape", ...): True, Claim("color", ...): True, Claim("count", ...): False}

Steps: read the background off the left and right edges (every background is constant along a
row), call pixels far from it foreground, split the foreground into connected objects, then name
each object's colour (the palette colour whose blends with its shade and the background explain
the pixels), pattern (how the shade pixels are laid out), and from its coverage of the pixels
its shape, size and position (analyzer_shapes: the renderer's own drawings fitted to it). The
claims are judged by `captions.check`, the very function that proves captions true of their
scenes, with the lenient relation test: captions state relations only when they are clear, the
analyzer accepts them a little beyond that. Classical rather than a trained network: no weights
to ship, nothing to retrain when the world changes, and every decision is readable.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, replace

import click
import numpy as np
from PIL import Image, ImageFilter

from sfumato.world.analyzer_shapes import fit_shape
from sfumato.world.captions import (
    Claim,
    Expectation,
    ObjectQuery,
    RelationQuery,
    check,
    full_expectation,
)
from sfumato.world.render import background_rows, render
from sfumato.world.scenes import (
    BACKGROUND_KINDS,
    COLORS,
    PATTERNS,
    RELATIONS,
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
PATTERN_MIN_SHARE = 0.06  # of an object's inside that shows its shade, if it has a pattern
BLUR_ROOM = 3  # px around an object's 0.5 outline where blur still spreads its ink
MIN_MAIN_SHARE = 0.3  # an object's colour covers at least this much of it (patterns: the rest)
MAX_COLOR_PIXELS = 300
SHADE_MIN_CONTRAST = 55.0  # scenes.MIN_PATTERN_CONTRAST less room for a colour shift
FIT_TOLERANCE = 12.0  # RGB distance within which two blends explain a pixel equally well
INSIDE_BLEND_COST = 30.0  # RGB distance an even blend of colour and shade costs
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


def _dilate(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    for _ in range(steps):
        grown = mask.copy()
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= mask[:, :-1]
        grown[:, :-1] |= mask[:, 1:]
        mask = grown
    return mask


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


def _segment_fit(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(t, distance) of points p to the segment a -> b: t = 0 at a, 1 at b (unclipped)."""
    ab = b - a
    t = ((p - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-6)
    return t, np.linalg.norm(p - a - np.clip(t, 0, 1)[..., None] * ab, axis=-1)


def _blend_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray, thin: float) -> np.ndarray:
    """Distance from points p to the blends of a and b, plus `thin` times how far the nearest
    blend is from pure b: brown over orange must not pass for a faint black (broadcasts)."""
    t, distance = _segment_fit(p, a, b)
    return distance + thin * (1 - np.clip(t, 0, 1)) * np.linalg.norm(b - a, axis=-1)


def _inside_blend_distance(p: np.ndarray, main: np.ndarray, shade: np.ndarray) -> np.ndarray:
    """Distance from points p to the blends of a colour and its shade, plus a cost for an even
    blend: inside an object those blend only along pattern edges, so grey (and its dark
    shade) must not pass for a blend of black and its light grey shade (broadcasts)."""
    t, distance = _segment_fit(p, main, shade)
    t = np.clip(t, 0, 1)
    return distance + INSIDE_BLEND_COST * np.minimum(t, 1 - t)


def classify_color(pixels: np.ndarray, background: np.ndarray) -> str:
    """The palette colour that best explains the pixels as blends of itself, its pattern shade
    and the background behind each pixel (edges and blur mix all three)."""
    step = max(len(pixels) // MAX_COLOR_PIXELS, 1)  # an even subsample is as good, and faster
    p, bg = pixels[::step, None], background[::step, None]
    main, shade = PALETTE[None], SHADES[None]
    # a shade close to the background is never drawn (scenes.contrasts)
    no_shade = np.where(np.linalg.norm(bg - shade, axis=-1) < SHADE_MIN_CONTRAST, np.inf, 0.0)
    residual = np.minimum.reduce([_blend_distance(p, bg, main, 0.5),
                                  _blend_distance(p, bg, shade, 0.5) + no_shade,
                                  _inside_blend_distance(p, main, shade) + no_shade])
    main_share = (np.linalg.norm(p - main, axis=2) <= np.linalg.norm(p - shade, axis=2)).mean(axis=0)
    cost = residual.mean(axis=0) + 100.0 * np.clip(MIN_MAIN_SHARE - main_share, 0, None) / MIN_MAIN_SHARE
    return list(COLORS)[int(np.argmin(cost))]


def coverage(pixels: np.ndarray, background: np.ndarray, color: str, patterned: bool) -> np.ndarray:
    """How much of each pixel an object of `color` covers, 0..1 and beyond; a blurred straight
    edge keeps its 0.5 line where the sharp edge was.

    A pixel of a plain object is a blend of the background and the colour. One of a patterned
    object may also blend the background with the pattern shade, or (inside) the colour with
    the shade; the blend nearest to the pixel says how much is covered. Shade blends are only
    tried for patterned objects: the shade is often itself a blend of the colour and a pale or
    dark background (blue's is a light blue), which would pass every edge pixel as ink."""
    main = np.array(COLORS[color], np.float32)
    t_main, d_main = _segment_fit(pixels, background, main)
    if not patterned:
        return t_main.astype(np.float32)
    shade = np.array(pattern_shade(color), np.float32)
    t_shade, d_shade = _segment_fit(pixels, background, shade)
    _, d_inside = _segment_fit(pixels, main, shade)
    # collinear colours (grey on white) fit several blends equally well: take the most ink
    close = np.minimum(np.minimum(d_main, d_shade), d_inside) + FIT_TOLERANCE
    return np.maximum.reduce([np.where(d_main <= close, t_main, -np.inf),
                              np.where(d_shade <= close, t_shade, -np.inf),
                              np.where(d_inside <= close, 1.0, -np.inf)]).astype(np.float32)


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


def classify_pattern(image: np.ndarray, background: np.ndarray, mask: np.ndarray, color: str) -> str:
    inside = _erode(mask, 3)  # edges blend with the background and can pass for the shade
    if inside.sum() < 30:
        return "plain"
    main = np.array(COLORS[color], np.float32)
    shade_rgb = np.array(pattern_shade(color), np.float32)
    # shade pixels: nearer the shade than the colour, and explained as blends of the two as
    # well as by a blend of colour and background (a ring's hole, an edge; where those are
    # collinear, as black's grey shade on white, either will do); a shade close to the
    # background is never drawn (scenes.contrasts)
    blend, to_pattern = _segment_fit(image, main, shade_rgb)
    _, to_edge = _segment_fit(image, background, main)
    drawn = np.linalg.norm(background - shade_rgb, axis=2) >= SHADE_MIN_CONTRAST
    shade = (blend > 0.5) & (to_pattern < to_edge + FIT_TOLERANCE) & drawn & inside
    if shade.sum() < PATTERN_MIN_SHARE * inside.sum():
        return "plain"
    rows, columns = _purity(shade, inside, 1), _purity(shade, inside, 0)
    if rows - columns > 0.12:
        return "striped"
    # the shade's share of the area: dots cover a quarter, checks half. Blur keeps the mean
    # blend, not the count of pixels nearest the shade (blurred dots shrink), so mean blends.
    return "checkered" if np.clip(blend[inside], 0, 1).mean() > 0.38 else "dotted"


def classify_size(radius: float) -> str:
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
        box = np.s_[max(ys.min() - BLUR_ROOM, 0):ys.max() + 1 + BLUR_ROOM,
                    max(xs.min() - BLUR_ROOM, 0):xs.max() + 1 + BLUR_ROOM]
        region, ink, behind = labels[box] == label, pixels[box], background[box]
        core = _erode(region, 1)
        core = core if core.sum() >= 10 else region
        color = classify_color(ink[core], behind[core])
        # the pattern is read off the region's inside first: it says which blends make the edge
        pattern = classify_pattern(ink, behind, region, color)
        covered = coverage(ink, behind, color, patterned=pattern != "plain")
        mask = opened(region & (covered > 0.5))
        if mask.sum() < MIN_AREA:
            continue
        fit = fit_shape(np.clip(covered, 0, 1) * _dilate(mask, BLUR_ROOM))
        size = classify_size(fit.radius / WORK_SIZE)
        # the world never patterns small or thin shapes; their few inner pixels are noise
        pattern = pattern if can_have_pattern(fit.shape, size) else "plain"
        detections.append(Detection(fit.shape, color, pattern, size, (box[1].start + fit.x) / WORK_SIZE,
                                    (box[0].start + fit.y) / WORK_SIZE, fit.extent / WORK_SIZE))
    return classify_background(profile), detections


def analyze(image: np.ndarray | Image.Image, expectation: Expectation) -> dict[Claim, bool]:
    """Each claim of the expectation -> whether the image shows it."""
    background, detections = detect(image)
    return check(expectation, detections, background, strict=False)


# ----------------------------------------------------------------------------- accuracy

KINDS = ("background", "shape", "color", "pattern", "size", "count", "position")


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
    return _with_relations(scene, strict=True, holding=True)


def _with_relations(scene: Scene, strict: bool, holding: bool) -> Expectation:
    """Everything about the scene, with the relations between named objects that do (or do
    not) hold by the strict (caption) or lenient (analyzer) rule."""
    full = full_expectation(scene)
    named = [ObjectQuery(o.shape, o.color) for o in scene.objects
             if sum((p.shape, p.color) == (o.shape, o.color) for p in scene.objects) == 1]
    first = len(full.objects)
    relations = tuple(RelationQuery(first + a, rel, first + b)
                      for a, qa in enumerate(named) for b, qb in enumerate(named) if a != b
                      for rel in RELATIONS if relation_holds(*_only(scene, qa, qb), rel, strict) == holding)
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
    # any relation the analyzer's own lenient rule rejects: also the near misses a caption
    # never states ("left of" when mostly above), and "next to" when far apart
    untrue = _with_relations(scene, strict=False, holding=False)
    if untrue.relations:
        wrong.append(("position", replace(untrue, relations=(rng.choice(untrue.relations),))))
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
