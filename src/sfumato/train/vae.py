"""Stage 1: the VAE. 128x128 RGB <-> 16x16x4 latents (x8 like SD), L1 + MSE + a little KL.

After training the latent scale is measured on data (1 / std of the latents) and written to the
config's `scaling_factor`, as SD does, so that the UNet sees latents of unit variance.

`train_encoder = false` fine-tunes the decoder alone (what SD's ft-MSE VAE did): the latent space,
and so every UNet trained on it, stays valid while reconstructions get sharper. `[loss] anchor = w`
trains the encoder too but holds the latents of every scene the UNet could have seen to the starting
encoder's (w x their mean squared change): the latent space stays while the encoder learns what it lost.
"""

from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sfumato.errors import SfumatoError
from sfumato.train.assemble import load_saved, saved_weights
from sfumato.train.common import (
    EVAL_KEY,
    Run,
    atomic_write_text,
    ema_weights,
    loss_summary,
    make_trainable,
    param_count,
    save_grid,
    save_pretrained_atomic,
    train_loop,
    write_metrics,
)
from sfumato.train.data import EVAL_SEED_OFFSET, pixels_to_model, render_pool, to_model_images
from sfumato.world.dataset import concepts_in
from sfumato.world.scenes import SPLITS


def build_vae(model: dict):
    from diffusers import AutoencoderKL

    blocks = len(model["block_out_channels"])
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=model.get("latent_channels", 4),
        down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=tuple(model["block_out_channels"]), layers_per_block=model["layers_per_block"],
        norm_num_groups=model["norm_num_groups"], sample_size=model["sample_size"],
    )


def crops(pool: np.ndarray, index: np.ndarray, corners: np.ndarray, crop: int) -> np.ndarray:
    """crop x crop pixels of images `index` from their (y, x) corners (crop 0: whole images).

    The VAE is convolutional, so it learns the same from crops, at a fraction of the compute."""
    if not crop or crop >= pool.shape[1]:
        return pool[index]
    return np.stack([pool[i, y : y + crop, x : x + crop] for i, (y, x) in zip(index, corners, strict=True)])


class VAEWithPosterior(torch.nn.Module):
    """encode -> sample -> decode in forward(), so DDP syncs gradients of the whole VAE.

    latent_noise > 0: each image's latent gets Gaussian noise of a std drawn uniformly from
    [0, latent_noise], in units of the scaled latents the UNet works in. With a KL weight of 1e-6
    the posterior is nearly a point (std ~0.02 scaled), so a plain decoder only ever sees exact
    latents; then a latent error of 0.2, small next to a sampler's, decodes as a lattice of dots
    and stripes. Trained on perturbed latents, the decoder learns to draw what they mean.

    A decoder-only run knows its scale (the kept encoder's). When the encoder trains too, the scale
    is not known until the end, and noise of a fixed size would only teach the encoder to inflate
    its latents past it; so the unit is then the batch's own latent std (detached: what the scaling
    factor will normalise to). Then two scenes whose latents differ by less than the noise decode
    alike, which pushes the encoder to set apart by a margin what the decoder must tell apart (a
    star from a blob), and that margin is what the UNet's loss sees."""

    def __init__(self, vae, latent_noise: float = 0.0, relative: bool = False):
        super().__init__()
        self.vae = vae
        self.latent_noise = latent_noise
        self.relative = relative

    def forward(self, images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """(reconstruction, KL, posterior mean)."""
        posterior = self.vae.encode(images).latent_dist
        z = posterior.sample(generator)
        if self.latent_noise:
            unit = z.detach().float().std() if self.relative else 1 / self.vae.config.scaling_factor
            std = torch.rand(len(z), 1, 1, 1, generator=generator, device=z.device) * self.latent_noise
            noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
            z = z + std * noise * unit
        recon = self.vae.decode(z).sample
        return recon, posterior.kl().mean(), posterior.mean


@torch.no_grad()
def reconstruct(vae, images: Tensor, batch: int = 64) -> Tensor:
    """Decode of the posterior mean, in fp32 (what evaluation measures)."""
    parts = [vae.decode(vae.encode(x).latent_dist.mode()).sample for x in images.split(batch)]
    return torch.cat(parts).clamp(-1, 1)


def psnr(images: Tensor, recon: Tensor) -> float:
    """Mean PSNR in dB over images, on the [0, 1] scale."""
    mse = ((images - recon) / 2).square().flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


@torch.no_grad()
def latent_scaling_factor(vae, images: Tensor, generator: torch.Generator, batch: int = 64) -> float:
    """1 / std of posterior samples: SD's recipe for unit-variance latents."""
    latents = torch.cat([vae.encode(x).latent_dist.sample(generator) for x in images.split(batch)])
    return float(1.0 / latents.float().std())


def kept_latent_scale(run: Run) -> float:
    """The latent scale of the encoder a decoder-only run keeps (load_saved loads weights, not config).

    Read from the --init-from model, and noted in OUT so that a --resume finds it again."""
    note = run.out / "kept_encoder.json"
    if run.init_from:
        scale = saved_weights(run.init_from, "vae")[0]["scaling_factor"]
        atomic_write_text(note, json.dumps({"scaling_factor": scale, "init_from": str(run.init_from)}))
        return scale
    if not note.exists():
        raise SfumatoError("train_encoder = false (or [loss] anchor) needs --init-from (the model whose latent "
                           "space to keep)")
    return json.loads(note.read_text())["scaling_factor"]


def anchor_encoder(run: Run, model: dict) -> torch.nn.Module:
    """The encoder the run started from, frozen: images -> moments (mean, then log-variance).

    An anchored run (recipe [loss] anchor > 0) trains the encoder too, but holds its latents of every
    scene without a held-out concept to this encoder's, so that the UNet trained on them stays valid
    while the encoder learns to keep what it used to lose (the held-out checkered pattern)."""
    source = run.init_from or json.loads((run.out / "kept_encoder.json").read_text())["init_from"]
    start = build_vae(model)
    load_saved(start, source, "vae")
    return torch.nn.Sequential(start.encoder, start.quant_conv).requires_grad_(False).eval().to(run.device)


def latent_drift(mean: Tensor, anchor_moments: Tensor, scale: float) -> Tensor:
    """(b,) mean squared change of each image's posterior mean, in the scaled units the UNet works in."""
    anchor_mean = anchor_moments[:, : mean.shape[1]]
    return ((mean.float() - anchor_mean.float()) * scale).square().flatten(1).mean(1)


def row_backgrounds(images: np.ndarray, edge: int = 4) -> np.ndarray:
    """(b, H, W, 3) uint8 -> (b, H, 3) float: each row's background colour, the median of its
    `edge` leftmost and rightmost pixels. A scene's background varies only from row to row
    (world/render.py) and objects seldom reach the image's sides; a crop's sides can cut one."""
    sides = np.concatenate([images[:, :, :edge], images[:, :, -edge:]], axis=2)
    return np.median(sides, axis=2).astype(np.float32)


def object_weights(images: Tensor, weight: float, background: Tensor | None) -> Tensor:
    """(b, 1, h, w) loss weights: 1 on the background, 1 + weight on and around objects.

    Objects cover a few percent of a scene, so a plain pixel loss is nearly all background: the
    VAE learnt to blur a striped star into one orange blob and to drop small dark shapes, at a
    fine-looking PSNR. A pixel far from its row's background colour (`background`: (b, h, 3) in
    0..255, from row_backgrounds) belongs to an object (or a star); the mask is widened by 2 px
    to take in the edges. weight 0: all ones."""
    if not weight:
        return torch.ones_like(images[:, :1])
    rows = background.to(images.device).permute(0, 2, 1)[..., None] / 127.5 - 1  # (b, 3, h, 1)
    mask = ((images - rows).abs().amax(dim=1, keepdim=True) > 0.1).float()
    return 1 + weight * F.max_pool2d(mask, 5, stride=1, padding=2)


def train_vae(run: Run) -> dict:
    r, data = run.recipe, run.recipe["data"]
    # split "eval" draws every shape and pattern, held-out concepts included: the VAE is the codec, and a
    # LoRA can only teach a pattern that its decoder can draw (MODEL_CARD, session 26). A list of splits
    # makes the pool of equal parts of each. The PSNR stays measured on the training split's scenes.
    splits = data.get("split", "train")
    splits = [splits] if isinstance(splits, str) else list(splits)
    if not splits or any(split not in SPLITS for split in splits):
        raise SfumatoError(f"recipe [data] split = {data.get('split')!r}: allowed one of {', '.join(SPLITS)} or a "
                           "list of them ('train' has no held-out concepts or pairs; 'eval' draws everything)")
    parts = [render_pool(run.seed, data["train_scenes"] // len(splits), split, data["size"], data.get("workers", 0))
             for split in splits]
    pool, scenes = np.concatenate([images for images, _ in parts]), [s for _, part in parts for s in part]
    eval_pool, _ = render_pool(run.seed + EVAL_SEED_OFFSET, data["eval_scenes"], "train", data["size"])
    vae = build_vae(r["model"])
    if run.init_from:
        load_saved(vae, run.init_from, "vae")
    train_encoder = r.get("train_encoder", True)
    loss_cfg = r["loss"]
    latent_noise, anchor_weight = loss_cfg.get("latent_noise", 0.0), loss_cfg.get("anchor", 0.0)
    keeps_latent_space = not train_encoder or anchor_weight > 0
    if keeps_latent_space:
        vae.register_to_config(scaling_factor=kept_latent_scale(run))
    if not train_encoder:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    anchor = anchor_encoder(run, r["model"]) if anchor_weight and train_encoder else None
    if anchor is not None:
        anchored = np.array([not concepts_in(scene) for scene in scenes])  # what the UNet was trained on
    scale = vae.config.scaling_factor  # kept (decoder-only or anchored), else measured after training
    # after loading: the EMA starts from those weights
    t = make_trainable(run, VAEWithPosterior(vae, latent_noise, relative=not keeps_latent_space))

    def make_batch(step: int) -> dict:
        rng, crop = run.numpy_rng(step), data.get("crop", 0)
        index = rng.integers(0, len(pool), r["batch_size"])
        corners = rng.integers(0, (data["size"] - crop) // 8 + 1, (r["batch_size"], 2)) * 8  # on the latent grid
        index, corners = run.shard(index), run.shard(corners)
        batch = {"pixels": torch.from_numpy(crops(pool, index, corners, crop))}
        if anchor is not None:
            batch["anchored"] = torch.from_numpy(anchored[index])
        if loss_cfg.get("object_weight"):  # rows' backgrounds from the whole images, then cropped
            rows = row_backgrounds(pool[index])
            if crop:
                rows = np.stack([row[y : y + crop] for row, (y, _) in zip(rows, corners, strict=True)])
            batch["background"] = torch.from_numpy(rows)
        return batch

    def loss_fn(batch: dict, step: int) -> Tensor:
        images = pixels_to_model(batch["pixels"])
        recon, kl, mean = t.module(images, run.generator(step))
        error = recon.float() - images
        weight = object_weights(images, loss_cfg.get("object_weight", 0.0), batch.get("background"))
        reconstruction = (weight * (loss_cfg["l1"] * error.abs() + loss_cfg["mse"] * error.pow(2))).mean() / weight.mean()
        loss = reconstruction + loss_cfg["kl"] * kl
        if anchor is not None:
            with torch.no_grad():
                start = anchor(images)
            loss = loss + anchor_weight * (latent_drift(mean, start, scale) * batch["anchored"].to(mean.device)).mean()
        return loss

    shown = to_model_images(eval_pool[:8], run.device)

    def on_sample(step: int) -> None:
        if run.is_main:
            with ema_weights(run, t) as module:
                save_grid(torch.cat([shown, reconstruct(module.vae, shown)]), run.out / "samples" / f"vae_{step:07d}.png")

    train_loop(run, t, make_batch, loss_fn, on_sample, desc="vae")
    with ema_weights(run, t) as module:
        vae = module.vae.eval()
        held_out = to_model_images(eval_pool, run.device)
        figure = psnr(held_out, reconstruct(vae, held_out))
        drift = {}
        if anchor is not None:  # how far the latents the UNet knows moved (the decoder's noise: 0..latent_noise)
            with torch.no_grad():
                moved = torch.cat([latent_drift(vae.encode(x).latent_dist.mean, anchor(x), scale)
                                   for x in held_out.split(64)])
            drift = {"anchored_latent_drift_rms": round(float(moved.mean().sqrt()), 4)}
        if not keeps_latent_space:
            sample = np.random.default_rng(run.seed).choice(len(pool), min(len(pool), 2048), replace=False)
            scale = latent_scaling_factor(vae, to_model_images(pool[np.sort(sample)], run.device),
                                          run.generator(EVAL_KEY))
            vae.register_to_config(scaling_factor=scale)
        metrics = {"stage": "vae", "params": param_count(vae), **loss_summary(run, t),
                   "heldout_psnr_db": round(figure, 2), "scaling_factor": scale, **drift}
        if run.is_main:
            save_pretrained_atomic(vae, run.out / "vae")
    on_sample(t.step)
    write_metrics(run, metrics)
    return metrics
