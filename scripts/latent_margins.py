"""Does the VAE's latent space set shapes apart? What a UNet's loss can see of a shape word.

    python scripts/latent_margins.py [MODEL_OR_VAE_FOLDER] [--scenes 200]

For unseen scenes, changes one object at a time (its shape for another shape, or its colour for
another colour, all else kept) and measures how far that moves the scene in pixels and in the
VAE's latents (posterior mean, scaled as the UNet sees them). A UNet trained with a mean squared
error only learns a word as far as the word moves the latents: if another shape moves them much
less than another colour does, the loss hardly rewards drawing the right shape, and a shape comes
back as a blob of the right colour (MODEL_CARD: sessions 7-14). "gain" is the latent move over
the pixel move, both relative to their own spread, so shape and colour can be compared fairly.
The argument is a model folder (its vae/) or a `sfumato train vae` output folder.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import replace
from pathlib import Path

import numpy as np

import sfumato  # noqa: F401  # isort: skip  (before torch: it makes idle OpenMP threads sleep, read at torch's import)
import torch

from sfumato.checkpoints import BUILTIN_MODEL
from sfumato.train.common import stage_folder
from sfumato.train.unet import encode_latents
from sfumato.world import COLORS, render, sample_scenes, vocabulary

SEED = 124  # a stream of scenes apart from the training pools and the other scripts'
BASE_SHAPES = vocabulary("train")[0]  # the shapes every split trains on


def load_vae(path: str | None):
    from diffusers import AutoencoderKL

    folder = stage_folder(Path(path or BUILTIN_MODEL), "vae")
    return AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32).eval()


def variants(scene, rng: random.Random) -> dict[str, object]:
    """The scene with its first object's shape, or its colour, swapped for another."""
    first = scene.objects[0]
    shape = rng.choice([s for s in BASE_SHAPES if s != first.shape])
    colour = rng.choice([c for c in COLORS if c not in (first.color, scene.background)])
    return {kind: replace(scene, objects=(replace(first, **{field: value}), *scene.objects[1:]))
            for kind, field, value in (("shape", "shape", shape), ("colour", "color", colour))}


@torch.inference_mode()
def scaled_latents(vae, renders: np.ndarray) -> torch.Tensor:
    """Posterior means of (n, H, W, 3) uint8 renders, scaled as the UNet sees them."""
    return encode_latents(vae, renders, torch.device("cpu"), batch=50)[0] * vae.config.scaling_factor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--scenes", type=int, default=200)
    args = parser.parse_args()
    vae = load_vae(args.model)
    size = vae.config.sample_size
    scenes = sample_scenes(SEED, args.scenes, "train")
    rng = random.Random(SEED)
    swapped = [variants(scene, rng) for scene in scenes]
    renders = np.stack([render(scene, size) for scene in scenes])
    pixels, z = renders.astype(np.float32) / 255, scaled_latents(vae, renders)
    pixel_var, latent_var = float(pixels.var()), float(z.var())
    print(f"{args.model or 'built-in'}: {len(scenes)} scenes; latent std {latent_var ** 0.5:.3f} (scaled)")
    for kind in ("shape", "colour"):
        other_renders = np.stack([render(v[kind], size) for v in swapped])
        other, z_other = other_renders.astype(np.float32) / 255, scaled_latents(vae, other_renders)
        # squared distance summed over the image, in units of one pixel's (one latent value's) variance
        pixel_move = ((other - pixels) ** 2).reshape(len(scenes), -1).sum(1) / pixel_var
        latent_move = (z_other - z).square().flatten(1).sum(1).numpy() / latent_var
        gain = (latent_move / z[0].numel()) / (pixel_move / pixels[0].size)
        print(f"  {kind:6s} swapped: pixel move {pixel_move.mean():7.1f}, latent move {latent_move.mean():6.2f}"
              f" (units of one value's variance); gain, median over scenes {np.median(gain):.2f}")


if __name__ == "__main__":
    main()
