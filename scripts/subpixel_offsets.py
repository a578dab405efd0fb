"""How much of an object's latent code is its offset within a latent pixel, against its shape?

    python scripts/subpixel_offsets.py [MODEL_OR_VAE_FOLDER] [--size large]

Renders each training shape, in red on white at the centre of the image and at 16 offsets within
one latent pixel (0, 2, 4, 6 px on each axis), encodes them, and compares, over the 8x8 latent
window around the object: the variance across offsets for a fixed shape, the variance across
shapes at one offset, and across shapes of the offset-averaged codes. A caption says nothing about
the offset, so a UNet that cannot tell which offset it is drawing learns the mean of the offsets'
codes: when the offsets vary the code as much as the shapes do, that mean is a blob (session 18;
`data.grid` in the UNet recipes trains on scenes whose objects lie on the latent grid).
"""

from __future__ import annotations

import argparse

import numpy as np

import sfumato  # noqa: F401  # isort: skip  (before torch: it makes idle OpenMP threads sleep, read at torch's import)
import torch

from sfumato.train.unet import encode_latents
from sfumato.world import render, vocabulary
from sfumato.world.scenes import SIZES, ObjectSpec, Scene

OFFSETS = [(dx, dy) for dx in range(0, 8, 2) for dy in range(0, 8, 2)]  # pixels, within one latent pixel


def main() -> None:
    # a sibling script: scripts/ is on sys.path when this runs as a script
    from latent_margins import load_vae

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="model folder or `sfumato train vae` output [built-in model]")
    parser.add_argument("--size", default="large", choices=list(SIZES))
    args = parser.parse_args()

    vae = load_vae(args.model)
    shapes = vocabulary("train")[0]
    scenes = [Scene("white", (ObjectSpec(shape, "red", args.size, (64 + dx) / 128, (64 + dy) / 128),))
              for shape in shapes for dx, dy in OFFSETS]
    pixels = np.stack([render(scene, 128) for scene in scenes])
    with torch.no_grad():
        latents = encode_latents(vae, pixels, torch.device("cpu"))[0] * vae.config.scaling_factor
    codes = latents[:, :, 4:12, 4:12].reshape(len(shapes), len(OFFSETS), -1)  # the window around the object
    offsets = codes.var(1).sum(-1).mean().item()
    shapes_at_one_offset = codes[:, 0].var(0).sum().item()
    shapes_of_the_mean = codes.mean(1).var(0).sum().item()
    print(f"{args.size} objects, latent variance (summed over the window): across offsets, per shape "
          f"{offsets:.1f}; across shapes at one offset {shapes_at_one_offset:.1f}; across shapes of the "
          f"offset-averaged codes {shapes_of_the_mean:.1f}; offsets / shapes {offsets / shapes_at_one_offset:.2f}")


if __name__ == "__main__":
    main()
