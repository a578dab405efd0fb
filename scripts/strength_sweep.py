"""At what noise level does the model lose a scene? Where adherence fails: layout or drawing.

    python scripts/strength_sweep.py [MODEL] [--scenes 48] [--cfg 7] [--strengths 0.2,0.4,0.6,0.8,1]
                                     [--seed 321] [--sheet sheet.png]

Renders unseen training-world scenes and re-generates each one with img2img from its own render
(denoising strength s: the render is noised part-way down the schedule and sampled back) and its
own caption, then asks the adherence analyzer whether the caption's claims still hold. At a small
strength the model only repairs the noise, so the pass rate approaches the VAE's round trip
(scripts/vae_ceiling.py); at 1 it draws from nothing, which is what the adherence benchmark
measures. The strength at which the rate collapses says what the UNet cannot do: if it already
loses shapes at 0.4-0.6, where the layout and colours are still in the noisy latent, it cannot
draw them even when told where; if only near 1, it draws but cannot lay out a scene from words.

`--seed 2 --scenes 32` takes the first 32 scenes of the UNet's training pool instead (the unet
recipe's seed; a pool of n scenes starts with these), which asks whether the UNet can redraw
scenes it was trained on, or, after training on a small pool, scenes it has memorised.
`--sheet` saves the first 8 scenes: the renders in the top row, then a row per strength.
"""

from __future__ import annotations

import argparse
import random

import numpy as np
from PIL import Image

import sfumato
from sfumato.world import render, sample_scenes
from sfumato.world.adherence import claim_report
from sfumato.world.analyzer import analyze
from sfumato.world.captions import describe

SEED = 321  # a stream of scenes apart from the training pools and vae_ceiling.py's
SHEET_SCENES = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None, help="model folder or file; default: built-in")
    parser.add_argument("--scenes", type=int, default=48)
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--strengths", default="0.2,0.4,0.6,0.8,1")
    parser.add_argument("--seed", type=int, default=SEED, help="the stream of scenes (2: the UNet's training pool)")
    parser.add_argument("--sheet", help="save a contact sheet of the first scenes here (PNG)")
    args = parser.parse_args()
    pipe = sfumato.load(args.model, device="cpu")
    size = pipe.model.default_size
    scenes = sample_scenes(args.seed, args.scenes, "train")
    described = [describe(scene, random.Random(f"sweep/{i}")) for i, scene in enumerate(scenes)]
    renders = [Image.fromarray(render(scene, size)) for scene in scenes]
    print(f"model {pipe.model.name}  {args.scenes} scenes of stream {args.seed}  cfg {args.cfg}  {args.steps} steps")
    rows = [renders[:SHEET_SCENES]]
    for strength in (float(s) for s in args.strengths.split(",")):
        images = [pipe.generate(prompt=caption, seed=i, steps=args.steps, cfg_scale=args.cfg,
                                denoising_strength=strength, init_image=init)[0].image
                  for i, ((caption, _), init) in enumerate(zip(described, renders, strict=True))]
        claim_sets = (analyze(image, expectation) for image, (_, expectation) in zip(images, described, strict=True))
        print(f"strength {strength:.1f}: {claim_report(claim_sets)}", flush=True)
        rows.append(images[:SHEET_SCENES])
    if args.sheet:
        sheet = np.concatenate([np.concatenate([np.asarray(im.convert("RGB")) for im in row], 1) for row in rows], 0)
        Image.fromarray(sheet).save(args.sheet)

if __name__ == "__main__":
    main()
