"""Sigma schedules and samplers, following k-diffusion's contract.

A sampler is a plain function ``sample_x(denoiser, x, sigmas, *, noise_sampler, callback)`` where
``denoiser(x, sigma) -> x0`` and ``x`` lives in k-diffusion's variance-exploding space
(``x = x0 + sigma * noise``). We write the samplers by hand, ~10 lines each, instead of using
diffusers' schedulers: those are stateful ``step()`` objects tied to integer timesteps, while plain
functions of (denoiser, sigmas) can be tested against denoisers with a known answer, no network.
tests/test_sampling.py checks Euler, DPM++ 2M and UniPC against diffusers' schedulers.

Sampler names are A1111's. Scalar sigma arithmetic is done on Python floats (float64), so it is
the same on every device and dtype; only the latents are tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from sfumato import params
from sfumato.errors import ParamError

Denoiser = Callable[[Tensor, Tensor], Tensor]  # denoise(x, sigma) -> x0; sigma: (b,) tensor
NoiseSampler = Callable[[], Tensor]  # fresh N(0, 1) noise shaped like x, seeded per image
Callback = Callable[[int, Tensor, Tensor], None]  # callback(i, x, denoised) after step i

SCHEDULE_NAMES: list[str] = list(params.SCHEDULE_NAMES)
# Names are parsed where they are validated (params, which the CLI imports without torch).
parse_schedule = params.canonical_scheduler
parse_sampler = params.canonical_sampler


# --- schedules -------------------------------------------------------------------------------


def model_sigmas(alphas_cumprod: Tensor) -> Tensor:
    """The model's discrete sigmas, ascending: sigma_t = sqrt((1 - abar_t) / abar_t)."""
    alphas_cumprod = alphas_cumprod.double()
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


def get_sigmas(schedule: str, steps: int, alphas_cumprod: Tensor) -> Tensor:
    """(steps + 1,) float32 sigmas, descending, ending in 0."""
    schedule = parse_schedule(schedule)
    if steps < 1:
        raise ParamError(f"steps must be at least 1, got {steps}")
    discrete = model_sigmas(alphas_cumprod)
    if schedule == "karras":
        sigmas = karras_sigmas(steps, discrete[0].item(), discrete[-1].item())
    else:
        sigmas = normal_sigmas(steps, discrete)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).float()


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022 (arXiv:2206.00364) eq. 5: evenly spaced in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def normal_sigmas(steps: int, discrete: Tensor) -> Tensor:
    """A1111 "normal" (k-diffusion DiscreteSchedule.get_sigmas): timesteps evenly spaced from
    T-1 to 0, sigma interpolated in log space between the two nearest discrete timesteps."""
    t = torch.linspace(len(discrete) - 1, 0, steps, dtype=torch.float64)
    low, high = t.floor().long(), t.ceil().long()
    w = t.frac()
    log_sigmas = discrete.log()
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def sigma_to_t(sigma: Tensor, log_sigmas: Tensor) -> Tensor:
    """Fractional timestep of each sigma by log-sigma interpolation over the model's ascending
    discrete sigmas (k-diffusion DiscreteSchedule.sigma_to_t), clamped to [0, T-1]."""
    log_sigma = sigma.log()
    low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, len(log_sigmas) - 2)
    w = ((log_sigma - log_sigmas[low]) / (log_sigmas[low + 1] - log_sigmas[low])).clamp(0, 1)
    return low + w


# --- samplers --------------------------------------------------------------------------------


def _sigma_batch(x: Tensor, sigma: float) -> Tensor:
    # fp16 sigmas would lose the precision the timestep interpolation needs
    return torch.full(
        (x.shape[0],), sigma, device=x.device, dtype=torch.promote_types(x.dtype, torch.float32)
    )


def _noise(noise_sampler: NoiseSampler | None, x: Tensor) -> Tensor:
    if noise_sampler is None:
        raise ValueError("this sampler is stochastic and needs a noise_sampler")
    return noise_sampler().to(x)


def _report(callback: Callback | None, i: int, x: Tensor, denoised: Tensor) -> None:
    if callback is not None:
        callback(i, x, denoised)


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step into a deterministic part down to sigma_down plus fresh noise sigma_up, with
    sigma_down^2 + sigma_up^2 = sigma_to^2 (k-diffusion get_ancestral_step)."""
    if sigma_to == 0:
        return 0.0, 0.0
    sigma_up = min(
        sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    )
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise_sampler: NoiseSampler | None = None,
    callback: Callback | None = None,
    eta: float = 1.0,
) -> Tensor:
    """Ancestral Euler (k-diffusion): an Euler step down to sigma_down, then fresh noise."""
    sigmas = sigmas.tolist()
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, _sigma_batch(x, sigmas[i]))
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + (x - denoised) / sigmas[i] * (sigma_down - sigmas[i])
        if sigma_up > 0:
            x = x + _noise(noise_sampler, x) * sigma_up
        _report(callback, i, x, denoised)
    return x


def sample_euler(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise_sampler: NoiseSampler | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Euler method on the probability-flow ODE, Karras et al. 2022 (arXiv:2206.00364) Alg. 1."""
    return sample_euler_ancestral(denoiser, x, sigmas, callback=callback, eta=0.0)


# Deterministic DDIM (Song et al. 2020, arXiv:2010.02502, eta = 0) written in sigma space,
# x' = x0 + sigma' * (x - x0) / sigma, is exactly an Euler step; tested against diffusers' DDIM.
sample_ddim = sample_euler


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise_sampler: NoiseSampler | None = None,
    callback: Callback | None = None,
    eta: float = 1.0,
) -> Tensor:
    """DPM-Solver++(2M) SDE, Lu et al. 2022 (arXiv:2211.01095), k-diffusion's midpoint form."""
    sigmas = sigmas.tolist()
    old_denoised, h_last = None, 0.0
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, _sigma_batch(x, sigmas[i]))
        if sigmas[i + 1] == 0:  # the last step is first order: straight to the prediction
            x = denoised
        else:
            h = math.log(sigmas[i] / sigmas[i + 1])  # step in lambda = -log(sigma)
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * math.exp(-eta_h) * x - math.expm1(-h - eta_h) * denoised
            if old_denoised is not None:  # second order: extrapolate with the previous prediction
                x = x - 0.5 * math.expm1(-h - eta_h) * (h / h_last) * (denoised - old_denoised)
            if eta > 0:
                x = x + _noise(noise_sampler, x) * sigmas[i + 1] * (-math.expm1(-2 * eta_h)) ** 0.5
            h_last = h
        old_denoised = denoised
        _report(callback, i, x, denoised)
    return x


def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise_sampler: NoiseSampler | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022 (arXiv:2211.01095) Alg. 2: the SDE form with eta = 0."""
    return sample_dpmpp_2m_sde(denoiser, x, sigmas, callback=callback, eta=0.0)


def _unipc_rhos(h: float, r: float) -> tuple[float, float]:
    """UniC-2 weights for the bh2 variant: solve [[1, 1], [r, 1]] rho = b (Zhao et al. eq. 8)."""
    hh = -h
    b_h = math.expm1(hh)
    phi_k = math.expm1(hh) / hh - 1
    b1 = phi_k / b_h
    b2 = (phi_k / hh - 0.5) * 2 / b_h
    rho0 = (b1 - b2) / (1 - r)
    return rho0, b1 - rho0


@torch.no_grad()
def sample_unipc(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise_sampler: NoiseSampler | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """UniPC, Zhao et al. 2023 (arXiv:2302.04867): bh2, order 2, data prediction, as diffusers'
    UniPCMultistepScheduler defaults. The UniP-2 predictor equals DPM++ 2M; the UniC corrector
    refines each new x with the model output already computed there, at no extra model call."""
    sigmas = sigmas.tolist()
    lam = [-math.log(s) if s > 0 else math.inf for s in sigmas]
    outputs: list[Tensor] = []  # denoised at earlier points, newest last
    x_last = x
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, _sigma_batch(x, sigmas[i]))
        if outputs:  # correct the step x_last -> x that the predictor just made
            h = lam[i] - lam[i - 1]
            ratio = sigmas[i] / sigmas[i - 1]
            m0 = outputs[-1]
            x = ratio * x_last + (1 - ratio) * m0
            if len(outputs) == 1:  # UniC-1: trapezoid
                x = x - 0.5 * (ratio - 1) * (denoised - m0)
            else:
                r = (lam[i - 2] - lam[i - 1]) / h
                rho0, rho1 = _unipc_rhos(h, r)
                x = x - (ratio - 1) * (rho0 * (outputs[-2] - m0) / r + rho1 * (denoised - m0))
        outputs = [*outputs[-1:], denoised]
        x_last = x
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = lam[i + 1] - lam[i]
            ratio = sigmas[i + 1] / sigmas[i]
            x = ratio * x + (1 - ratio) * denoised
            if len(outputs) == 2:  # UniP-2
                r = (lam[i - 1] - lam[i]) / h
                x = x - 0.5 * (ratio - 1) * (outputs[0] - denoised) / r
        _report(callback, i, x, denoised)
    return x


@torch.no_grad()
def sample_lcm(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise_sampler: NoiseSampler | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Latent Consistency Model multistep sampling, Luo et al. 2023 (arXiv:2310.04378) Alg. 1."""
    sigmas = sigmas.tolist()
    for i in range(len(sigmas) - 1):
        denoised = denoiser(x, _sigma_batch(x, sigmas[i]))
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + _noise(noise_sampler, x) * sigmas[i + 1]
        _report(callback, i, x, denoised)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "Euler": sample_euler,
    "Euler a": sample_euler_ancestral,
    "DDIM": sample_ddim,
    "DPM++ 2M": sample_dpmpp_2m,
    "DPM++ 2M SDE": sample_dpmpp_2m_sde,
    "UniPC": sample_unipc,
    "LCM": sample_lcm,
}
SAMPLER_NAMES: list[str] = list(SAMPLERS)
assert tuple(SAMPLER_NAMES) == params.SAMPLER_NAMES, "sampling and params must list the same samplers"


def sample(
    sampler: str,
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    noise_sampler: NoiseSampler,
    callback: Callback | None = None,
) -> Tensor:
    """Run the named sampler. x: initial noise already multiplied by sigmas[0]."""
    fn = SAMPLERS[parse_sampler(sampler)]
    return fn(denoiser, x, sigmas, noise_sampler=noise_sampler, callback=callback)
