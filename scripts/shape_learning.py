"""How many samples does a UNet take to learn to draw shapes, on which scenes? A learning curve in minutes.

    python scripts/shape_learning.py --mix white --out runs/shapes_white --minutes 25
    python scripts/shape_learning.py --mix one --out runs/shapes_one --minutes 25

Trains a UNet of a recipe's size (default: the shipped one's) from scratch on one CPU thread, on the
candidate VAE's latents and its frozen text encoder, on a scene mix:
  white   one large plain object on white, captioned "a large C S on a white background"
          (world.captions.plain_caption)
  white-worded  the same scenes with the world's captions (varied wording and word order)
  simple  world.scenes.is_simple scenes (one large plain object on a plain colour), world captions
  half    half simple scenes, half the world's usual mix (the trainer's data.simple_share = 0.5)
  one     the world's one-object scenes with a medium or large object (patterns, skies), world captions
  full    the world's usual mix
Every --eval-every minutes it asks the EMA weights for each training shape, large, on white (6 seeds,
DDIM 20 steps, CFG 5), and prints a JSON line: samples seen, the share of images holding one object,
and the share whose one object the analyzer calls the shape asked for (chance: 1/8); it saves the
images as sheet_STEP.png (a column per shape). Session 20: after 117k samples, white 0.53, while on
one the shapes were still blobs (0.10 after 69k samples, white 0.31 there); measured by this script's
first version, which warmed up over 100 steps instead of the recipe's 200 and drew its white scenes
itself (held-out shape/colour pairs among them); since session 21 every mix is drawn as the trainer
draws it (train.data.SceneMix).

--init starts from an earlier run's out/unet (its EMA weights, saved at each evaluation): a curriculum's
later stage. With --minutes 0 it only scores the --init UNet, on --model's VAE and text encoder: any
trainer's output (a folder holding vae/, text_encoder/ and unet/, links will do).

A bare training loop rather than `sfumato train unet`: each mix's captions are encoded once, and the
curve is measured on the run's own clock.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DConditionModel

from sfumato.train.common import denoising_loss, load_recipe, offset_noise, save_grid
from sfumato.train.data import SceneMix, load_tokenizer, random_captions, render_pool
from sfumato.train.unet import (
    build_scheduler,
    build_unet,
    encode_latents,
    generate,
    load_frozen,
    text_hidden,
)
from sfumato.world import render, sample_scenes
from sfumato.world.analyzer import detect
from sfumato.world.scenes import Scene, snap_to_grid, vocabulary

COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "gray", "cyan"]
MIXES = {  # name: (the pool's scenes, caption style)
    "white": (SceneMix(16, 1.0, ("white",)), "plain"),
    "white-worded": (SceneMix(16, 1.0, ("white",)), "world"),
    "simple": (SceneMix(16, 1.0), "world"),
    "half": (SceneMix(16, 0.5), "world"),
    "one": (SceneMix(16), "world"),
    "full": (SceneMix(16), "world"),
}


def training_pool(mix: str, n: int, seed: int) -> tuple[np.ndarray, list[Scene], list[list[str]]]:
    """n scenes of the mix on the 16x16 latent grid, drawn as the trainer draws them, their renders,
    and the captions of each (4 of the world's, or the one plain caption)."""
    scenes_of, style = MIXES[mix]
    if mix == "one":
        scenes = [s for s in sample_scenes(seed, 8 * n) if len(s.objects) == 1 and s.objects[0].size != "small"][:n]
        scenes = [snap_to_grid(s, 16) for s in scenes]
        pixels = np.stack([render(s, 128) for s in scenes])
    else:
        pixels, scenes = render_pool(seed, n, "train", 128, workers=1, mix=scenes_of)
    keys = range(1 if style == "plain" else 4)
    return pixels, scenes, [list(c) for c in zip(*(random_captions(scenes, seed, k, style=style) for k in keys), strict=True)]


def shape_scores(unet, text_encoder, tokenizer, vae, scheduler, out: Path, step: int) -> dict:
    shapes = vocabulary("train")[0]
    prompts = [f"a large {COLORS[(i * 3 + j) % len(COLORS)]} {s} on a white background"
               for j in range(6) for i, s in enumerate(shapes)]
    images = torch.cat([generate(unet, text_encoder, tokenizer, vae, scheduler, prompts[k : k + 16], steps=20,
                                 guidance=5.0, seed=k) for k in range(0, len(prompts), 16)])
    save_grid(images, out / f"sheet_{step:06d}.png", ncols=len(shapes))
    pixels = ((images.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    found = [detect(p)[1] for p in pixels]
    one = [len(f) == 1 for f in found]
    right = [len(f) == 1 and f[0].shape == prompt.split()[3] for f, prompt in zip(found, prompts, strict=True)]
    return {"one_object": round(float(np.mean(one)), 3), "shape_right": round(float(np.mean(right)), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mix", choices=list(MIXES), default="white")
    parser.add_argument("--out", required=True)
    parser.add_argument("--minutes", type=float, default=25)
    parser.add_argument("--eval-every", type=float, default=5, help="minutes")
    parser.add_argument("--scenes", type=int, default=4000)
    parser.add_argument("--recipe", default="unet", help="the UNet's size and learning rate come from it")
    parser.add_argument("--model", default="train_checkpoints/candidate", help="the VAE and text encoder")
    parser.add_argument("--min-snr", type=float, default=0.0)
    parser.add_argument("--lr", type=float, help="default: the recipe's")
    parser.add_argument("--init", help="a UNet folder to start from (a curriculum's earlier stage) instead of noise")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    out, device = Path(args.out), torch.device("cpu")
    out.mkdir(parents=True, exist_ok=True)
    recipe = load_recipe(args.recipe, gpu=False)
    vae, text_encoder = load_frozen(Path(args.model), Path(args.model), device)
    tokenizer = load_tokenizer()
    pixels, scenes, captions = training_pool(args.mix, args.scenes, args.seed)
    mean, std = encode_latents(vae, pixels, device)
    texts = sorted({c for row in captions for c in row}) + [""]
    states = torch.cat([text_hidden(text_encoder, tokenizer, texts[k : k + 256], device) for k in range(0, len(texts), 256)])
    where = {c: i for i, c in enumerate(texts)}
    caption_rows = [[where[c] for c in row] for row in captions]
    scheduler = build_scheduler("epsilon")
    if args.init:
        unet = UNet2DConditionModel.from_pretrained(args.init)
    else:
        unet = build_unet(recipe["model"], text_encoder.config.hidden_size, mean.shape[-1])
    lr = args.lr or recipe["lr"]
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=recipe["weight_decay"])
    from diffusers.training_utils import EMAModel

    ema = EMAModel(unet.parameters(), decay=recipe["ema_decay"], use_ema_warmup=True, power=2 / 3)
    g = torch.Generator().manual_seed(args.seed)
    batch, scale, step, losses = recipe["batch_size"], vae.config.scaling_factor, 0, []
    start, next_eval = time.time(), args.eval_every
    while True:
        minutes = (time.time() - start) / 60
        if minutes >= min(next_eval, args.minutes):
            ema.store(unet.parameters())
            ema.copy_to(unet.parameters())
            scores = shape_scores(unet.eval(), text_encoder, tokenizer, vae, scheduler, out, step)
            unet.save_pretrained(out / "unet")  # the EMA weights: a later stage's --init
            ema.restore(unet.parameters())
            unet.train()
            print(json.dumps({"step": step, "samples": step * batch, "minutes": round(minutes, 1),
                              "loss": round(float(np.mean(losses[-200:])), 4), **scores}), flush=True)
            next_eval += args.eval_every
            if minutes >= args.minutes:
                break
        rows = torch.randint(0, len(scenes), (batch,), generator=g)
        latents = (mean[rows] + std[rows] * torch.randn(std[rows].shape, generator=g)) * scale
        noise = offset_noise(latents.shape, recipe["noise_offset"], g, device)
        timesteps = torch.randint(0, 1000, (batch,), generator=g)
        text = [caption_rows[r][int(torch.randint(0, len(caption_rows[r]), (1,), generator=g))] for r in rows.tolist()]
        text = torch.tensor([len(texts) - 1 if drop else i for i, drop in
                             zip(text, (torch.rand(batch, generator=g) < recipe["caption_dropout"]).tolist(), strict=True)])
        prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, states[text]).sample
        loss = denoising_loss(prediction, noise, scheduler.alphas_cumprod[timesteps], "epsilon", args.min_snr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), recipe["grad_clip"])
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / recipe["warmup_steps"])
        optimizer.step()
        ema.step(unet.parameters())
        losses.append(loss.item())
        step += 1


if __name__ == "__main__":
    main()
