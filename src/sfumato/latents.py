"""Latent space: seeded noise, and the VAE's way in and out of it."""

from __future__ import annotations

from collections.abc import Callable

import torch

# Above this many output pixels the VAE decodes in tiles, so memory stays flat (a 1024² SD
# decode untiled needs several GB).
TILE_ABOVE_PIXELS = 1024 * 1024


class SeededNoise:
    """One CPU generator per image, seeded seed+i: the initial noise and every later draw
    (ancestral / SDE samplers) of image i depend only on its seed, never on the batch size or
    the device, so the same seed gives the same image in any batch and on any machine."""

    def __init__(self, seeds: list[int], shape: tuple[int, int, int], device: torch.device | str):
        self.generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        self.shape = shape  # (c, h, w) of one latent
        self.device = device

    def __call__(self) -> torch.Tensor:
        noise = [torch.randn(self.shape, generator=g, dtype=torch.float32) for g in self.generators]
        return torch.stack(noise).to(self.device)  # (b, c, h, w), fp32


def latent_shape(vae, width: int, height: int) -> tuple[int, int, int]:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return (vae.config.latent_channels, height // factor, width // factor)


@torch.inference_mode()
def decode(vae, latents: torch.Tensor, *, tile: bool | None = None) -> torch.Tensor:
    """Latents -> images in [0, 1], (b, 3, H, W) fp32. Retries in fp32 if fp16 gives NaNs
    (SD 1.x VAEs overflow in fp16 on some images; A1111 does the same retry)."""
    images = _decode(vae, latents, vae.dtype, tile)
    if torch.isnan(images).any() and vae.dtype != torch.float32:
        images = _decode(vae, latents, torch.float32, tile)
    return ((images.float() + 1) / 2).clamp(0, 1)


def _decode(vae, latents: torch.Tensor, dtype: torch.dtype, tile: bool | None) -> torch.Tensor:
    original_dtype = vae.dtype
    if dtype != original_dtype:
        vae.to(dtype)
    try:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        pixels = latents.shape[-1] * latents.shape[-2] * factor * factor
        use_tiles = pixels > TILE_ABOVE_PIXELS if tile is None else tile
        z = _unscale(vae, latents).to(dtype)
        out = vae.tiled_decode(z).sample if use_tiles else vae.decode(z).sample
        return out
    finally:
        if dtype != original_dtype:
            vae.to(original_dtype)


@torch.inference_mode()
def encode(vae, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Images in [0, 1], (b, 3, H, W) -> scaled latents (a sample of the posterior)."""
    x = (images * 2 - 1).to(vae.device, vae.dtype)
    posterior = vae.encode(x).latent_dist
    z = posterior.mean + posterior.std * torch.randn(
        posterior.mean.shape, generator=generator, dtype=torch.float32
    ).to(posterior.mean.device, posterior.mean.dtype)
    return _scale(vae, z.float())


def _scale(vae, z: torch.Tensor) -> torch.Tensor:
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (z - shift) * vae.config.scaling_factor


def _unscale(vae, latents: torch.Tensor) -> torch.Tensor:
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return latents / vae.config.scaling_factor + shift


def preview(latents: torch.Tensor) -> torch.Tensor:
    """A cheap RGB approximation of SD-style 4-channel latents, (b, 3, h, w) in [0, 1], for
    progress previews without a VAE decode (the linear map A1111 calls "Approx cheap")."""
    weights = torch.tensor(
        [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]],
        dtype=latents.dtype,
        device=latents.device,
    )
    if latents.shape[1] != len(weights):  # another latent space: show its first channels, normalised
        rgb = latents[:, :3]
        return (rgb - rgb.amin()) / (rgb.amax() - rgb.amin() + 1e-6)
    rgb = torch.einsum("bchw,cr->brhw", latents, weights)
    return ((rgb + 1) / 2).clamp(0, 1)


NoiseSampler = Callable[[], torch.Tensor]
