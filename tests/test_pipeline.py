import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import sfumato
from sfumato.errors import Interrupted, ParamError
from sfumato.params import GenerationParams


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return sfumato.load(str(tiny_model_dir), device="cpu")


def pixels(results):
    return [np.asarray(r.image) for r in results]


def test_generates_images_with_metadata(pipe):
    results = pipe.generate(prompt="a red star", negative_prompt="blue", seed=3, steps=4,
                            width=64, height=64, batch_size=2)
    assert [r.seed for r in results] == [3, 4]
    assert results[0].image.size == (64, 64)
    assert "Seed: 4" in results[1].infotext and "Size: 64x64" in results[1].infotext
    assert results[0].params.seed == 3


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M SDE", "DPM++ 2M"])
def test_same_seed_same_bytes_at_any_batch_size(pipe, sampler):
    params = GenerationParams("a blue circle", seed=11, steps=3, width=64, height=64, sampler=sampler)
    one = pixels(pipe.generate(params))
    again = pixels(pipe.generate(params))
    three = pixels(pipe.generate(GenerationParams(**{**params.to_dict(), "batch_size": 3})))
    second = pixels(pipe.generate(GenerationParams(**{**params.to_dict(), "seed": 12})))
    assert np.array_equal(one[0], again[0])
    assert np.array_equal(one[0], three[0])
    assert np.array_equal(second[0], three[1])
    assert not np.array_equal(three[0], three[1])


def test_every_sampler_and_schedule_runs(pipe):
    from sfumato.params import SAMPLER_NAMES, SCHEDULE_NAMES

    for sampler in SAMPLER_NAMES:
        for schedule in SCHEDULE_NAMES:
            [result] = pipe.generate(prompt="x", seed=1, steps=3, width=64, height=64,
                                     sampler=sampler, scheduler=schedule)
            assert np.isfinite(np.asarray(result.image, dtype=float)).all()


def test_callback_reports_steps_and_can_cancel(pipe):
    seen = []
    pipe.generate(prompt="x", seed=1, steps=4, width=64, height=64,
                  callback=lambda step, total, latents: seen.append((step, total, latents.shape)))
    assert [s[:2] for s in seen] == [(1, 4), (2, 4), (3, 4), (4, 4)]

    def stop(step, total, latents):
        if step == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        pipe.generate(prompt="x", seed=1, steps=4, width=64, height=64, callback=stop)


def test_img2img_keeps_the_init_image_at_low_strength(pipe):
    init = Image.fromarray(np.tile(np.array([200, 30, 30], np.uint8), (64, 64, 1)))
    [low] = pipe.generate(prompt="x", seed=1, steps=10, width=64, height=64, cfg_scale=1,
                          denoising_strength=0.1, init_image=init)
    [high] = pipe.generate(prompt="x", seed=1, steps=10, width=64, height=64, cfg_scale=1,
                           denoising_strength=1.0, init_image=init)
    assert "Denoising strength: 0.1" in low.infotext
    reconstruction = pipe.decode(pipe.encode_image(init, 64, 64, seed=1))[0]
    distance = [np.abs(np.asarray(x.image, float) - np.asarray(reconstruction, float)).mean()
                for x in (low, high)]
    assert distance[0] < distance[1]


def test_a_zero_terminal_snr_v_prediction_model_samples_from_pure_noise(tiny_model_dir, tmp_path):
    def v_prediction_model(name: str, zero_snr: bool):
        folder = shutil.copytree(tiny_model_dir, tmp_path / name)
        config_file = folder / "scheduler" / "scheduler_config.json"
        config = json.loads(config_file.read_text())
        config_file.write_text(json.dumps({**config, "prediction_type": "v_prediction",
                                           "rescale_betas_zero_snr": zero_snr}))
        return sfumato.load(str(folder), device="cpu")

    zsnr, plain = v_prediction_model("zsnr", True), v_prediction_model("plain", False)
    assert zsnr.model.prediction_type == "v_prediction"
    assert zsnr.model.alphas_cumprod[-1] < 1e-7 < plain.model.alphas_cumprod[-1]
    kwargs = dict(prompt="a red star", seed=3, steps=4, width=64, height=64)
    for sampler in ("Euler", "DPM++ 2M"):
        image = pixels(zsnr.generate(sampler=sampler, **kwargs))[0]
        assert image.std() > 0  # finite, not a flat NaN-black image
        assert not np.array_equal(image, pixels(plain.generate(sampler=sampler, **kwargs))[0])


def test_bad_params_raise_a_clear_error(pipe):
    with pytest.raises(ParamError, match="multiple of 8"):
        pipe.generate(prompt="x", width=65)


def test_matches_diffusers_stable_diffusion_pipeline(pipe, tiny_model_dir):
    """Same components, scheduler (Euler, Karras sigmas), seed and prompt: same image."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    reference = StableDiffusionPipeline(
        vae=pipe.model.vae, text_encoder=pipe.model.text_encoders[0], tokenizer=pipe.model.tokenizers[0],
        unet=pipe.model.unet,
        scheduler=EulerDiscreteScheduler.from_pretrained(
            tiny_model_dir / "scheduler", use_karras_sigmas=True, timestep_spacing="linspace"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    params = GenerationParams("a red star above a blue circle", negative_prompt="green", seed=5,
                              steps=6, cfg_scale=6.0, width=64, height=64, sampler="Euler",
                              scheduler="karras").validated()
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(5))
    expected = reference(params.prompt, negative_prompt=params.negative_prompt, latents=noise,
                         num_inference_steps=6, guidance_scale=6.0, height=64, width=64,
                         output_type="np").images[0]
    latents = pipe.sample_latents(params, params.prompt, params.negative_prompt, 64, 64)
    from sfumato.latents import decode

    ours = decode(pipe.model.vae, latents)[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - expected).max() <= 1e-3


def test_untrusted_lora_names_stay_inside_the_lora_folder(tiny_model_dir, tmp_path):
    from sfumato.errors import LoraError
    from sfumato.pipeline import Pipeline

    (tmp_path / "loras").mkdir()
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"not a lora")
    pipe = Pipeline.load(str(tiny_model_dir), device="cpu", lora_dir=tmp_path / "loras",
                         allow_lora_paths=False)
    for name in (str(outside), "../outside"):
        with pytest.raises(LoraError):
            pipe.generate(prompt=f"x <lora:{name}:1>", seed=1, steps=1, width=64, height=64)


def test_the_heap_is_trimmed_before_big_decodes_only(pipe, monkeypatch):
    from sfumato import accel, pipeline

    trims = []
    monkeypatch.setattr(accel, "release_free_memory", lambda: trims.append(1))
    latents = torch.zeros(1, 4, 8, 8)
    pipe.decode(latents)
    assert trims == []  # a small decode: handing the pages back would cost more than it saves
    monkeypatch.setattr(pipeline, "TRIM_BEFORE_DECODE_LATENT_PIXELS", 8 * 8)
    pipe.decode(latents)
    assert trims == [1]
