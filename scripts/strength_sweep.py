"""At what noise level does the model lose a scene? Where adherence fails: layout or drawing.

    python scripts/strength_sweep.py [MODEL] [--scenes 48] [--cfg 7] [--strengths 0.2,0.4,0.6,0.8,1]

Renders unseen training-world scenes and re-generates each one with img2img from its own render
(denoising strength s: the render is noised part-way down the schedule and sampled back) and its
own caption, then asks the adherence analyzer whether the caption's claims still hold. At a small
strength the model only repairs the noise, so the pass rate approaches the VAE's round trip
(scripts/vae_ceiling.py); at 1 it draws from nothing, which is what the adherence benchmark
measures. The strength at which the rate collapses says what the UNet cannot do: if it already
loses shapes at 0.4-0.6, where the layout and colours are still in the noisy latent, it cannot
draw them even when told where; if only near 1, it draws but cannot lay out a scene from words.
"""

from __future__ import annotations

import argparse
import random

from PIL import Image

import sfumato
from sfumato.world import render, sample_scenes
from sfumato.world.adherence import claim_report
from sfumato.world.analyzer import analyze
from sfumato.world.captions import describe

SEED = 321  # a stream of scenes apart from the training pools and vae_ceiling.py's


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None, help="model folder or file; default: built-in")
    parser.add_argument("--scenes", type=int, default=48)
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--strengths", default="0.2,0.4,0.6,0.8,1")
    args = parser.parse_args()
    pipe = sfumato.load(args.model, device="cpu")
    size = pipe.model.default_size
    scenes = sample_scenes(SEED, args.scenes, "train")
    described = [describe(scene, random.Random(f"sweep/{i}")) for i, scene in enumerate(scenes)]
    renders = [Image.fromarray(render(scene, size)) for scene in scenes]
    print(f"model {pipe.model.name}  {args.scenes} scenes  cfg {args.cfg}  {args.steps} steps")
    for strength in (float(s) for s in args.strengths.split(",")):
        claim_sets = (analyze(pipe.generate(prompt=caption, seed=i, steps=args.steps, cfg_scale=args.cfg,
                                            denoising_strength=strength, init_image=init)[0].image, expectation)
                      for i, ((caption, expectation), init) in enumerate(zip(described, renders, strict=True)))
        print(f"strength {strength:.1f}: {claim_report(claim_sets)}", flush=True)

if __name__ == "__main__":
    main()
