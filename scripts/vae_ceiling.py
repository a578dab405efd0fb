"""How much of a scene survives the VAE? An upper bound on prompt adherence.

    python scripts/vae_ceiling.py [MODEL] [--scenes 200] [--split train|concept|heldout|eval]

Renders unseen scenes (of the training split, or another: "concept" holds the held-out shapes and
patterns a LoRA is to teach), passes them through the model's VAE (encode, then decode
the posterior mean) and asks the adherence analyzer whether each image still shows everything
its scene holds. A UNet can only make latents the decoder can turn into a picture, so the round
trip's pass rate bounds what the adherence benchmark can score. Prints the pass rate of the
renders and of their round trips, and the share of each kind of claim that the round trip loses.
"""

from __future__ import annotations

import argparse

import numpy as np

import sfumato  # isort: skip  (before torch: it makes idle OpenMP threads sleep, read at torch's import)
import torch

from sfumato.train.data import to_model_images
from sfumato.world import render, sample_scenes
from sfumato.world.adherence import claim_report
from sfumato.world.analyzer import analyze, true_expectation
from sfumato.world.scenes import SPLITS

SEED = 123  # a stream of scenes apart from the training pools (seeds 0..2) and the eval ones


@torch.inference_mode()
def round_trip(vae, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """(n, H, W, 3) uint8 -> the same through encode (posterior mean) and decode."""
    out = []
    for start in range(0, len(images), batch):
        z = vae.encode(to_model_images(images[start:start + batch], torch.device("cpu"))).latent_dist.mean
        y = vae.decode(z).sample.float().clamp(-1, 1)
        out.append(((y + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None, help="model folder or file; default: built-in")
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--split", default="train", choices=SPLITS)
    args = parser.parse_args()
    vae = sfumato.load(args.model, device="cpu").model.vae
    scenes = sample_scenes(SEED, args.scenes, args.split)
    renders = np.stack([render(scene, vae.config.sample_size) for scene in scenes])
    for name, images in (("renders", renders), ("VAE round trips", round_trip(vae, renders))):
        report = claim_report(analyze(image, true_expectation(scene)) for image, scene in zip(images, scenes, strict=True))
        print(f"{name}: {report}")

if __name__ == "__main__":
    main()
