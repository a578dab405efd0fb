"""DeepCache: its full pass is diffusers' forward; its cached passes skip the deep blocks."""

from __future__ import annotations

import pytest
import torch
from test_denoiser import random_cond, sd_alphas_cumprod, tiny_unet

from sfumato.deepcache import DeepCacheUNet
from sfumato.denoiser import UNetDenoiser, cfg_denoiser
from sfumato.sampling import get_sigmas, sample


def unet_inputs(cond, size: int = 8, odd: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict]:
    g = torch.Generator().manual_seed(1)
    shape = (cond.hidden.shape[0], 4, size + 1 if odd else size, size)
    extra = {}
    if cond.pooled is not None:
        extra["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
    return torch.randn(shape, generator=g), torch.tensor([500.0] * shape[0]), extra


@pytest.mark.parametrize(("sdxl", "odd"), [(False, False), (True, False), (False, True)])
def test_every_call_full_equals_the_diffusers_forward(sdxl, odd):
    unet, cond = tiny_unet(sdxl), random_cond(2, seed=0, sdxl=sdxl)
    x, t, extra = unet_inputs(cond, odd=odd)
    with torch.no_grad():
        expected = unet(x, t, encoder_hidden_states=cond.hidden, return_dict=False, **extra)[0]
    cached = DeepCacheUNet(unet, interval=1)
    for _ in range(2):
        assert torch.allclose(cached(x, t, cond.hidden, **extra)[0], expected, atol=1e-6)


def test_cached_calls_skip_the_deep_blocks_and_reuse_their_feature():
    unet, cond = tiny_unet(), random_cond(2, seed=0)
    x, t, _ = unet_inputs(cond)
    deep_calls = []
    unet.mid_block.register_forward_hook(lambda *_: deep_calls.append(1))
    cached = DeepCacheUNet(unet, interval=3)
    outputs = [cached(x + 0.01 * i, t + i, cond.hidden)[0] for i in range(6)]
    assert len(deep_calls) == 2  # calls 0 and 3 ran the whole UNet
    with torch.no_grad():
        exact = unet(x + 0.01, t + 1, encoder_hidden_states=cond.hidden, return_dict=False)[0]
    # a cached call answers with the fresh shallow path: close to, but not, the full answer
    assert not torch.equal(outputs[1], exact)
    assert (outputs[1] - exact).abs().max() < 0.1 * exact.abs().max()
    assert not torch.equal(outputs[1], outputs[0])


def test_uncond_and_cond_of_other_lengths_keep_separate_features():
    unet = tiny_unet()
    cond, uncond = random_cond(1, seed=0, tokens=154), random_cond(1, seed=1)
    plain = UNetDenoiser(unet, sd_alphas_cumprod(), "epsilon")
    cached = UNetDenoiser(DeepCacheUNet(unet, interval=2), sd_alphas_cumprod(), "epsilon")
    sigmas = get_sigmas("karras", 6, sd_alphas_cumprod())
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * sigmas[0]
    reference = sample("Euler", cfg_denoiser(plain, cond, uncond, 7.0), x, sigmas, noise_sampler=None)
    approximate = sample("Euler", cfg_denoiser(cached, cond, uncond, 7.0), x, sigmas, noise_sampler=None)
    assert set(cached.unet.deep) == {(0, (1, 4, 8, 8), (1, 77, 32)), (1, (1, 4, 8, 8), (1, 154, 32))}
    assert not torch.equal(reference, approximate)
    assert (reference - approximate).abs().max() < 0.2 * reference.abs().max()


def test_interval_below_one_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        DeepCacheUNet(tiny_unet(), interval=0)


def test_images_of_a_batch_run_one_at_a_time_keep_their_own_features():
    unet, cond = tiny_unet(), random_cond(1, seed=0)
    x, _, _ = unet_inputs(cond)
    images = [x, -x]
    alone = []
    for image in images:  # each image through its own cache
        cached = DeepCacheUNet(unet, interval=2)
        alone.append([cached(image, torch.tensor([t]), cond.hidden)[0] for t in (900.0, 800.0, 700.0)])
    shared = DeepCacheUNet(unet, interval=2)  # both images, interleaved at every step, as a batch runs
    for step, t in enumerate((900.0, 800.0, 700.0)):
        for image, expected in zip(images, alone, strict=True):
            assert torch.equal(shared(image, torch.tensor([t]), cond.hidden)[0], expected[step])
