"""Does a model draw the shape it is asked for? Text-to-image on one-object scenes.

    python scripts/one_object_scenes.py [MODEL] [--scenes 48] [--sheet sheet.png]

The adherence benchmark's prompts mostly hold several objects, and each of their claims needs the
named shape first, so a model that draws blobs scores near 0 whatever else it gets right. This asks
for the simplest scenes the world makes (one medium or large object, captioned as in training),
generates each from its caption (default sampler, 20 steps, CFG 7, seed = the scene's index), and
prints the analyzer's pass rates by kind of claim. `--sheet` saves the renders above the images, and
below them each of the training shapes asked for in red on white, at three seeds.
"""

from __future__ import annotations

import argparse
import random

import numpy as np
from PIL import Image

import sfumato
from sfumato.world import render, sample_scenes, vocabulary
from sfumato.world.adherence import claim_report
from sfumato.world.analyzer import analyze
from sfumato.world.captions import describe

SEED = 777  # a stream of scenes apart from the training pools and the other scripts' scenes


def one_object_scenes(n: int, split: str) -> list:
    scenes = sample_scenes(SEED, 40 * n, split)
    return [s for s in scenes if len(s.objects) == 1 and s.objects[0].size != "small"][:n]


def shape_rows(pipe, seeds: tuple[int, ...] = (0, 1, 2)) -> np.ndarray:
    """Each shape the training split holds, asked for alone in red on white: a row per seed."""
    rows = []
    for seed in seeds:
        images = [pipe.generate(prompt=f"a large red {shape} on a white background", seed=seed,
                                steps=20, cfg_scale=7)[0].image for shape in vocabulary("train")[0]]
        rows.append(np.concatenate([np.asarray(im.convert("RGB")) for im in images], 1))
    return np.concatenate(rows, 0)


def stack(rows: list[np.ndarray]) -> np.ndarray:
    """Rows of images one above another, the narrower ones padded with white on the right."""
    width = max(row.shape[1] for row in rows)
    return np.concatenate([np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0)), constant_values=255)
                           for row in rows], 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="model folder or file (default: the built-in model)")
    parser.add_argument("--scenes", type=int, default=48)
    parser.add_argument("--split", default="train", help="world split the scenes come from")
    parser.add_argument("--sheet", help="save renders, images and the shape rows to this PNG")
    args = parser.parse_args()

    pipe = sfumato.load(args.model, device="cpu")
    scenes = one_object_scenes(args.scenes, args.split)
    described = [describe(s, random.Random(f"one-object/{i}")) for i, s in enumerate(scenes)]
    images = [pipe.generate(prompt=caption, seed=i, steps=20, cfg_scale=7)[0].image
              for i, (caption, _) in enumerate(described)]
    claims = (analyze(image, expected) for image, (_, expected) in zip(images, described, strict=True))
    print(args.model or "built-in", claim_report(claims))
    if args.sheet:
        shown = min(8, len(scenes))
        renders = np.concatenate([render(s, 128) for s in scenes[:shown]], 1)
        drawn = np.concatenate([np.asarray(im.convert("RGB")) for im in images[:shown]], 1)
        Image.fromarray(stack([renders, drawn, shape_rows(pipe)])).save(args.sheet)


if __name__ == "__main__":
    main()
