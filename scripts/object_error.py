"""Where does the UNet lose the objects? Its x0 error on object latents and on the background, by t.

    python scripts/object_error.py [MODEL] [--scenes 256] [--pairs]

Renders unseen scenes, encodes them, noises them to t and asks the UNet for x0 with each scene's
caption. A latent pixel "touches an object" when any of its 8x8 image pixels lies on or beside one
(train.vae.object_weights' mask). Prints, by t, the mean squared x0 error on those latent pixels
and on the rest, and the objects' share of the whole error; then, at t = 950, the error with an
empty caption and with another scene's caption: if they equal the right caption's, the text is
not used. Last, the object error at t = 400 and 600 (--swap-timesteps) when one word of each caption is swapped for
another of its kind (the first shape word, or the first colour word), beside how far that moves the
text encoder's hidden states: a UNet that draws what it is told loses accuracy on objects when
the caption names the wrong shape; and, where the model folder has CLIP's vision tower, how often
CLIP itself scores the right caption above the swapped one. Session 7 found the shipped text encoder's states moving 13 %
for a shape word against 76 % for a colour word. Session 6 found the shipped UNet's object error at 19 % of the objects' own variance at
t = 400 and 48 % at t = 600, with 80 % of all error on objects: the model fails to rebuild an
object it half sees, whatever the loss weighting.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import sfumato  # isort: skip  (before torch: it makes idle OpenMP threads sleep, read at torch's import)
import torch
import torch.nn.functional as F

from sfumato.checkpoints import BUILTIN_MODEL
from sfumato.train.assemble import load_clip
from sfumato.train.clip import swap_choice
from sfumato.train.data import (
    EVAL_SEED_OFFSET,
    SceneMix,
    eval_captions,
    load_tokenizer,
    render_pool,
    to_model_images,
    tokenize,
)
from sfumato.train.unet import encode_latents
from sfumato.train.vae import object_weights, row_backgrounds
from sfumato.world.captions import SWAP_KINDS, swap_word

TIMESTEPS = (100, 250, 400, 600, 800)


@torch.inference_mode()
def x0_error(pipe, latents: torch.Tensor, context: torch.Tensor, t: int) -> torch.Tensor:
    """(b, 1, h, w) squared error of the x0 estimate at timestep t, averaged over channels."""
    model, unet = pipe.model, pipe.model.unet
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(t))
    alpha_bar = model.alphas_cumprod[t].float()
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    noisy = a * latents + s * noise
    out = unet(noisy.to(unet.dtype), torch.full((len(latents),), t), context.to(unet.dtype)).sample.float()
    x0 = a * noisy - s * out if model.prediction_type == "v_prediction" else (noisy - s * out) / a
    return (x0 - latents).pow(2).mean(1, keepdim=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", default=None, help="default: the built-in model")
    parser.add_argument("--scenes", type=int, default=256)
    parser.add_argument("--swap-timesteps", default="400,600",
                        help="comma-separated timesteps of the swapped-word comparison (layout is decided at high t)")
    parser.add_argument("--pairs", action="store_true",
                        help="lined-up pairs of large plain objects (a relation curriculum's scenes) instead of the "
                             "world's mix; the captions still in the world's wordings")
    args = parser.parse_args()
    swap_timesteps = [int(t) for t in args.swap_timesteps.split(",")]
    pipe = sfumato.load(args.model, device="cpu")
    vae, text_encoder = pipe.model.vae, pipe.model.text_encoders[0]
    mix = SceneMix(simple_share=1.0, simple_objects=2) if args.pairs else SceneMix()
    pixels, scenes = render_pool(EVAL_SEED_OFFSET + 7, args.scenes, "train", pipe.model.default_size, mix=mix)
    with torch.inference_mode():
        latents = encode_latents(vae, pixels, torch.device("cpu"))[0] * vae.config.scaling_factor
        tokenizer = load_tokenizer()
        context = text_encoder(tokenize(tokenizer, eval_captions(scenes, 7))).last_hidden_state.float()
        empty = text_encoder(tokenize(tokenizer, [""] * len(scenes))).last_hidden_state.float()
    images = to_model_images(pixels, torch.device("cpu"))
    on_object = object_weights(images, 1.0, torch.from_numpy(row_backgrounds(pixels))) - 1
    mask = F.max_pool2d(on_object, pixels.shape[1] // latents.shape[-1])  # latent pixels touching one
    spread = (latents - latents.mean((2, 3), keepdim=True)).pow(2).mean(1, keepdim=True)
    print(f"{args.scenes} unseen scenes; latent pixels touching an object: {mask.mean():.2f}; "
          f"their variance around the image mean: {(spread * mask).sum() / mask.sum():.3f}")
    print(f"{'t':>5}{'object':>10}{'background':>12}{'objects share':>15}")
    for t in TIMESTEPS:
        error = x0_error(pipe, latents, context, t)
        on, off = (error * mask).sum() / mask.sum(), (error * (1 - mask)).sum() / (1 - mask).sum()
        print(f"{t:>5}{on:>10.4f}{off:>12.4f}{(error * mask).sum() / error.sum():>15.2f}")
    right, none, wrong = (x0_error(pipe, latents, c, 950).mean().item() for c in (context, empty, context.roll(1, 0)))
    print(f"t = 950, x0 error with the right caption {right:.3f}, an empty one {none:.3f}, "
          f"another scene's {wrong:.3f}")
    captions = eval_captions(scenes, 7)
    folder = Path(args.model or BUILTIN_MODEL)
    clip = load_clip(folder) if (folder / "clip").is_dir() else None
    for kind, words in SWAP_KINDS.items():
        rng = random.Random(kind)
        swapped = [swap_word(c, words, rng) for c in captions]
        keep = torch.tensor([c is not None for c in swapped])
        if not keep.any():  # no number words in pairs' captions
            print(f"{kind} word swapped: no caption names one")
            continue
        with torch.inference_mode():
            moved = text_encoder(tokenize(tokenizer, [c for c in swapped if c is not None])).last_hidden_state.float()
        shift = ((moved - context[keep]).norm() / context[keep].norm()).item()
        errors = []
        for t in swap_timesteps:
            right, wrong = (x0_error(pipe, latents[keep], c, t) for c in (context[keep], moved))
            errors.append(f"t = {t} {(right * mask[keep]).sum() / mask[keep].sum():.4f} / "
                          f"{(wrong * mask[keep]).sum() / mask[keep].sum():.4f}")
        print(f"{kind} word swapped ({int(keep.sum())} captions): text states move {shift:.0%}; object x0 "
              f"error right / swapped at {', '.join(errors)}")
        if clip is not None:
            print(f"  CLIP itself prefers the right caption to a swapped one for "
                  f"{swap_choice(clip, images, captions, words, tokenizer):.0%} of the images (50 %: it cannot "
                  "tell them apart)")


if __name__ == "__main__":
    main()
