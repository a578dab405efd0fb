"""Samplers and schedules against denoisers with a known answer, and against diffusers."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from sfumato.errors import ParamError
from sfumato.sampling import (
    SAMPLER_NAMES,
    SCHEDULE_NAMES,
    ancestral_step,
    get_sigmas,
    model_sigmas,
    parse_sampler,
    parse_schedule,
    sample,
    sigma_to_t,
)

SD_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}
DETERMINISTIC = ["Euler", "DDIM", "DPM++ 2M", "UniPC"]
STOCHASTIC = ["Euler a", "DPM++ 2M SDE", "LCM"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models: on a shared, busy CPU two OpenMP threads are ~50x slower than one
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def alphas_cumprod() -> torch.Tensor:
    return EulerDiscreteScheduler(**SD_CONFIG).alphas_cumprod.double()


def seeded_noise(shape: tuple[int, ...], seed: int, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return lambda: torch.randn(shape, generator=generator, dtype=dtype)


def per_sample(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)


class Gaussian:
    """Data N(mu, s^2) per dimension: the ideal denoiser and the probability-flow ODE are exact."""

    def __init__(self, mu: list[float], s: list[float], dtype=torch.float64):
        self.mu, self.s = torch.tensor(mu, dtype=dtype), torch.tensor(s, dtype=dtype)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = per_sample(sigma, x)
        return (self.s**2 * x + sigma**2 * self.mu) / (self.s**2 + sigma**2)

    def flow(self, x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
        """Exact probability-flow ODE solution from sigma_from to sigma_to."""
        s2 = self.s**2
        return self.mu + (x - self.mu) * ((s2 + sigma_to**2) / (s2 + sigma_from**2)).sqrt()

    def consistency(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """What an ideal consistency model (LCM) predicts: the ODE solution at sigma = 0."""
        return self.mu + (x - self.mu) * self.s / (self.s**2 + per_sample(sigma, x) ** 2).sqrt()

    def sample_marginal(self, n: int, sigma: float, seed: int = 0) -> torch.Tensor:
        z = torch.randn(n, len(self.mu), generator=torch.Generator().manual_seed(seed)).double()
        z = (z - z.mean(0)) / z.std(0)  # exact moments: what remains is the sampler's error
        return self.mu + z * (self.s**2 + sigma**2).sqrt()


# --- names and schedules ---------------------------------------------------------------------


def test_names_are_a1111s():
    assert SAMPLER_NAMES == ["Euler", "Euler a", "DDIM", "DPM++ 2M", "DPM++ 2M SDE", "UniPC", "LCM"]
    assert SCHEDULE_NAMES == ["normal", "karras"]
    assert parse_sampler("dpm++ 2m  sde") == "DPM++ 2M SDE"
    assert parse_sampler("euler A") == "Euler a"
    assert parse_schedule("Karras") == "karras"
    assert parse_schedule("Normal") == "normal"


def test_unknown_names_list_the_allowed_ones(alphas_cumprod):
    with pytest.raises(ParamError, match="DPM\\+\\+ 2M SDE.*LCM"):
        parse_sampler("Heun")
    with pytest.raises(ParamError, match="normal, karras"):
        get_sigmas("exponential", 10, alphas_cumprod)
    with pytest.raises(ParamError, match="steps"):
        get_sigmas("karras", 0, alphas_cumprod)
    with pytest.raises(ParamError):
        sample(
            "DPM2", lambda x, s: x, torch.zeros(1, 1), torch.tensor([1.0, 0.0]), noise_sampler=None
        )


@pytest.mark.parametrize("steps", [2, 4, 20, 150])
def test_karras_sigmas_equal_diffusers(alphas_cumprod, steps):
    for scheduler_class in (EulerDiscreteScheduler, DPMSolverMultistepScheduler):
        scheduler = scheduler_class(**SD_CONFIG, use_karras_sigmas=True)
        scheduler.set_timesteps(steps)
        ours = get_sigmas("karras", steps, alphas_cumprod)
        assert ours.shape == (steps + 1,) and ours[-1] == 0
        torch.testing.assert_close(ours, scheduler.sigmas.float(), rtol=1e-5, atol=1e-6)


def test_one_step_starts_at_sigma_max(alphas_cumprod):
    # (diffusers takes the karras range from its own timesteps, which collapse at 1 step)
    sigma_max = model_sigmas(alphas_cumprod)[-1].float()
    for schedule in SCHEDULE_NAMES:
        torch.testing.assert_close(
            get_sigmas(schedule, 1, alphas_cumprod), torch.stack([sigma_max, torch.tensor(0.0)])
        )


def test_normal_sigmas_interpolate_log_sigma_over_timesteps(alphas_cumprod):
    discrete = model_sigmas(alphas_cumprod)
    # 334 steps: timesteps 999, 996, ..., 0 are integers, so sigmas are the model's own.
    sigmas = get_sigmas("Normal", 334, alphas_cumprod)
    torch.testing.assert_close(sigmas[:-1], discrete.flip(0)[::3].float())
    assert sigmas[-1] == 0
    # 3 steps: timesteps 999, 499.5, 0; the middle one is the geometric mean of its neighbours.
    sigmas = get_sigmas("normal", 3, alphas_cumprod)
    expected = torch.stack([discrete[999], (discrete[499] * discrete[500]).sqrt(), discrete[0]])
    torch.testing.assert_close(sigmas[:-1], expected.float())


def test_sigma_to_t_inverts_the_discrete_schedule(alphas_cumprod):
    log_sigmas = model_sigmas(alphas_cumprod).log()
    t = torch.tensor([0.0, 1.0, 250.0, 499.5, 998.25, 999.0], dtype=torch.float64)
    sigma = (
        log_sigmas[t.floor().long()] * (1 - t.frac()) + log_sigmas[t.ceil().long()] * t.frac()
    ).exp()
    torch.testing.assert_close(sigma_to_t(sigma, log_sigmas), t)
    # outside the model's range the timestep clamps to its ends
    out = sigma_to_t(torch.tensor([1e-4, 1e3], dtype=torch.float64), log_sigmas)
    assert out.tolist() == [0.0, 999.0]


# --- known answers ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLER_NAMES)
@settings(max_examples=8, deadline=None)
@given(steps=st.integers(1, 30), schedule=st.sampled_from(SCHEDULE_NAMES))
def test_point_mass_data_ends_on_the_point(alphas_cumprod, name, steps, schedule):
    point = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(steps))
    sigmas = get_sigmas(schedule, steps, alphas_cumprod)
    x = torch.randn(point.shape, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    seen = []
    out = sample(
        name,
        lambda x, sigma: point.expand_as(x),
        x,
        sigmas,
        noise_sampler=seeded_noise(x.shape, 2),
        callback=lambda i, x, d: seen.append(i),
    )
    torch.testing.assert_close(out, point, atol=1e-5, rtol=1e-5)
    assert seen == list(range(steps))


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_gaussian_data_is_sampled_with_the_right_moments(alphas_cumprod, name):
    data = Gaussian(mu=[0.3, -1.0], s=[0.5, 2.0])
    sigmas = get_sigmas("karras", 200, alphas_cumprod)
    x = data.sample_marginal(6000, sigmas[0].item())
    denoiser = data.consistency if name == "LCM" else data.denoise
    out = sample(name, denoiser, x, sigmas, noise_sampler=seeded_noise(x.shape, 3, torch.float64))
    assert ((out.mean(0) - data.mu).abs() / data.s).max() < 0.05
    assert ((out.std(0) / data.s) - 1).abs().max() < 0.04


@pytest.mark.parametrize("name, order", [("Euler", 1), ("DDIM", 1), ("DPM++ 2M", 2), ("UniPC", 3)])
def test_deterministic_samplers_solve_the_flow_ode_at_their_order(alphas_cumprod, name, order):
    data = Gaussian(mu=[0.3, -1.0], s=[0.5, 2.0])
    z = torch.randn(500, 2, generator=torch.Generator().manual_seed(0)).double()
    errors = []
    for steps in (20, 40, 80):
        sigmas = get_sigmas("karras", steps, alphas_cumprod)
        x = z * sigmas[0].item()
        # every sampler ends with x = denoise(x, sigma_min): the ODE stops there
        last = sigmas[-2:-1].double()
        exact = data.denoise(data.flow(x, sigmas[0].item(), last.item()), last)
        out = sample(name, data.denoise, x, sigmas, noise_sampler=None)
        errors.append((out - exact).abs().max().item())
    rates = [math.log2(a / b) for a, b in zip(errors, errors[1:], strict=False)]
    assert min(rates) > order - 0.3, (errors, rates)
    assert errors[-1] < [0.2, 0.01, 0.001][order - 1]


@given(st.floats(0.01, 20), st.floats(0.0, 1.0))
def test_ancestral_step_keeps_the_noise_level(sigma_from, fraction):
    sigma_to = sigma_from * fraction
    down, up = ancestral_step(sigma_from, sigma_to)
    assert down**2 + up**2 == pytest.approx(sigma_to**2, abs=1e-9)
    # eta = 1: as much fresh noise as DDPM's posterior (k-diffusion's choice)
    assert up == pytest.approx(sigma_to * (1 - fraction**2) ** 0.5, abs=1e-6)
    assert ancestral_step(sigma_from, sigma_to, eta=0.0) == pytest.approx((sigma_to, 0.0))


def test_ancestral_samplers_draw_noise_only_from_the_noise_sampler(alphas_cumprod):
    data = Gaussian(mu=[0.0], s=[1.0], dtype=torch.float32)
    sigmas = get_sigmas("karras", 6, alphas_cumprod)
    x = torch.randn(3, 1, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    for name in STOCHASTIC:
        torch.manual_seed(0)
        a = sample(name, data.denoise, x, sigmas, noise_sampler=seeded_noise(x.shape, 5))
        torch.manual_seed(1)  # the global RNG must not matter
        b = sample(name, data.denoise, x, sigmas, noise_sampler=seeded_noise(x.shape, 5))
        c = sample(name, data.denoise, x, sigmas, noise_sampler=seeded_noise(x.shape, 6))
        assert torch.equal(a, b) and not torch.allclose(a, c), name
        with pytest.raises(ValueError, match="noise_sampler"):
            sample(name, data.denoise, x, sigmas, noise_sampler=None)


# --- diffusers' schedulers on the same fake model -------------------------------------------


def fake_x0(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A fixed nonlinear stand-in for a trained denoiser."""
    sigma = per_sample(sigma, x)
    return 0.8 * torch.tanh(x / (1 + sigma)) + 0.1 * torch.sin(3 * sigma)


def diffusers_trajectory(scheduler, sigmas: list[float], x: torch.Tensor, *, vp: bool) -> list:
    """Run a diffusers scheduler with an epsilon model equivalent to fake_x0; return the sample
    after each step in sigma space (x = x0 + sigma * eps). vp: the scheduler's sample is
    x / sqrt(sigma^2 + 1) (DDPM scaling) rather than x itself."""

    def scale(i):
        return (1 + sigmas[i] ** 2) ** 0.5 if vp else 1.0

    sample_, out = x / scale(0), []
    for i, t in enumerate(scheduler.timesteps):
        x_k = sample_ * scale(i)
        eps = (x_k - fake_x0(x_k, torch.tensor([sigmas[i]]))) / sigmas[i]
        sample_ = scheduler.step(eps, t, sample_).prev_sample
        out.append(sample_ * scale(i + 1))
    return out


def our_trajectory(name: str, sigmas: torch.Tensor, x: torch.Tensor) -> list:
    out = []
    sample(name, fake_x0, x, sigmas, noise_sampler=None, callback=lambda i, x, d: out.append(x))
    return out


@pytest.mark.parametrize("steps", [8, 25])
@pytest.mark.parametrize(
    "name, scheduler_class, vp, kwargs",
    [
        ("Euler", EulerDiscreteScheduler, False, {}),
        (
            "DPM++ 2M",
            DPMSolverMultistepScheduler,
            True,
            {"algorithm_type": "dpmsolver++", "solver_order": 2},
        ),
        ("UniPC", UniPCMultistepScheduler, True, {"solver_type": "bh2", "solver_order": 2}),
    ],
)
def test_karras_trajectories_match_diffusers(
    alphas_cumprod, name, scheduler_class, vp, kwargs, steps
):
    scheduler = scheduler_class(**SD_CONFIG, use_karras_sigmas=True, **kwargs)
    scheduler.set_timesteps(steps)
    sigmas = get_sigmas("karras", steps, alphas_cumprod)
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    theirs = diffusers_trajectory(scheduler, scheduler.sigmas.tolist(), x, vp=vp)
    ours = our_trajectory(name, sigmas, x)
    assert len(ours) == len(theirs) == steps
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


def test_ddim_is_diffusers_ddim_in_sigma_space(alphas_cumprod):
    steps = 20
    scheduler = DDIMScheduler(**SD_CONFIG, clip_sample=False, set_alpha_to_one=True, steps_offset=0)
    scheduler.set_timesteps(steps)
    discrete = model_sigmas(scheduler.alphas_cumprod)
    sigmas = torch.cat([discrete[scheduler.timesteps], torch.zeros(1, dtype=torch.float64)]).float()
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    theirs = diffusers_trajectory(scheduler, sigmas.tolist(), x, vp=True)
    ours = our_trajectory("DDIM", sigmas, x)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)
