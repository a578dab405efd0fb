"""Stage 3: the UNet, on cached VAE latents, conditioned on the frozen CLIP text encoder (as SD).

Scenes are rendered and encoded once (posterior mean and std kept, a latent is sampled per step);
each step draws a fresh caption of every scene from its Scene, so captions vary across epochs.
~10% of captions are dropped (empty string) so that classifier-free guidance works. The EMA weights
are the ones shipped. With `text_encoder_lr` > 0 the text encoder is tuned beside the UNet (its EMA
weights are saved in OUT/text_encoder, which `sfumato train assemble` then ships); else it stays frozen.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sfumato.errors import SfumatoError
from sfumato.train.assemble import load_saved
from sfumato.train.common import (
    EVAL_KEY,
    Run,
    atomic_write_text,
    denoising_loss,
    ema_weights,
    loss_summary,
    make_trainable,
    offset_noise,
    param_count,
    save_grid,
    save_pretrained_atomic,
    stage_folder,
    train_loop,
    write_metrics,
)
from sfumato.train.data import (
    EVAL_SEED_OFFSET,
    SceneMix,
    caption_style,
    eval_captions,
    load_tokenizer,
    random_captions,
    render_pool,
    to_model_images,
    tokenize,
)


def latent_object_masks(scenes: list, size: int) -> Tensor:
    """(n, 1, size, size) bool: the latent pixels whose centre lies within an object's extent (its
    radius, plus one latent pixel for the edges), from the scenes themselves: a night sky's small
    stars, which a rule on pixels would count too, are background."""
    centres = (torch.arange(size) + 0.5) / size  # as fractions of the image, like the objects' x, y
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    masks = torch.zeros(len(scenes), 1, size, size, dtype=torch.bool)
    for mask, scene in zip(masks, scenes, strict=True):
        for obj in scene.objects:
            mask[0] |= (x - obj.x) ** 2 + (y - obj.y) ** 2 <= (obj.radius + 1 / size) ** 2
    return masks


class TextConditionedUNet(torch.nn.Module):
    """The UNet and its text encoder as one module, so that the optimiser, the EMA and the
    checkpoints hold the text encoder too when the recipe tunes it."""

    def __init__(self, unet, text_encoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, noisy: Tensor, timesteps: Tensor, text: Tensor) -> Tensor:
        """text: token ids (b, 77), or the frozen text encoder's states of them, (b, 77, d)."""
        states = self.text_encoder(text).last_hidden_state if text.dtype == torch.long else text
        return self.unet(noisy, timesteps, states.float()).sample


def build_unet(model: dict, cross_attention_dim: int, sample_size: int):
    from diffusers import UNet2DConditionModel

    down = tuple(model["down_block_types"])
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, down_block_types=down,
        up_block_types=tuple(b.replace("Down", "Up") for b in reversed(down)),
        block_out_channels=tuple(model["block_out_channels"]), layers_per_block=model["layers_per_block"],
        cross_attention_dim=cross_attention_dim, attention_head_dim=model["attention_heads"],
        norm_num_groups=model["norm_num_groups"],
    )


def build_scheduler(prediction_type: str, zero_terminal_snr: bool = False):
    """SD's training noise schedule; optionally rescaled to zero SNR at its last step
    (`checkpoints.zero_terminal_snr`), which only a v-prediction model can be trained on."""
    from diffusers import DDPMScheduler

    if zero_terminal_snr and prediction_type != "v_prediction":
        raise SfumatoError(f"zero_terminal_snr needs prediction_type = \"v_prediction\", not {prediction_type!r}: "
                           "at zero SNR the noise says nothing about the image")
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", clip_sample=False, prediction_type=prediction_type,
                         rescale_betas_zero_snr=zero_terminal_snr)


@torch.no_grad()
def encode_latents(vae, pixels: np.ndarray, device: torch.device, batch: int = 256) -> tuple[Tensor, Tensor]:
    """Posterior mean and std of every image, kept on device (a few KB an image)."""
    means, stds = [], []
    for start in range(0, len(pixels), batch):
        posterior = vae.encode(to_model_images(pixels[start : start + batch], device)).latent_dist
        means.append(posterior.mean.float())
        stds.append(posterior.std.float())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def text_hidden(text_encoder, tokenizer, captions: list[str], device: torch.device) -> Tensor:
    return text_encoder(tokenize(tokenizer, captions).to(device)).last_hidden_state


CACHE_KEY = 7_919  # the cached captions' stream, apart from the per-step ones (keyed by step)


@torch.no_grad()
def caption_states(text_encoder, tokenizer, scenes: list, seed: int, per_scene: int, device: torch.device,
                   batch: int = 512, style: str = "world") -> Tensor:
    """(n * per_scene + 1, 77, d) fp16: the text states of `per_scene` captions of each scene (row
    scene * per_scene + k), then of the empty caption (the last row, for caption dropout).

    A frozen text encoder gives a caption the same states every epoch. Computing a few captions
    per scene once saves the per-step caption drawing, tokenizing and text encoding: 0.03 s of a
    0.45 s step of the shipped-size UNet at batch 32 on one CPU thread (session 20), a few percent;
    a scene then has K wordings rather than a new one each epoch. fp16: the states of 20k scenes x
    4 captions take 0.8 GB, and the rounding (1e-3 relative) is far below the noise the UNet learns under."""
    captions = [c for row in zip(*(random_captions(scenes, seed, CACHE_KEY, k, style=style) for k in range(per_scene)), strict=True)
                for c in row] + [""]
    return torch.cat([text_hidden(text_encoder, tokenizer, captions[i : i + batch], device).half()
                      for i in range(0, len(captions), batch)])


@torch.no_grad()
def generate(unet, text_encoder, tokenizer, vae, scheduler, prompts: list[str], *, steps: int = 25,
             guidance: float = 5.0, seed: int = 0) -> Tensor:
    """A quick DDIM + CFG sampler for the sample grids, (b, 3, H, W) in [-1, 1]."""
    from diffusers import DDIMScheduler

    device = next(unet.parameters()).device
    # "trailing": the first step at t = 999, where a zero-SNR schedule's pure noise is
    ddim = DDIMScheduler.from_config(scheduler.config, timestep_spacing="trailing")
    ddim.set_timesteps(steps)
    context = text_hidden(text_encoder, tokenizer, [""] * len(prompts) + prompts, device)
    size = unet.config.sample_size
    x = torch.randn(len(prompts), 4, size, size, generator=torch.Generator().manual_seed(seed)).to(device)
    for t in ddim.timesteps:
        uncond, cond = unet(torch.cat([x, x]), t, context).sample.chunk(2)
        x = ddim.step(uncond + guidance * (cond - uncond), t, x).prev_sample
    return vae.decode(x / vae.config.scaling_factor).sample.clamp(-1, 1)


@torch.no_grad()
def validation_loss(unet, scheduler, latents: Tensor, context: Tensor, generator: torch.Generator) -> float:
    """Loss on fixed noise at evenly spread timesteps: comparable across runs and checkpoints."""
    timesteps = torch.linspace(0, 999, len(latents), device=latents.device).round().long()
    noise = torch.randn(latents.shape, generator=generator, device=latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
    losses = [F.mse_loss(unet(n, t, c).sample.float(), y.float()).item() * len(n)
              for n, t, c, y in zip(noisy.split(128), timesteps.split(128), context.split(128), target.split(128), strict=True)]
    return sum(losses) / len(latents)


def load_frozen(vae_dir: Path, clip_dir: Path, device: torch.device):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    vae = AutoencoderKL.from_pretrained(stage_folder(vae_dir, "vae")).to(device).eval().requires_grad_(False)
    # fp32 even from an assembled folder's fp16 weights (transformers would keep their dtype)
    text_encoder = CLIPTextModel.from_pretrained(stage_folder(clip_dir, "text_encoder"), dtype=torch.float32)
    return vae, text_encoder.to(device).eval().requires_grad_(False)


def high_noise_of_recipe(recipe: dict) -> tuple[float, int]:
    """(share, first timestep) of recipe keys high_noise_share and high_noise_from (sample_timesteps)."""
    share, first = recipe.get("high_noise_share", 0.0), recipe.get("high_noise_from", 500)
    if not 0 <= share <= 1:
        raise SfumatoError(f"high_noise_share is {share!r}; allowed: a share of each batch, from 0 to 1")
    if not (isinstance(first, int) and 0 <= first < 1000):
        raise SfumatoError(f"high_noise_from is {first!r}; allowed: a timestep, an integer from 0 to 999")
    return share, first


def sample_timesteps(n: int, generator: torch.Generator, device: torch.device | str,
                     high_share: float = 0.0, high_from: int = 500) -> Tensor:
    """n training timesteps, uniform over 0..999; with high_share > 0, about that share of them uniform
    over high_from..999 instead. A layout is decided at high noise, where the text alone says where
    things go: that is where a relation word ("left of") can lower the loss (session 28)."""
    timesteps = torch.randint(0, 1000, (n,), generator=generator, device=device)
    if not high_share:
        return timesteps
    high = torch.randint(high_from, 1000, (n,), generator=generator, device=device)
    chosen = torch.rand(n, generator=generator, device=device) < high_share
    return torch.where(chosen, high, timesteps)


def relation_swapped(captions: list[str]) -> tuple[list[int], list[str]]:
    """The captions that name a relation by a word with an opposite ("left", "above", ...): their
    indices, and each with that word swapped for its opposite."""
    from sfumato.world.captions import SWAP_KINDS, swap_word

    swapped = [swap_word(c, SWAP_KINDS["relation"], random.Random(0)) for c in captions]
    kept = [i for i, c in enumerate(swapped) if c is not None]
    return kept, [swapped[i] for i in kept]


def relation_separation_loss(states: Tensor, swapped_states: Tensor, margin: float) -> Tensor:
    """A hinge: the text states of a caption and of the same caption with its relation word swapped
    must differ by at least `margin` of their norm. A contrastive CLIP erased the relation words (at
    their own token "left" and "right" are 5x closer than for a random encoder), and the diffusion
    loss alone never spread them again: a UNet cannot learn to use a difference it hardly sees, so the
    text encoder never learns to make one (session 28: states 2 % apart after 45 min of relation-rich
    training; shape words 31 %). states, swapped_states: (b, 77, d) of the captions and their twins."""
    moved = (states - swapped_states).flatten(1).norm(dim=1) / states.flatten(1).norm(dim=1).clamp(min=1e-8)
    return F.relu(margin - moved).mean()


def train_unet(run: Run, vae_dir: Path, clip_dir: Path) -> dict:
    r, data = run.recipe, run.recipe["data"]
    scheduler = build_scheduler(r.get("prediction_type", "epsilon"), r.get("zero_terminal_snr", False))
    # text_encoder_lr: the diffusion loss tunes the text encoder too (a contrastive CLIP spreads
    # colour words through the caption's states and shape words hardly at all: session 17).
    # caption_cache = K: each scene's text states for K of its captions, computed once (else a fresh
    # caption every step, encoded then: what a tuned text encoder needs)
    text_lr, per_scene = r.get("text_encoder_lr", 0.0), r.get("caption_cache", 0)
    if per_scene and text_lr > 0:
        raise SfumatoError("caption_cache needs a frozen text encoder: set text_encoder_lr = 0 or caption_cache = 0")
    # data.captions = "plain": one fixed wording per scene (a curriculum's first stage)
    style = caption_style(data.get("captions", "world"))
    high_noise = high_noise_of_recipe(r)  # before the set-up: a bad value is an error at once
    # relation_margin > 0: relation_separation_loss beside the diffusion loss (the text encoder is tuned)
    relation_margin = r.get("relation_margin", 0.0)
    if relation_margin and text_lr <= 0:
        raise SfumatoError("relation_margin needs a tuned text encoder: set text_encoder_lr > 0 or relation_margin = 0")
    # data.grid, data.simple_share, data.simple_backgrounds, data.simple_objects, data.pair_share: which scenes
    # (train.data.SceneMix)
    pool, scenes = render_pool(run.seed, data["train_scenes"], "train", data["size"], data.get("workers", 0),
                               SceneMix.of_recipe(data))
    vae, text_encoder = load_frozen(vae_dir, clip_dir, run.device)
    tokenizer = load_tokenizer()
    with run.accelerator.autocast():
        mean, std = encode_latents(vae, pool, run.device)
    # object_weight: latent pixels on objects weigh 1 + object_weight in the loss. Objects cover a
    # few percent of a scene and the plain loss is mostly background, yet every claim of the
    # adherence benchmark is about the objects (session 6: their latents carry ~80 % of the error).
    object_weight = r.get("object_weight", 0.0)
    on_object = latent_object_masks(scenes, mean.shape[-1]).to(run.device) if object_weight else None
    del pool  # only latents are needed from here on
    scale = vae.config.scaling_factor
    unet = build_unet(r["model"], text_encoder.config.hidden_size, mean.shape[-1])
    if run.init_from:  # init_grows: the recipe adds attention blocks to the saved UNet
        load_saved(unet, run.init_from, "unet", grow=r.get("init_grows", False))
    tune_text = text_lr > 0
    text_encoder.requires_grad_(tune_text)
    # after loading: the EMA starts from those weights
    t = make_trainable(run, TextConditionedUNet(unet, text_encoder), {"text_encoder": text_lr / r["lr"]})
    states = caption_states(text_encoder, tokenizer, scenes, run.seed, per_scene, run.device,
                            style=style) if per_scene else None

    def make_batch(step: int) -> dict:
        rng = run.numpy_rng(step)
        index = run.shard(rng.integers(0, len(scenes), r["batch_size"]))
        dropped = run.shard(rng.random(r["batch_size"]) < r["caption_dropout"])
        if per_scene:
            which = run.shard(rng.integers(0, per_scene, r["batch_size"]))
            return {"rows": torch.from_numpy(index),
                    "text": torch.from_numpy(np.where(dropped, len(states) - 1, index * per_scene + which))}
        captions = random_captions([scenes[i] for i in index], run.seed, step, run.accelerator.process_index, style=style)
        captions = ["" if d else c for c, d in zip(captions, dropped, strict=True)]
        batch = {"rows": torch.from_numpy(index), "text": tokenize(tokenizer, captions)}
        if relation_margin:
            kept, swapped = relation_swapped(captions)
            batch |= {"related": torch.tensor(kept, dtype=torch.long),
                      "swapped": tokenize(tokenizer, swapped) if kept else torch.zeros(0, 77, dtype=torch.long)}
        return batch

    alphas_cumprod = scheduler.alphas_cumprod.to(run.device)  # once, not a copy to the GPU every step

    def loss_fn(batch: dict, step: int) -> Tensor:
        g, rows = run.generator(step), batch["rows"]
        latents = (mean[rows] + std[rows] * torch.randn(std[rows].shape, generator=g, device=run.device)) * scale
        noise = offset_noise(latents.shape, r.get("noise_offset", 0.0), g, run.device)
        timesteps = sample_timesteps(len(latents), g, run.device, *high_noise)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
        pixel_weights = None if on_object is None else 1 + object_weight * on_object[rows].float()
        text = states[batch["text"]] if per_scene else batch["text"]
        if relation_margin:  # the captions' states once, for the UNet and the hinge
            text = t.module.text_encoder(text).last_hidden_state
        loss = denoising_loss(t.module(noisy, timesteps, text), target, alphas_cumprod[timesteps],
                              scheduler.config.prediction_type, r.get("min_snr_gamma", 0.0), pixel_weights,
                              snr_floor=r.get("snr_floor", 0.0))
        if relation_margin and len(batch["related"]):
            swapped = t.module.text_encoder(batch["swapped"]).last_hidden_state
            loss = loss + relation_separation_loss(text[batch["related"]].float(), swapped.float(), relation_margin)
        return loss

    evals = {}
    for split in ("train", "heldout"):  # unseen scenes; "heldout": unseen shape/colour pairs too
        pixels, eval_scenes = render_pool(run.seed + EVAL_SEED_OFFSET, data["eval_scenes"], split, data["size"])
        with run.accelerator.autocast():
            evals[split] = (encode_latents(vae, pixels, run.device)[0] * scale, eval_captions(eval_scenes, run.seed))
    prompts = evals["train"][1][:4] + evals["heldout"][1][:4]

    def on_sample(step: int) -> None:
        if run.is_main:
            with ema_weights(run, t) as module, run.accelerator.autocast():
                images = generate(module.unet.eval(), module.text_encoder.eval(), tokenizer, vae, scheduler, prompts,
                                  steps=r.get("sample_steps", 25), guidance=r.get("sample_guidance", 5.0))
                module.train()
            save_grid(images, run.out / "samples" / f"unet_{step:07d}.png", ncols=4)

    if run.is_main:
        (run.out / "samples").mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.out / "samples" / "prompts.txt", "\n".join(prompts) + "\n")
    train_loop(run, t, make_batch, loss_fn, on_sample, desc="unet")
    on_sample(t.step)
    with ema_weights(run, t) as module:
        module.eval()
        metrics = {"stage": "unet", "params": param_count(module.unet), **loss_summary(run, t),
                   "prediction_type": scheduler.config.prediction_type, "text_encoder_tuned": tune_text}
        with run.accelerator.autocast():
            for split, (latents, captions) in evals.items():
                context = text_hidden(module.text_encoder, tokenizer, captions, run.device).float()
                metrics[f"val_loss_{split}"] = round(
                    validation_loss(module.unet, scheduler, latents, context, run.generator(EVAL_KEY)), 5)
        if run.is_main:
            save_pretrained_atomic(module.unet, run.out / "unet")
            save_pretrained_atomic(scheduler, run.out / "scheduler")
            if tune_text:
                save_pretrained_atomic(module.text_encoder, run.out / "text_encoder")
        module.train()
    write_metrics(run, metrics)
    return metrics
