"""The shapes world: seeded scenes of flat shapes, their renders, captions and an analyzer.

    from sfumato.world import sample_scene, render, caption, ShapesDataset
    scene = sample_scene(random.Random(0), "train")
    image = render(scene, 128)            # (128, 128, 3) uint8

ShapesDataset (torch) and the analyzer are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from sfumato.world.captions import (
    Claim,
    Expectation,
    ObjectQuery,
    RelationQuery,
    caption,
    check,
    describe,
)
from sfumato.world.render import render
from sfumato.world.scenes import (
    COLORS,
    PATTERNS,
    RELATIONS,
    SHAPES,
    SIZES,
    SPLITS,
    ObjectSpec,
    Scene,
    held_out,
    sample_scene,
    sample_scenes,
    vocabulary,
)

_LAZY = {"ShapesDataset": "sfumato.world.dataset", "export_folder": "sfumato.world.dataset",
         "analyze": "sfumato.world.analyzer"}

__all__ = ["COLORS", "PATTERNS", "RELATIONS", "SHAPES", "SIZES", "SPLITS", "Claim", "Expectation",
           "ObjectQuery", "ObjectSpec", "RelationQuery", "Scene", "caption", "check", "describe",
           "held_out", "render", "sample_scene", "sample_scenes", "vocabulary", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sfumato.world' has no attribute {name!r}")
