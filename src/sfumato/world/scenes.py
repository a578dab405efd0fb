"""Scenes of the shapes world: vocabulary, dataclasses, seeded sampling and the split rules.

A scene is a background and 1-4 flat shapes. Everything a caption or the analyzer may claim
about an image is a fact of its Scene, so claims (captions.py) can be checked against a Scene
(ground truth) or against what the analyzer sees in pixels. What is held out of training is data, in heldout.json next to this file.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from importlib import resources

import numpy as np

from sfumato.errors import SfumatoError

# Far apart in RGB (pairwise distance >= 80) so that blur, noise and a colour shift keep them apart.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 215, 30),
    "green": (40, 160, 60),
    "blue": (35, 75, 215),
    "purple": (130, 50, 175),
    "pink": (245, 125, 190),
    "brown": (125, 75, 35),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    "gray": (130, 130, 130),
    "cyan": (30, 200, 215),
}
# Background kinds other than a flat named colour: (top colour, bottom colour, horizon or None).
# "grass and sky" is sky above the horizon and grass below it; "night" also gets small stars.
BACKGROUND_KINDS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "gradient sky": ((70, 130, 220), (185, 215, 245)),
    "grass and sky": ((90, 150, 230), (170, 205, 240), (70, 150, 50), (45, 115, 35)),
    "night": ((10, 15, 45), (25, 35, 80)),
}
HORIZON = 0.62  # where grass starts in "grass and sky", as a fraction of the height

SHAPES = ("circle", "square", "triangle", "star", "heart", "diamond", "cross", "ring",
          "hexagon", "crescent")
PATTERNS = ("plain", "striped", "dotted", "checkered")
# Half the extent of an object, as a fraction of the image width (small is ~20 px at 128 px).
SIZES: dict[str, float] = {"small": 0.08, "medium": 0.13, "large": 0.19}
RELATIONS = ("left of", "right of", "above", "below", "next to")
SPLITS = ("train", "heldout", "concept", "eval")

MIN_OBJECT_CONTRAST = 90.0   # RGB distance between an object's colour and any background colour
MIN_PATTERN_CONTRAST = 70.0  # same for the pattern shade, so patterns never vanish into the background
EDGE_MARGIN = 0.04           # empty border, so the analyzer can read the background off the edges
OBJECT_GAP = 0.05            # minimum empty space between two objects


@dataclass(frozen=True)
class ObjectSpec:
    shape: str
    color: str
    size: str
    x: float  # centre, 0 = left edge, 1 = right edge
    y: float  # centre, 0 = top edge, 1 = bottom edge
    pattern: str = "plain"

    @property
    def radius(self) -> float:
        return SIZES[self.size]


@dataclass(frozen=True)
class Scene:
    background: str  # a COLORS name or a BACKGROUND_KINDS name
    objects: tuple[ObjectSpec, ...]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Scene:
        data = json.loads(text)
        return cls(data["background"], tuple(ObjectSpec(**o) for o in data["objects"]))


@dataclass(frozen=True)
class HeldOut:
    concept_shapes: frozenset[str]
    concept_patterns: frozenset[str]
    shape_color: frozenset[tuple[str, str]]
    shape_pattern: frozenset[tuple[str, str]]

    def is_concept(self, obj: ObjectSpec) -> bool:
        return obj.shape in self.concept_shapes or obj.pattern in self.concept_patterns

    def is_heldout_pair(self, obj: ObjectSpec) -> bool:
        return ((obj.shape, obj.color) in self.shape_color
                or (obj.shape, obj.pattern) in self.shape_pattern)


@lru_cache(maxsize=1)  # a memo of a pure function of a shipped file
def held_out() -> HeldOut:
    text = resources.files("sfumato.world").joinpath("heldout.json").read_text()
    data = json.loads(text)
    return HeldOut(frozenset(data["concept_shapes"]), frozenset(data["concept_patterns"]),
                   frozenset(map(tuple, data["shape_color"])),
                   frozenset(map(tuple, data["shape_pattern"])))


def scene_in_split(scene: Scene, split: str) -> bool:
    rules = held_out()
    concept = any(rules.is_concept(o) for o in scene.objects)
    heldout = any(rules.is_heldout_pair(o) for o in scene.objects)
    return {"train": not concept and not heldout, "heldout": heldout and not concept,
            "concept": concept, "eval": True}[split]


# ----------------------------------------------------------------------------- colours

def luminance(rgb: tuple[int, int, int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def pattern_shade(color: str) -> tuple[int, int, int]:
    """The second colour of a patterned object: darker for light colours, lighter for dark ones."""
    rgb = np.array(COLORS[color], dtype=np.float64)
    shade = rgb * 0.45 if luminance(COLORS[color]) > 110 else rgb + (255 - rgb) * 0.55
    return tuple(int(round(c)) for c in shade)


def background_colors(background: str) -> list[tuple[int, int, int]]:
    if background in COLORS:
        return [COLORS[background]]
    return list(BACKGROUND_KINDS[background])


def _distance(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return math.dist(a, b)


def _min_distance(rgb: tuple[int, int, int], background: str) -> float:
    return min(_distance(rgb, c) for c in background_colors(background))


def contrasts(obj_color: str, pattern: str, background: str) -> bool:
    """Whether an object of this colour (and pattern) stands out clearly on this background."""
    if obj_color == background:
        return False
    if _min_distance(COLORS[obj_color], background) < MIN_OBJECT_CONTRAST:
        return False
    return pattern == "plain" or _min_distance(pattern_shade(obj_color), background) >= MIN_PATTERN_CONTRAST


# ----------------------------------------------------------------------------- relations

def relation_holds(a: ObjectSpec, b: ObjectSpec, relation: str, strict: bool = True) -> bool:
    """`a <relation> b` in image coordinates (y grows downwards).

    strict: clear enough to be said in a caption; lenient (strict=False): what the analyzer
    accepts from a generated image, where positions are less exact.
    """
    margin, ratio = (0.12, 2.0) if strict else (0.03, 1.0)
    dx, dy = b.x - a.x, b.y - a.y
    if relation == "next to":
        gap = math.hypot(dx, dy) - a.radius - b.radius
        beside = relation_holds(a, b, "left of", strict) or relation_holds(a, b, "right of", strict)
        return beside and gap <= (0.15 if strict else 0.25)
    along, across = {"left of": (dx, dy), "right of": (-dx, dy),
                     "above": (dy, dx), "below": (-dy, dx)}[relation]
    return along > margin and along >= ratio * abs(across)


# ----------------------------------------------------------------------------- sampling

def as_random(rng: random.Random | np.random.Generator | int) -> random.Random:
    """One sampler for every rng type; a numpy Generator seeds a random.Random from itself."""
    if isinstance(rng, random.Random):
        return rng
    if isinstance(rng, np.random.Generator):
        return random.Random(int(rng.integers(2**63)))
    return random.Random(rng)


def vocabulary(split: str) -> tuple[list[str], list[str]]:
    """(shapes, patterns) the split's scenes may hold: all of them, or all but the held-out concepts."""
    rules = held_out()
    if split in ("concept", "eval"):
        return list(SHAPES), list(PATTERNS)
    return ([s for s in SHAPES if s not in rules.concept_shapes],
            [p for p in PATTERNS if p not in rules.concept_patterns])


def can_have_pattern(shape: str, size: str) -> bool:
    # A pattern needs room: a thin ring or a small shape would show only a few smeared pixels.
    return size != "small" and shape not in ("ring", "cross", "crescent")


def _draw_look(rng: random.Random, split: str, size: str) -> tuple[str, str, str]:
    """(shape, colour, pattern) for one object, obeying the split's vocabulary and pairs."""
    shapes, patterns = vocabulary(split)
    rules = held_out()
    while True:
        shape, color = rng.choice(shapes), rng.choice(list(COLORS))
        pattern = "plain"
        if can_have_pattern(shape, size) and rng.random() < 0.45:
            pattern = rng.choice(patterns[1:])
        obj = ObjectSpec(shape, color, size, 0.5, 0.5, pattern)
        if split != "train" or not rules.is_heldout_pair(obj):
            return shape, color, pattern


def _force_membership(rng: random.Random, split: str, look: tuple[str, str, str],
                     size: str) -> tuple[tuple[str, str, str], str]:
    """Turn the first object's look into a held-out pair / concept so the scene is in its split."""
    rules = held_out()
    shape, color, pattern = look
    if split == "heldout":
        if rng.random() < 0.5:
            shape, color = rng.choice(sorted(rules.shape_color))
        else:
            shape, pattern = rng.choice(sorted(rules.shape_pattern))
            size = size if size != "small" else "medium"
    elif split == "concept":
        if rng.random() < 0.6:
            shape = rng.choice(sorted(rules.concept_shapes))
        else:
            pattern = rng.choice(sorted(rules.concept_patterns))
            shape = shape if shape not in ("ring", "cross", "crescent") else "square"
            size = size if size != "small" else "medium"
    if not can_have_pattern(shape, size):
        pattern = "plain"
    return (shape, color, pattern), size


def _draw_sizes(rng: random.Random, n: int) -> list[str]:
    names = ["small", "medium", "large"] if n <= 2 else ["small", "medium"]
    return [rng.choice(names) for _ in range(n)]


def _place(rng: random.Random, radii: list[float], axis: str | None) -> list[tuple[float, float]] | None:
    """Centres with no overlap and an empty border; `axis` lines two objects up for a relation."""
    for _ in range(200):
        centres: list[tuple[float, float]] = []
        for r in radii:
            lo, hi = r + EDGE_MARGIN, 1 - r - EDGE_MARGIN
            x, y = rng.uniform(lo, hi), rng.uniform(lo, hi)
            if axis and centres:  # second of a lined-up pair: share the other coordinate, roughly
                jitter = rng.uniform(-0.04, 0.04)
                if axis == "horizontal":
                    y = min(max(centres[0][1] + jitter, lo), hi)
                else:
                    x = min(max(centres[0][0] + jitter, lo), hi)
            if all(math.dist((x, y), c) >= r + rc + OBJECT_GAP for c, rc in zip(centres, radii, strict=False)):
                centres.append((x, y))
            else:
                break
        if len(centres) == len(radii):
            return centres
    return None


def _draw_background(rng: random.Random, objects: list[ObjectSpec]) -> str | None:
    kinds = list(BACKGROUND_KINDS) if rng.random() < 0.5 else list(COLORS)
    options = [b for b in kinds if all(contrasts(o.color, o.pattern, b) for o in objects)]
    return rng.choice(options) if options else None


def _draw_scene(rng: random.Random, split: str, pair: bool = False) -> Scene | None:
    """pair: two different objects lined up (sample_pair_scene); the rng is drawn from as for any
    scene, so that the usual scenes stay what they were."""
    n = 2 if pair else rng.choices([1, 2, 3, 4], weights=[3, 4, 2, 1.5])[0]
    sizes = _draw_sizes(rng, n)
    identical = n >= 2 and rng.random() < (0.0 if pair else 0.3)  # "three yellow stars"
    if identical:
        sizes = [sizes[0]] * n
    looks = [_draw_look(rng, split, s) for s in sizes]
    if split in ("heldout", "concept"):
        looks[0], sizes[0] = _force_membership(rng, split, looks[0], sizes[0])
    if identical:
        looks, sizes = [looks[0]] * n, [sizes[0]] * n
    axis = rng.choice(["horizontal", "vertical"]) if n == 2 and rng.random() < (1.0 if pair else 0.7) else None
    centres = _place(rng, [SIZES[s] for s in sizes], axis)
    if centres is None:
        return None
    objects = [ObjectSpec(sh, co, si, round(x, 4), round(y, 4), pa)
               for (sh, co, pa), si, (x, y) in zip(looks, sizes, centres, strict=True)]
    background = _draw_background(rng, objects)
    return Scene(background, tuple(objects)) if background else None


def sample_scene(rng: random.Random | np.random.Generator | int, split: str = "train") -> Scene:
    """One random scene of `split`, fully determined by the rng's state."""
    if split not in SPLITS:
        raise SfumatoError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    rng = as_random(rng)
    while True:
        scene = _draw_scene(rng, split)
        if scene is not None and scene_in_split(scene, split):
            return scene


def sample_pair_scene(rng: random.Random, split: str = "train") -> Scene:
    """Two different objects side by side or one above the other, so that most of their captions
    say how they lie (`data.pair_share` in a UNet recipe). In the world's usual mix a relation is
    in ~23 % of the captions and the shipped UNet of session 27 did not use it at all: swapping
    "left" for "right" moved its x0 error by 0.1 % (scripts/object_error.py)."""
    while True:
        scene = _draw_scene(rng, split, pair=True)
        if scene is not None and scene_in_split(scene, split) and identity(scene.objects[0]) != identity(scene.objects[1]):
            return scene


def identity(obj: ObjectSpec) -> tuple[str, str, str, str]:
    """What tells objects apart in words: two objects with the same identity are "two red stars"."""
    return obj.shape, obj.color, obj.pattern, obj.size


def sample_scenes(seed: int, n: int, split: str = "train") -> list[Scene]:
    """n scenes; scene i depends only on (seed, i), so any prefix or slice is reproducible."""
    return [sample_scene(scene_rng(seed, i), split) for i in range(n)]


def is_simple(scene: Scene) -> bool:
    """One large plain object on a plain colour: the world's easiest scenes to learn shapes from
    (`data.simple_share` in a UNet recipe). From scratch, a UNet of the shipped size learns to draw
    the shapes of one large object on white, always captioned alike, in ~100k samples, where on the
    world's usual mix (several objects, small ones, patterns, skies) it draws blobs after 300k
    (session 20; scripts/shape_learning.py)."""
    (obj, *others) = scene.objects
    return not others and obj.size == "large" and obj.pattern == "plain" and scene.background in COLORS


def sample_simple_scene(rng: random.Random, split: str = "train",
                        backgrounds: tuple[str, ...] = (), objects: int = 1) -> Scene:
    """A simple scene (is_simple) of `split` drawn directly: one large plain object on one of
    `backgrounds` (default: any plain colour) that it contrasts with. Drawing world scenes until
    one is simple would take ~30 of them, ~350 for one on white.

    objects=2: two different large plain objects lined up, side by side or one above the other,
    so that a caption's relation is all that tells where each one lies (a relation curriculum:
    on the world's usual mix the shipped UNet never learnt to read one, session 28)."""
    unknown = sorted(set(backgrounds) - set(COLORS))
    if unknown:
        raise SfumatoError(f"simple scenes have a plain colour background, not {', '.join(unknown)}; "
                           f"allowed: {', '.join(COLORS)}")
    if objects not in (1, 2):
        raise SfumatoError(f"a simple scene holds 1 object or a lined-up pair of 2, not {objects}")
    shapes = vocabulary(split)[0]
    while True:
        background = rng.choice(list(backgrounds or COLORS))
        # the draws in this order keep one-object scenes what they were before pairs existed
        colors = [rng.choice([c for c in COLORS if contrasts(c, "plain", background)]) for _ in range(objects)]
        axis = rng.choice(["horizontal", "vertical"]) if objects == 2 else None
        centres = _place(rng, [SIZES["large"]] * objects, axis)
        if centres is None:
            continue
        scene = Scene(background, tuple(ObjectSpec(rng.choice(shapes), color, "large", round(x, 4), round(y, 4))
                                        for color, (x, y) in zip(colors, centres, strict=True)))
        if scene_in_split(scene, split) and len({identity(o) for o in scene.objects}) == objects:
            return scene


def snap_to_grid(scene: Scene, cells: int) -> Scene:
    """The scene with each object's centre moved to the nearest line of a cells x cells grid that
    keeps it inside the border; the scene unchanged where that would bring two objects too close.

    A UNet trained on a VAE's latents sees an object's sub-latent-pixel offset as part of its code:
    the same large star at 16 offsets within one latent pixel varies its latents half as much as a
    change of shape does (session 18), and a model unsure of that offset draws the mean of them, a
    blob. On the latent grid (cells = latent size) each shape has one code.
    """
    def snapped(value: float, radius: float) -> float:
        lo, hi = radius + EDGE_MARGIN, 1 - radius - EDGE_MARGIN
        lines = [k / cells for k in range(cells + 1) if lo <= k / cells <= hi]
        return min(lines, key=lambda line: abs(line - value)) if lines else value

    objects = tuple(replace(o, x=snapped(o.x, o.radius), y=snapped(o.y, o.radius)) for o in scene.objects)
    apart = all(math.dist((a.x, a.y), (b.x, b.y)) >= a.radius + b.radius + OBJECT_GAP / 2
                for i, a in enumerate(objects) for b in objects[i + 1:])
    return Scene(scene.background, objects) if apart else scene


def scene_rng(seed: int, index: int) -> random.Random:
    """The rng of scene `index` in the stream `seed` (what datasets and exports use)."""
    return random.Random(f"sfumato-world/{seed}/{index}")
