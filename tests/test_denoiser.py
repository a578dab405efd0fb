"""UNetDenoiser and CFG on tiny random diffusers UNets and on fakes with a known answer."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from sfumato.denoiser import Conditioning, UNetDenoiser, cfg_denoiser
from sfumato.errors import CheckpointError
from sfumato.sampling import SAMPLER_NAMES, get_sigmas, model_sigmas, sample

TEXT_DIM, POOLED_DIM = 32, 16


def sd_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def tiny_unet(sdxl: bool = False) -> UNet2DConditionModel:
    torch.manual_seed(0)
    extra = {}
    if sdxl:
        extra = {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": POOLED_DIM + 6 * 8,
        }
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=32,
        **extra,
    ).eval()


def random_cond(b: int, seed: int, tokens: int = 77, sdxl: bool = False) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    if not sdxl:
        return Conditioning(torch.randn(b, tokens, TEXT_DIM, generator=g), None, None)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(b, 1)
    return Conditioning(
        torch.randn(b, tokens, TEXT_DIM, generator=g),
        torch.randn(b, POOLED_DIM, generator=g),
        time_ids,
    )


def record_calls(unet) -> list[dict]:
    """Record what each UNet forward receives."""
    calls: list[dict] = []

    def hook(module, args, kwargs):
        sample_, timestep = args[:2]
        calls.append({"batch": sample_.shape[0], "dtype": sample_.dtype, "t": timestep, **kwargs})

    unet.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models: on a shared, busy CPU two OpenMP threads are ~50x slower than one
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    return tiny_unet()


def test_epsilon_and_v_outputs_become_x0(unet):
    alphas_cumprod = sd_alphas_cumprod()
    t = torch.tensor([100, 700])
    sigma = model_sigmas(alphas_cumprod)[t].float()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 3
    cond = random_cond(2, seed=2)
    # diffusers' DDPM view: x_vp = alpha * x0 + sigma_vp * eps, with x = x_vp / alpha
    alpha = alphas_cumprod[t].sqrt().float().view(-1, 1, 1, 1)
    sigma_vp = (1 - alphas_cumprod[t]).sqrt().float().view(-1, 1, 1, 1)
    x_vp = x * alpha
    with torch.no_grad():
        out = unet(x_vp, t, encoder_hidden_states=cond.hidden).sample

    eps_x0 = UNetDenoiser(unet, alphas_cumprod, "epsilon")(x, sigma, cond)
    torch.testing.assert_close(eps_x0, (x_vp - sigma_vp * out) / alpha, atol=1e-4, rtol=1e-4)
    v_x0 = UNetDenoiser(unet, alphas_cumprod, "v_prediction")(x, sigma, cond)
    torch.testing.assert_close(v_x0, alpha * x_vp - sigma_vp * out, atol=1e-4, rtol=1e-4)


class PointMassUNet(torch.nn.Module):
    """The exact eps or v model for data that is a single point; needs integer timesteps."""

    def __init__(self, point: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str):
        super().__init__()
        self.point, self.alphas_cumprod, self.prediction_type = (
            point,
            alphas_cumprod,
            prediction_type,
        )
        self.dtype = torch.float32

    def forward(self, x_vp, t, encoder_hidden_states, return_dict=True):
        abar = self.alphas_cumprod[t.round().long()].float().view(-1, 1, 1, 1)
        eps = (x_vp - abar.sqrt() * self.point) / (1 - abar).sqrt()
        v = abar.sqrt() * eps - (1 - abar).sqrt() * self.point
        return (eps if self.prediction_type == "epsilon" else v,)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_exact_model_of_point_data_denoises_to_the_point(prediction_type):
    alphas_cumprod = sd_alphas_cumprod()
    point = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    denoiser = UNetDenoiser(
        PointMassUNet(point, alphas_cumprod, prediction_type), alphas_cumprod, prediction_type
    )
    x = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(1)) * 5
    sigma = model_sigmas(alphas_cumprod)[torch.tensor([0, 400, 999])].float()
    torch.testing.assert_close(
        denoiser(x, sigma, random_cond(3, 0)), point.expand_as(x), atol=1e-4, rtol=1e-4
    )
    # and a whole sampling run ends on it
    sigmas = model_sigmas(alphas_cumprod)[torch.arange(999, -1, -111)].float()
    sigmas = torch.cat([sigmas, torch.zeros(1)])
    out = sample(
        "DPM++ 2M",
        lambda x, s: denoiser(x, s, random_cond(3, 0)),
        x * sigmas[0] / 5,
        sigmas,
        noise_sampler=None,
    )
    torch.testing.assert_close(out, point.expand_as(x), atol=1e-4, rtol=1e-4)


def test_sigma_becomes_a_fractional_timestep():
    alphas_cumprod = sd_alphas_cumprod()
    discrete = model_sigmas(alphas_cumprod)
    sigma = torch.stack([discrete[250], (discrete[499] * discrete[500]).sqrt()]).float()
    probe = tiny_unet()
    calls = record_calls(probe)
    UNetDenoiser(probe, alphas_cumprod, "epsilon")(
        torch.zeros(2, 4, 8, 8), sigma, random_cond(2, 0)
    )
    torch.testing.assert_close(calls[0]["t"], torch.tensor([250.0, 499.5]), atol=1e-3, rtol=0)


def test_unknown_prediction_type_is_a_checkpoint_error(unet):
    with pytest.raises(CheckpointError, match="epsilon, v_prediction"):
        UNetDenoiser(unet, sd_alphas_cumprod(), "sample")


@pytest.mark.parametrize("sdxl", [False, True])
def test_cfg_is_one_batched_call_equal_to_two_separate_ones(sdxl):
    unet = tiny_unet(sdxl)
    model = UNetDenoiser(unet, sd_alphas_cumprod(), "epsilon")
    cond, uncond = random_cond(2, 1, sdxl=sdxl), random_cond(2, 2, sdxl=sdxl)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 4
    sigma = torch.tensor([4.0, 4.0])
    expected = model(x, sigma, uncond) + 7.5 * (model(x, sigma, cond) - model(x, sigma, uncond))

    calls = record_calls(unet)
    guided = cfg_denoiser(model, cond, uncond, 7.5)(x, sigma)
    assert [c["batch"] for c in calls] == [4]
    torch.testing.assert_close(
        guided, expected, atol=3e-4, rtol=1e-4
    )  # batched matmuls round differently
    if sdxl:
        assert calls[0]["added_cond_kwargs"]["text_embeds"].shape == (4, POOLED_DIM)

    calls.clear()
    plain = cfg_denoiser(model, cond, uncond, 1.0)(x, sigma)
    assert [c["batch"] for c in calls] == [2]  # uncond pass skipped
    torch.testing.assert_close(plain, model(x, sigma, cond))


def test_sdxl_pooled_embeds_reach_the_unet():
    model = UNetDenoiser(tiny_unet(sdxl=True), sd_alphas_cumprod(), "epsilon")
    cond = random_cond(1, 1, sdxl=True)
    other = Conditioning(cond.hidden, cond.pooled + 1, cond.time_ids)
    x, sigma = torch.ones(1, 4, 8, 8), torch.tensor([2.0])
    assert not torch.allclose(model(x, sigma, cond), model(x, sigma, other))


def test_cfg_with_different_prompt_lengths_runs_two_passes(unet):
    model = UNetDenoiser(unet, sd_alphas_cumprod(), "epsilon")
    cond, uncond = random_cond(1, 1, tokens=154), random_cond(1, 2, tokens=77)
    x, sigma = (
        torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)),
        torch.tensor([1.5]),
    )
    calls = record_calls(unet)
    guided = cfg_denoiser(model, cond, uncond, 5.0)(x, sigma)
    assert [c["batch"] for c in calls] == [1, 1]
    u = model(x, sigma, uncond)
    torch.testing.assert_close(guided, u + 5.0 * (model(x, sigma, cond) - u))


def test_half_precision_unet_with_fp32_latents():
    alphas_cumprod = sd_alphas_cumprod()
    unet32 = tiny_unet()
    unet16 = tiny_unet().half()
    calls = record_calls(unet16)
    cond = random_cond(2, 1)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 14
    sigma = torch.tensor([14.0, 0.03])
    full = UNetDenoiser(unet32, alphas_cumprod, "epsilon")(x, sigma, cond)
    half = UNetDenoiser(unet16, alphas_cumprod, "epsilon")(x, sigma, cond)
    assert (
        calls[0]["dtype"] == torch.float16
        and calls[0]["encoder_hidden_states"].dtype == torch.float16
    )
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    torch.testing.assert_close(half, full, atol=0.05, rtol=0.01)


def test_a_short_run_on_the_tiny_unet_is_finite_for_every_sampler(unet):
    alphas_cumprod = sd_alphas_cumprod()
    denoise = cfg_denoiser(
        UNetDenoiser(unet, alphas_cumprod, "epsilon"), random_cond(1, 1), random_cond(1, 2), 7.0
    )
    sigmas = get_sigmas("karras", 4, alphas_cumprod)
    g = torch.Generator().manual_seed(0)
    for name in SAMPLER_NAMES:
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]
        out = sample(
            name, denoise, x, sigmas, noise_sampler=lambda: torch.randn(1, 4, 8, 8, generator=g)
        )
        assert out.shape == x.shape and torch.isfinite(out).all(), name
