"""The UNet wrapped once as ``denoise(x, sigma, cond) -> x0``, and classifier-free guidance.

Latents live in k-diffusion's variance-exploding space, ``x = x0 + sigma * noise``; the UNet was
trained on ``x / sqrt(sigma^2 + 1)`` at an integer timestep, so the wrapper scales the input,
maps sigma to a (fractional) timestep, and turns the epsilon or v prediction into x0
(k-diffusion's CompVisDenoiser / CompVisVDenoiser, as A1111 uses them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sfumato.errors import CheckpointError
from sfumato.sampling import Denoiser, model_sigmas, sigma_to_t

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class Conditioning:
    """What the UNet is conditioned on, batch-first."""

    hidden: Tensor  # (b, 77*k, d) text-encoder hidden states
    pooled: Tensor | None = None  # (b, d_pool) SDXL pooled text embeds, else None
    time_ids: Tensor | None = None  # (b, 6) SDXL micro-conditioning, else None


def concat_conditioning(first: Conditioning, second: Conditioning) -> Conditioning:
    """Stack two conditionings along the batch, for one UNet call."""

    def cat(a: Tensor | None, b: Tensor | None) -> Tensor | None:
        return None if a is None or b is None else torch.cat([a, b])

    return Conditioning(
        torch.cat([first.hidden, second.hidden]),
        cat(first.pooled, second.pooled),
        cat(first.time_ids, second.time_ids),
    )


class UNetDenoiser:
    """A diffusers UNet2DConditionModel as an x0 predictor in sigma space."""

    def __init__(self, unet, alphas_cumprod: Tensor, prediction_type: str):
        if prediction_type not in PREDICTION_TYPES:
            raise CheckpointError(
                f"unknown prediction type {prediction_type!r}; allowed: {', '.join(PREDICTION_TYPES)}"
            )
        self.unet = unet
        # Once: diffusers' .dtype walks every module (~3 ms on the built-in UNet, 7 % of a step)
        self.dtype = unet.dtype
        self.prediction_type = prediction_type
        self.log_sigmas = model_sigmas(alphas_cumprod).log().float()

    def timestep(self, sigma: Tensor) -> Tensor:
        """Fractional timestep of each sigma: the UNet's sinusoidal embedding accepts floats."""
        return sigma_to_t(sigma.float(), self.log_sigmas.to(sigma.device))

    @torch.no_grad()
    def __call__(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        # Scalings in fp32 even for an fp16 UNet: 1/sqrt(sigma^2+1) at sigma ~ 15 and the
        # x - sigma*eps cancellation near the end both lose too much in half precision.
        dtype = self.dtype
        sigma = sigma.float().reshape(-1, *[1] * (x.ndim - 1))
        c_in = (sigma**2 + 1).rsqrt()
        x32 = x.float()
        extra = {}
        if cond.pooled is not None:  # SDXL
            extra["added_cond_kwargs"] = {
                "text_embeds": cond.pooled.to(dtype),
                "time_ids": cond.time_ids.to(dtype),
            }
        out = self.unet(
            (x32 * c_in).to(dtype),
            self.timestep(sigma.flatten()),
            encoder_hidden_states=cond.hidden.to(dtype),
            return_dict=False,
            **extra,
        )[0].float()
        if self.prediction_type == "epsilon":
            x0 = x32 - sigma * out
        else:  # v = alpha * eps - sigma_vp * x0, rewritten for x in sigma space
            x0 = x32 * c_in**2 - sigma * c_in * out
        return x0.to(x.dtype)


def cfg_denoiser(
    model: UNetDenoiser, cond: Conditioning, uncond: Conditioning, scale: float
) -> Denoiser:
    """Classifier-free guidance, Ho & Salimans 2022: uncond + scale * (cond - uncond).

    cond and uncond go through the UNet as one batch of 2b; at scale 1 the uncond pass is
    skipped. Text of different lengths (long prompts in 77-token chunks) cannot share a
    batch, so then the two passes run separately.
    """
    if scale == 1:
        return lambda x, sigma: model(x, sigma, cond)
    both = concat_conditioning(uncond, cond) if cond.hidden.shape == uncond.hidden.shape else None

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        if both is not None:
            x0_uncond, x0_cond = model(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
        else:
            x0_uncond, x0_cond = model(x, sigma, uncond), model(x, sigma, cond)
        return x0_uncond + scale * (x0_cond - x0_uncond)

    return denoise
