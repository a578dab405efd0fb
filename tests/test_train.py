"""sfumato train: tiny recipes on CPU; resume must repeat an uninterrupted run exactly, and
--init-from must start exactly from an assembled folder's weights."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sfumato.errors import SfumatoError
from sfumato.train.cli import train
from sfumato.train.common import CHECKPOINT, load_recipe

STEPS = 4


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models on a shared 2-core machine run far faster on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_stage(stage: str, out: Path, *args: str) -> None:
    extra = {"unet": ["--vae", str(out.parent / "vae_full"), "--clip", str(out.parent / "clip_full")]}
    result = CliRunner().invoke(train, [stage, "--config", f"tiny_{stage}", "--out", str(out), "--device", "cpu",
                                        *extra.get(stage, []), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output


def user_error(args: list[str]) -> str:
    """Run `sfumato train ARGS`, which must fail as a user error: one line, exit 2, no traceback."""
    result = CliRunner().invoke(train, args, catch_exceptions=False)
    assert result.exit_code == 2 and result.output.startswith("error: "), result.output
    assert "Traceback" not in result.output
    return result.output


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory) -> Path:
    """Uninterrupted tiny runs of every stage (the UNet uses the VAE and CLIP runs)."""
    root = tmp_path_factory.mktemp("train")
    torch.set_num_threads(1)
    for stage in ("vae", "clip", "unet"):
        run_stage(stage, root / f"{stage}_full", "--steps", str(STEPS))
    return root


@pytest.fixture(scope="module")
def assembled(full_runs: Path) -> Path:
    """The full runs, assembled into a model folder."""
    out = full_runs / "builtin"
    result = CliRunner().invoke(train, ["assemble", "--vae", str(full_runs / "vae_full"),
                                        "--clip", str(full_runs / "clip_full"),
                                        "--unet", str(full_runs / "unet_full"), "--out", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def checkpoint(folder: Path) -> dict:
    return torch.load(folder / CHECKPOINT, weights_only=True)


@pytest.mark.parametrize("stage", ["vae", "clip", "unet"])
def test_resume_repeats_uninterrupted_run(full_runs: Path, stage: str):
    out = full_runs / f"{stage}_resumed"
    run_stage(stage, out, "--steps", "2")
    assert checkpoint(out)["step"] == 2
    run_stage(stage, out, "--steps", str(STEPS), "--resume")
    resumed, full = checkpoint(out), checkpoint(full_runs / f"{stage}_full")
    assert resumed["step"] == full["step"] == STEPS
    assert resumed["losses"] == full["losses"]  # the steps after the resume too, exactly
    for key, value in full["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    for a, b in zip(resumed["ema"]["shadow_params"], full["ema"]["shadow_params"], strict=True):
        assert torch.equal(a, b)
    assert len(list((out / "samples").glob("*.png"))) >= 2


def test_stage_outputs_load_and_report(full_runs: Path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPModel, CLIPTextModel

    vae = AutoencoderKL.from_pretrained(full_runs / "vae_full" / "vae")
    metrics = json.loads((full_runs / "vae_full" / "metrics.json").read_text())
    assert vae.config.scaling_factor == pytest.approx(metrics["scaling_factor"])
    assert vae.config.scaling_factor != 1.0  # measured on data, not the default
    assert metrics["heldout_psnr_db"] > 0
    clip = CLIPModel.from_pretrained(full_runs / "clip_full" / "clip")
    text = CLIPTextModel.from_pretrained(full_runs / "clip_full" / "text_encoder")
    assert torch.equal(text.get_input_embeddings().weight, clip.text_model.get_input_embeddings().weight)
    metrics = json.loads((full_runs / "clip_full" / "metrics.json").read_text())
    assert 0 <= metrics["retrieval_top1_train"] <= 1
    assert 0 <= metrics["shape_swap_choice_train"] <= 1 and 0 <= metrics["colour_swap_choice_heldout"] <= 1
    unet = UNet2DConditionModel.from_pretrained(full_runs / "unet_full" / "unet")
    assert unet.config.cross_attention_dim == text.config.hidden_size
    # the shipped UNet weights are the EMA ones (the EMA holds the UNet's, then the text encoder's)
    params = list(unet.parameters())
    ema = checkpoint(full_runs / "unet_full")["ema"]["shadow_params"][: len(params)]
    assert all(torch.equal(p, e) for p, e in zip(params, ema, strict=True))
    assert not (full_runs / "unet_full" / "text_encoder").exists()  # frozen: the CLIP stage's is the one


def test_max_minutes_stops_cleanly_with_everything_saved(tmp_path: Path):
    run_stage("vae", tmp_path, "--steps", "1000", "--max-minutes", "0.001")
    state = checkpoint(tmp_path)
    assert 1 <= state["step"] < 1000
    assert (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").exists()


def test_command_line_overrides_replace_the_recipes_values(tmp_path: Path):
    run_stage("vae", tmp_path, "--steps", "1", "--batch-size", "2", "--lr", "3e-5")
    recipe = json.loads((tmp_path / "metrics.json").read_text())["recipe"]
    assert (recipe["steps"], recipe["batch_size"], recipe["lr"]) == (1, 2, 3e-5)
    lr_used = checkpoint(tmp_path)["optimizer"]["param_groups"][0]["lr"]
    assert 0 < lr_used <= 3e-5  # tiny_vae's own lr is 1e-3
    result = CliRunner().invoke(train, ["vae", "--out", str(tmp_path / "x"), "--lr", "0"])
    assert result.exit_code == 2 and "--lr" in result.output and "Traceback" not in result.output


def test_assemble_builds_a_loadable_diffusers_folder(full_runs: Path, assembled: Path):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from sfumato.train.assemble import load_clip

    out = assembled
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    trained = UNet2DConditionModel.from_pretrained(full_runs / "unet_full" / "unet")
    for a, b in zip(unet.parameters(), trained.parameters(), strict=True):
        torch.testing.assert_close(a.float(), b, atol=1e-2, rtol=1e-2)  # fp16 rounding at most
    vae = AutoencoderKL.from_pretrained(out / "vae")
    assert vae.config.scaling_factor == AutoencoderKL.from_pretrained(full_runs / "vae_full" / "vae").config.scaling_factor
    text, info = CLIPTextModel.from_pretrained(out / "text_encoder", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    scheduler = DDPMScheduler.from_pretrained(out / "scheduler")
    assert (scheduler.config.beta_schedule, scheduler.config.beta_start, scheduler.config.beta_end) == (
        "scaled_linear", 0.00085, 0.012)
    clip = load_clip(out)
    assert torch.equal(clip.text_model.get_input_embeddings().weight.half(), text.get_input_embeddings().weight.half())
    card = (out / "MODEL_CARD.md").read_text()
    assert "PSNR" in card and f"{sum(p.numel() for p in unet.parameters()):,}" in card
    for part in ("unet", "vae"):  # loaded from the runs' folders: their paths must not ship
        assert "_name_or_path" not in json.loads((out / part / "config.json").read_text())


def test_shipped_recipes_fit_the_size_budget():
    from sfumato.train.clip import build_clip
    from sfumato.train.unet import build_unet
    from sfumato.train.vae import build_vae

    vae, clip, unet = (load_recipe(name, gpu=False) for name in ("vae", "clip", "unet"))
    clip_model = build_clip(clip["model"], clip["data"]["size"])
    width = clip_model.config.text_config.hidden_size

    def shipped_bytes(unet_recipe: str) -> int:  # two fp16 copies: the diffusers folder and the single file
        parts = [build_vae(vae["model"]), clip_model.text_model,
                 build_unet(load_recipe(unet_recipe, gpu=False)["model"], width, 16)]
        return sum(p.numel() for part in parts for p in part.parameters()) * 2 * 2

    assert shipped_bytes("unet") <= 40e6 and shipped_bytes("unet_budget") <= 40e6
    assert shipped_bytes("unet_wide") > 40e6  # why unet_budget exists
    assert load_recipe("unet", gpu=True)["batch_size"] > unet["batch_size"]  # the [gpu] table applies
    for prefix in ("", "tiny_"):  # the decoder stage continues its vae stage: same architecture, whole images
        decoder, first = load_recipe(f"{prefix}vae_decoder", gpu=False), load_recipe(f"{prefix}vae", gpu=False)
        assert decoder["model"] == {k: v for k, v in first["model"].items() if k != "crop"}
        assert decoder["train_encoder"] is False and decoder["data"]["crop"] == 0 < first["data"]["crop"]


def test_zero_terminal_snr_needs_v_prediction():
    from sfumato.train.unet import build_scheduler

    with pytest.raises(SfumatoError, match="v_prediction"):
        build_scheduler("epsilon", zero_terminal_snr=True)
    scheduler = build_scheduler("v_prediction", zero_terminal_snr=True)
    assert scheduler.alphas_cumprod[-1] == 0  # the last training step is pure noise


def test_a_recipe_overrides_its_base_key_by_key(tmp_path: Path):
    zero_snr, unet = load_recipe("unet_zero_snr", gpu=True), load_recipe("unet", gpu=True)
    assert (zero_snr["prediction_type"], zero_snr["zero_terminal_snr"]) == ("v_prediction", True)
    assert {k: v for k, v in zero_snr.items() if k != "zero_terminal_snr"} == {**unet, "prediction_type": "v_prediction"}
    child = tmp_path / "child.toml"
    child.write_text('base = "unet"\n[data]\ntrain_scenes = 7\n')
    merged = load_recipe(str(child), gpu=False)
    assert merged["data"]["train_scenes"] == 7 and merged["data"]["size"] == unet["data"]["size"]
    loop = tmp_path / "loop.toml"
    loop.write_text(f'base = "{loop}"\n')
    with pytest.raises(SfumatoError, match="its own base"):
        load_recipe(str(loop), gpu=False)


def test_min_snr_weighting_caps_the_easy_timesteps():
    from sfumato.train.common import denoising_loss

    prediction, target = torch.zeros(3, 4, 2, 2), torch.ones(3, 4, 2, 2)  # per-sample MSE 1
    alpha_bar = torch.tensor([0.999, 0.5, 0.0])  # SNR 999, 1, 0
    assert denoising_loss(prediction, target, alpha_bar, "epsilon") == 1.0  # gamma 0: plain MSE
    eps = denoising_loss(prediction, target, alpha_bar, "epsilon", min_snr_gamma=5.0)
    v = denoising_loss(prediction, target, alpha_bar, "v_prediction", min_snr_gamma=5.0)
    # eps weights min(SNR, 5) / SNR: 5/999, 1, and 0 at zero SNR (where eps training is refused anyway)
    assert eps.item() == pytest.approx((5 / 999 + 1 + 0) / 3, rel=1e-4)
    # v weights min(SNR, 5) / (SNR + 1): 5/1000, 1/2, and 0 at zero SNR (nothing to learn there)
    assert v.item() == pytest.approx((5 / 1000 + 0.5 + 0) / 3, rel=1e-4)


def test_an_snr_floor_raises_the_weight_of_the_noisiest_timesteps_only():
    from sfumato.train.common import denoising_loss

    prediction, target = torch.zeros(3, 4, 2, 2), torch.ones(3, 4, 2, 2)  # per-sample MSE 1
    alpha_bar = torch.tensor([0.999, 0.5, 0.01])  # SNR 999, 1, 1/99
    eps = denoising_loss(prediction, target, alpha_bar, "epsilon", snr_floor=0.1)
    # eps weights max(SNR, 0.1) / SNR: 1, 1, and 9.9 at SNR 1/99
    assert eps.item() == pytest.approx((1 + 1 + 9.9) / 3, rel=1e-4)
    both = denoising_loss(prediction, target, alpha_bar, "epsilon", min_snr_gamma=5.0, snr_floor=0.1)
    assert both.item() == pytest.approx((5 / 999 + 1 + 9.9) / 3, rel=1e-4)
    v = denoising_loss(prediction, target, alpha_bar, "v_prediction", snr_floor=0.1)
    assert v.item() == pytest.approx((999 / 1000 + 0.5 + 0.1 / (1 / 99 + 1)) / 3, rel=1e-4)  # / (SNR + 1)


def test_pixel_weights_move_each_samples_loss_towards_the_weighted_pixels():
    from sfumato.train.common import denoising_loss

    prediction, target = torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    target[:, :, 0, 0] = 2.0  # all the error on one pixel of four: plain MSE 1
    alpha_bar = torch.tensor([0.5, 0.5])
    weights = torch.ones(2, 1, 2, 2)
    assert denoising_loss(prediction, target, alpha_bar, "epsilon", pixel_weights=weights) == 1.0
    weights[:, :, 0, 0] = 5.0  # that pixel weighs 5 of 8 now
    assert denoising_loss(prediction, target, alpha_bar, "epsilon", pixel_weights=weights).item() == \
        pytest.approx(4 * 5 / 8)


def test_latent_object_masks_cover_the_objects_and_nothing_else():
    from sfumato.train.unet import latent_object_masks
    from sfumato.world.scenes import ObjectSpec, Scene

    star = ObjectSpec("star", "red", "small", x=0.25, y=0.75)  # radius 0.08 of the width
    [mask] = latent_object_masks([Scene("night", (star,))], 16)  # the night's own stars: background
    rows, cols = torch.nonzero(mask[0], as_tuple=True)
    assert mask.shape == (1, 16, 16) and 8 <= int(mask.sum()) <= 16
    # latent pixels centred within 0.08 + 1/16 of (0.25, 0.75): columns and rows 2..5 and 10..13
    assert (cols.min(), cols.max(), rows.min(), rows.max()) == (2, 5, 10, 13)


def test_learning_rate_warms_up_then_follows_its_schedule(tmp_path: Path):
    from sfumato.train.common import learning_rate

    recipe = {"lr": 1e-3, "warmup_steps": 10, "steps": 110}
    assert learning_rate(recipe, 0) == pytest.approx(1e-4) and learning_rate(recipe, 9) == pytest.approx(1e-3)
    assert learning_rate(recipe, 100) == 1e-3  # constant by default
    cosine = {**recipe, "lr_schedule": "cosine", "lr_final": 0.1}
    assert learning_rate(cosine, 10) == pytest.approx(1e-3)
    assert learning_rate(cosine, 60) == pytest.approx(0.55e-3)  # half-way: the mean of lr and lr_final
    assert learning_rate(cosine, 110) == learning_rate(cosine, 500) == pytest.approx(1e-4)
    bad = tmp_path / "bad.toml"
    bad.write_text('base = "tiny_unet"\nlr_schedule = "linear"\n')
    with pytest.raises(SfumatoError, match="lr_schedule must be one of constant, cosine"):
        load_recipe(str(bad), gpu=False)


def test_object_weights_pick_out_the_objects_of_a_scene():
    from sfumato.train.data import pixels_to_model
    from sfumato.train.vae import object_weights, row_backgrounds

    pixels = np.zeros((1, 32, 32, 3), np.uint8)
    pixels[:, :16] = (40, 90, 200)  # a two-tone background, like a field under a sky
    pixels[:, 8:12, 8:12] = 255  # one small square
    images, background = pixels_to_model(torch.from_numpy(pixels)), torch.from_numpy(row_backgrounds(pixels))
    weights = object_weights(images, 10.0, background)
    assert weights[0, 0, 10, 10] == weights[0, 0, 7, 7] == 11  # on it, and on its 2-px margin
    assert weights[0, 0, 25, 25] == weights[0, 0, 10, 20] == weights[0, 0, 2, 2] == 1  # sky, field, same rows
    # a crop's rows keep the whole image's backgrounds even when the object fills them
    crop = object_weights(images[:, :, 8:12, 6:14], 10.0, background[:, 8:12])
    assert crop[0, 0, 1, 3] == 11 and crop[0, 0, 1, 0] == 11  # the square, and the 2 px beside it
    assert torch.equal(object_weights(images, 0.0, None), torch.ones(1, 1, 32, 32))


def test_latent_noise_perturbs_the_decoders_input_in_scaled_units():
    from sfumato.train.vae import VAEWithPosterior, build_vae

    vae = build_vae(load_recipe("tiny_vae", gpu=False)["model"]).eval()
    vae.register_to_config(scaling_factor=0.5)
    decoded = []  # what decode() is given: the latent itself
    vae.post_quant_conv.register_forward_pre_hook(lambda module, args: decoded.append(args[0].clone()))
    images = torch.rand(8, 3, 32, 32) * 2 - 1
    for latent_noise in (0.0, 0.0, 1.0):
        with torch.no_grad():
            VAEWithPosterior(vae, latent_noise)(images, torch.Generator().manual_seed(0))
    exact, again, noisy = decoded
    assert torch.equal(exact, again)
    # std U(0, 1) in scaled units is U(0, 2) in the VAE's own (scaling_factor 0.5), drawn per image
    stds = (noisy - exact).flatten(1).std(1)
    assert float(stds.max()) < 2.3 and len({round(float(s), 3) for s in stds}) == 8
    assert float(stds.max()) > 1.0  # not a fixed small std: the seeded draws reach past half the range


def test_latent_noise_with_a_training_encoder_is_relative_to_the_latents_std():
    from sfumato.train.vae import VAEWithPosterior, build_vae

    vae = build_vae(load_recipe("tiny_vae", gpu=False)["model"]).eval()
    decoded = []
    vae.post_quant_conv.register_forward_pre_hook(lambda module, args: decoded.append(args[0].clone()))
    images = torch.rand(8, 3, 32, 32) * 2 - 1
    ratios = []
    for gain in (1.0, 10.0):  # an encoder that inflates its latents gets proportionally more noise
        with torch.no_grad():
            vae.quant_conv.weight.mul_(gain)
            vae.quant_conv.bias.mul_(gain)
            VAEWithPosterior(vae, 0.0)(images, torch.Generator().manual_seed(0))
            VAEWithPosterior(vae, 1.0, relative=True)(images, torch.Generator().manual_seed(0))
        exact, noisy = decoded[-2:]
        ratios.append(float((noisy - exact).std() / exact.std()))
    assert 0.2 < ratios[0] < 1.0 and abs(ratios[1] - ratios[0]) < 0.05 * ratios[0]


def test_unknown_recipe_is_a_user_error():
    with pytest.raises(SfumatoError, match="no training recipe"):
        load_recipe("no-such-recipe", gpu=False)


def test_resume_without_a_checkpoint_is_a_user_error(tmp_path: Path):
    message = user_error(["vae", "--config", "tiny_vae", "--out", str(tmp_path), "--device", "cpu", "--resume"])
    assert "--resume" in message


def saved_tensors(folder: Path, stage: str, *, assembled: bool) -> dict[str, torch.Tensor]:
    """The tensors of `stage` in a model folder, named as in the stage's checkpoint, in fp32.
    An assembled clip/ lacks the text tower (that is text_encoder/); a stage's clip/ is the whole CLIP."""
    from safetensors.torch import load_file

    if stage == "clip":
        files = [folder / "clip" / "model.safetensors"]
        files += [folder / "text_encoder" / "model.safetensors"] if assembled else []
    else:
        files = [folder / stage / "diffusion_pytorch_model.safetensors"]
    prefix = {"vae": "vae.", "unet": "unet."}.get(stage, "")  # the VAE and UNet train inside wrapper modules
    return {prefix + k: v.float() for file in files for k, v in load_file(file).items()}


def clip_text_tensors(runs: Path) -> dict[str, torch.Tensor]:
    """The CLIP stage's text tower, named as in a UNet stage's checkpoint."""
    from safetensors.torch import load_file

    return {"text_encoder." + k: v for k, v in load_file(runs / "clip_full" / "text_encoder" / "model.safetensors").items()}


@pytest.mark.parametrize("stage", ["vae", "clip", "unet"])
def test_init_from_starts_from_the_assembled_weights_and_trains_on(assembled: Path, stage: str):
    out = assembled.parent / f"{stage}_continued"
    run_stage(stage, out, "--steps", "0", "--init-from", str(assembled))
    start, expected = checkpoint(out), saved_tensors(assembled, stage, assembled=True)
    assert start["step"] == 0 and start["losses"] == []
    if stage == "unet":  # beside it, its frozen text encoder, from --clip
        text = {k: v for k, v in start["model"].items() if k.startswith("text_encoder.")}
        assert text and all(torch.equal(v, clip_text_tensors(assembled.parent)[k]) for k, v in text.items())
        start["model"] = {k: v for k, v in start["model"].items() if k not in text}
    assert set(start["model"]) == set(expected)
    for key, value in expected.items():
        assert start["model"][key].dtype == torch.float32
        assert torch.equal(start["model"][key], value), key
    shipped = saved_tensors(out, stage, assembled=False)  # the stage ships its EMA weights
    assert set(shipped) == set(expected)
    assert all(torch.equal(shipped[k], v) for k, v in expected.items())  # the EMA starts at them too
    assert json.loads((out / "metrics.json").read_text())["init_from"] == str(assembled)

    run_stage(stage, out, "--steps", "2", "--resume")  # a session later: on from that checkpoint
    state = checkpoint(out)
    assert state["step"] == 2 and len(state["losses"]) == 2
    assert all(torch.isfinite(torch.tensor(state["losses"])))
    assert any(not torch.equal(state["model"][k], v) for k, v in expected.items())


def test_init_from_another_architecture_is_a_user_error(assembled: Path, tmp_path: Path):
    recipe = (Path(__file__).parents[1] / "src/sfumato/configs/train/tiny_vae.toml").read_text()
    assert "norm_num_groups = 4" in recipe
    (tmp_path / "other.toml").write_text(recipe.replace("norm_num_groups = 4", "norm_num_groups = 2"))
    message = user_error(["vae", "--config", str(tmp_path / "other.toml"), "--out", str(tmp_path / "out"),
                          "--device", "cpu", "--init-from", str(assembled)])
    assert "norm_num_groups is 4 there, 2 in the recipe" in message


def test_a_unet_grown_by_attention_blocks_starts_as_the_smaller_one():
    from sfumato.train.assemble import grow_into
    from sfumato.train.unet import build_unet

    small_arch = load_recipe("tiny_unet", gpu=False)["model"]
    big_arch = {**small_arch, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]}
    torch.manual_seed(0)
    small, big = build_unet(small_arch, 32, 8).eval(), build_unet(big_arch, 32, 8).eval()
    new_keys = set(big.state_dict()) - set(small.state_dict())
    assert new_keys and all(".attentions." in k for k in new_keys)
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    grow_into(big, small.state_dict(), "small")
    with torch.no_grad():
        torch.testing.assert_close(big(x, 500, text).sample, small(x, 500, text).sample, rtol=0, atol=1e-6)
    assert big.down_blocks[0].attentions[0].proj_in.weight.abs().sum() > 0  # only proj_out starts at zero
    with pytest.raises(SfumatoError, match="does not fit inside this architecture"):
        grow_into(small, big.state_dict(), "big")


def test_a_grown_recipe_continues_an_assembled_unet(assembled: Path, tmp_path: Path):
    grown = tmp_path / "grown.toml"
    grown.write_text('base = "tiny_unet"\ninit_grows = true\n'
                     '[model]\ndown_block_types = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]\n')
    out = assembled.parent / "unet_grown"
    run_stage("unet", out, "--config", str(grown), "--steps", "0", "--init-from", str(assembled))
    start, saved = checkpoint(out)["model"], saved_tensors(assembled, "unet", assembled=True)
    assert all(torch.equal(start[k], v) for k, v in saved.items())
    new = [k for k in start if k not in saved and not k.startswith("text_encoder.")]
    assert any(k.startswith("unet.down_blocks.0.attentions.0.") for k in new)  # and the up path's mirror
    assert all(".attentions." in k for k in new)
    assert not start["unet.down_blocks.0.attentions.0.proj_out.weight"].any()


def test_init_from_and_resume_together_is_a_user_error(assembled: Path, tmp_path: Path):
    message = user_error(["vae", "--config", "tiny_vae", "--out", str(tmp_path), "--device", "cpu",
                          "--resume", "--init-from", str(assembled)])
    assert "exclude each other" in message


def test_model_card_says_which_stages_continued_earlier_weights():
    from sfumato.train.assemble import model_card

    summary = {"params": {"unet": 3, "vae": 2, "text_encoder": 1, "clip_vision_and_projections": 1},
               "shipped_params": 6, "megabytes": 0.1, "fp16": {}, "fp16_relative_error": {},
               "vae_scaling_factor": 0.25}
    card = model_card(summary, {"vae": {"init_from": "old/builtin"}, "clip": {}, "unet": {}}, "")
    assert "The vae stage continued the weights of old/builtin" in card
    assert "scaling_factor 0.2500" in card  # from the VAE's config, even where its run left no metrics
    assert "clip stage continued" not in card and "unet stage continued" not in card


def test_decoder_only_vae_keeps_the_encoder_and_its_latent_scale(assembled: Path, tmp_path: Path):
    recipe = (Path(__file__).parents[1] / "src/sfumato/configs/train/tiny_vae.toml").read_text()
    config = tmp_path / "decoder.toml"
    config.write_text("train_encoder = false\n" + recipe)
    out = tmp_path / "decoder"
    args = ["vae", "--config", str(config), "--out", str(out), "--device", "cpu"]
    assert "needs --init-from" in user_error([*args, "--steps", "1"])
    for extra in (["--steps", "2", "--init-from", str(assembled)], ["--steps", "3", "--resume"]):
        result = CliRunner().invoke(train, [*args, *extra], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        before, after = saved_tensors(assembled, "vae", assembled=True), saved_tensors(out, "vae", assembled=False)
        kept = [k for k in before if k.startswith(("vae.encoder.", "vae.quant_conv."))]
        assert kept and all(torch.equal(before[k], after[k]) for k in kept)
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("vae.decoder."))
        scale = json.loads((out / "vae" / "config.json").read_text())["scaling_factor"]
        assert scale == json.loads((assembled / "vae" / "config.json").read_text())["scaling_factor"]


def test_offset_noise_makes_each_images_channel_means_unreliable():
    # The seed must not pick the background: with the offset, the per-channel mean of the
    # training noise varies as much as a background colour's shift would.
    from sfumato.train.common import offset_noise

    shape = torch.Size((256, 4, 16, 16))
    plain = offset_noise(shape, 0.0, torch.Generator().manual_seed(0), torch.device("cpu"))
    offset = offset_noise(shape, 0.2, torch.Generator().manual_seed(0), torch.device("cpu"))
    plain_mean_std = plain.mean(dim=(2, 3)).std().item()
    offset_mean_std = offset.mean(dim=(2, 3)).std().item()
    assert plain_mean_std == pytest.approx(1 / 16, rel=0.1)
    assert offset_mean_std == pytest.approx((0.2**2 + 1 / 256) ** 0.5, rel=0.1)
    assert torch.equal(plain, torch.randn(shape, generator=torch.Generator().manual_seed(0)))


def test_clip_trains_with_hard_negatives(tmp_path):
    recipe = tmp_path / "hard.toml"
    recipe.write_text('base = "tiny_clip"\nhard_negatives = true\n')
    result = CliRunner().invoke(train, ["clip", "--config", str(recipe), "--out", str(tmp_path / "run"),
                                        "--device", "cpu", "--steps", "2"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert np.isfinite(metrics["final_loss"]) and 0 <= metrics["shape_swap_choice_train"] <= 1


def test_a_pool_on_the_grid_is_the_same_pool_snapped_by_workers_or_not():
    from sfumato.train.data import SceneMix, render_pool
    from sfumato.world import render
    from sfumato.world.scenes import snap_to_grid

    plain_images, plain = render_pool(5, 1024, "train", 16, workers=1)
    images, scenes = render_pool(5, 1024, "train", 16, workers=1, mix=SceneMix(grid=16))
    assert scenes == [snap_to_grid(s, 16) for s in plain]
    assert (images[3] == render(scenes[3], 16)).all() and not (images == plain_images).all()
    _, by_workers = render_pool(5, 1024, "train", 16, workers=2, mix=SceneMix(grid=16))
    assert by_workers == scenes


def test_a_pool_with_a_simple_share_holds_about_that_share_of_simple_scenes():
    from sfumato.train.data import SceneMix, render_pool
    from sfumato.world.scenes import is_simple

    images, scenes = render_pool(5, 1024, "train", 16, workers=1, mix=SceneMix(simple_share=0.5))
    assert 0.45 < np.mean([is_simple(s) for s in scenes]) < 0.6  # ~0.5, plus the usual mix's few simple ones
    _, by_workers = render_pool(5, 1024, "train", 16, workers=2, mix=SceneMix(simple_share=0.5))
    assert by_workers == scenes
    _, usual = render_pool(5, 1024, "train", 16, workers=1)
    assert np.mean([is_simple(s) for s in usual]) < 0.05
    _, white = render_pool(5, 64, "train", 16, workers=1, mix=SceneMix(simple_share=1.0, simple_backgrounds=("white",)))
    assert all(is_simple(s) and s.background == "white" for s in white)
    assert len({s.objects[0].shape for s in white}) == 8 and len({s.objects[0].color for s in white}) >= 8


def test_plain_captions_name_every_detail_the_same_way_each_time():
    from sfumato.train.data import random_captions
    from sfumato.world import sample_scenes
    from sfumato.world.scenes import ObjectSpec, Scene

    star = Scene("white", (ObjectSpec("star", "red", "large", 0.5, 0.5),))
    assert random_captions([star], 0, 1, style="plain") == ["a large red star on a white background"]
    scenes = sample_scenes(3, 20)
    assert random_captions(scenes, 0, 1, style="plain") == random_captions(scenes, 0, 2, style="plain")
    assert random_captions(scenes, 0, 1) != random_captions(scenes, 0, 2)  # the world's: new words each time
    with pytest.raises(SfumatoError, match="caption style 'fancy'.*allowed: world, plain"):
        random_captions([star], 0, style="fancy")


def test_a_text_encoder_tuned_with_the_unet_is_saved_and_shipped(full_runs: Path, assembled: Path, tmp_path: Path):
    from safetensors.torch import load_file

    recipe = tmp_path / "tuned.toml"
    recipe.write_text('base = "tiny_unet"\ntext_encoder_lr = 5e-4\n')
    out = full_runs / "unet_tuned"
    run_stage("unet", out, "--config", str(recipe), "--steps", "3")
    state = checkpoint(out)
    assert sorted(g["lr_scale"] for g in state["optimizer"]["param_groups"]) == [0.5, 1.0]  # 5e-4 / 1e-3
    frozen = clip_text_tensors(full_runs)
    tuned = {"text_encoder." + k: v for k, v in load_file(out / "text_encoder" / "model.safetensors").items()}
    assert set(tuned) == set(frozen)
    assert any(not torch.equal(tuned[k], v) for k, v in frozen.items())  # the diffusion loss moved it
    assert json.loads((out / "metrics.json").read_text())["text_encoder_tuned"] is True

    model = tmp_path / "model"  # from an assembled folder's CLIP, whose clip/ lacks the text tower
    result = CliRunner().invoke(train, ["assemble", "--vae", str(full_runs / "vae_full"), "--clip",
                                        str(full_runs / "builtin"), "--unet", str(out), "--out", str(model)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    shipped = {"text_encoder." + k.removeprefix("text_model."): v.float()  # SD's key layout there
               for k, v in load_file(model / "text_encoder" / "model.safetensors").items()}
    assert all(torch.equal(shipped[k], v.half().float()) for k, v in tuned.items())
    # clip/ keeps the CLIP's own text tower, the one its vision tower was trained against
    score_text = {k: v for k, v in load_file(model / "clip" / "model.safetensors").items() if k.startswith("text_model.")}
    assert all(torch.equal(v.float(), frozen["text_encoder." + k.removeprefix("text_model.")].half().float())
               for k, v in score_text.items())
    assert score_text and "then tuned with the UNet" in (model / "MODEL_CARD.md").read_text()

    again = tmp_path / "again"  # an assembled folder as --unet: its text encoder is the tuned one, not the CLIP's
    for unet, tuned_text in ((model, True), (full_runs / "builtin", False)):
        result = CliRunner().invoke(train, ["assemble", "--vae", str(full_runs / "vae_full"), "--clip",
                                            str(full_runs / "builtin"), "--unet", str(unet), "--out", str(again)],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        text = load_file(again / "text_encoder" / "model.safetensors")
        assert all(torch.equal(v, load_file(unet / "text_encoder" / "model.safetensors")[k]) for k, v in text.items())
        has_text = any(k.startswith("text_model.") for k in load_file(again / "clip" / "model.safetensors"))
        assert has_text == tuned_text == ("then tuned with the UNet" in (again / "MODEL_CARD.md").read_text())


def test_a_clip_locked_to_a_tuned_text_encoder_learns_only_its_vision_side(full_runs: Path, tmp_path: Path):
    from safetensors.torch import load_file

    recipe = tmp_path / "tuned.toml"
    recipe.write_text('base = "tiny_unet"\ntext_encoder_lr = 5e-4\n')
    unet = full_runs / "unet_for_locked_clip"  # beside the VAE and CLIP runs it trains on
    run_stage("unet", unet, "--config", str(recipe), "--steps", "2")
    locked = tmp_path / "clip_locked"
    run_stage("clip", locked, "--init-from", str(full_runs / "clip_full"), "--lock-text", str(unet), "--steps", "3")
    tuned = load_file(unet / "text_encoder" / "model.safetensors")
    assert all(torch.equal(v, tuned[k]) for k, v in load_file(locked / "text_encoder" / "model.safetensors").items())
    before, after = (load_file(f / "clip" / "model.safetensors") for f in (full_runs / "clip_full", locked))
    assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith("vision_model."))
    assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith("text_projection"))
    assert json.loads((locked / "metrics.json").read_text())["text_locked_to"] == str(unet)

    # assembled on that CLIP, the model needs no second text tower: clip/ is vision + projections
    model = tmp_path / "model"
    result = CliRunner().invoke(train, ["assemble", "--vae", str(full_runs / "vae_full"), "--clip", str(locked),
                                        "--unet", str(unet), "--out", str(model)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert not any(k.startswith("text_model.") for k in load_file(model / "clip" / "model.safetensors"))
    card = (model / "MODEL_CARD.md").read_text()
    assert "then tuned with the UNet" in card and "trained again against the tuned text encoder" in card
    assert "holds no text_encoder" in user_error(["clip", "--config", "tiny_clip", "--out",
                                                           str(tmp_path / "bad"), "--lock-text",
                                                           str(full_runs / "vae_full")])


def test_a_text_encoder_learning_rate_sets_its_own_parameter_group(tmp_path: Path):
    from sfumato.train.common import make_trainable, start_run

    run = start_run("tiny_unet", tmp_path, resume=False, max_minutes=None, overrides={}, device="cpu")
    module = torch.nn.ModuleDict({"unet": torch.nn.Linear(2, 2), "text_encoder": torch.nn.Linear(2, 3)})
    module["text_encoder"].requires_grad_(True)
    groups = make_trainable(run, module, {"text_encoder": 0.25}).optimizer.param_groups
    sizes = {g["lr_scale"]: sum(p.numel() for p in g["params"]) for g in groups}
    assert sizes == {1.0: 6, 0.25: 9}


def test_cached_caption_states_are_the_text_encoders_states_of_varied_captions(full_runs: Path):
    from transformers import CLIPTextModel

    from sfumato.train.data import load_tokenizer, random_captions
    from sfumato.train.unet import CACHE_KEY, caption_states, text_hidden
    from sfumato.world import sample_scenes

    text_encoder = CLIPTextModel.from_pretrained(full_runs / "clip_full" / "text_encoder").eval()
    tokenizer, scenes = load_tokenizer(), sample_scenes(0, 3)
    states = caption_states(text_encoder, tokenizer, scenes, 5, 2, torch.device("cpu"), batch=4)
    assert states.shape == (3 * 2 + 1, 77, text_encoder.config.hidden_size) and states.dtype == torch.float16
    for k in range(2):
        expected = text_hidden(text_encoder, tokenizer, random_captions(scenes, 5, CACHE_KEY, k), torch.device("cpu"))
        torch.testing.assert_close(states[k:-1:2].float(), expected, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(states[-1].float(), text_hidden(text_encoder, tokenizer, [""], torch.device("cpu"))[0],
                               rtol=2e-3, atol=2e-3)
    assert not torch.equal(states[0], states[1])  # a scene's two captions are worded differently


def test_a_run_on_cached_caption_states_resumes_exactly_and_needs_a_frozen_text_encoder(full_runs: Path,
                                                                                        tmp_path: Path):
    recipe = tmp_path / "cached.toml"
    recipe.write_text('base = "tiny_unet"\ncaption_cache = 2\n')
    full, resumed = full_runs / "unet_cached", full_runs / "unet_cached_resumed"
    run_stage("unet", full, "--config", str(recipe), "--steps", "3")
    run_stage("unet", resumed, "--config", str(recipe), "--steps", "2")
    run_stage("unet", resumed, "--config", str(recipe), "--steps", "3", "--resume")
    assert checkpoint(resumed)["losses"] == checkpoint(full)["losses"]
    assert checkpoint(full)["losses"] != checkpoint(full_runs / "unet_full")["losses"][:3]  # other captions' states
    recipe.write_text('base = "tiny_unet"\ncaption_cache = 2\ntext_encoder_lr = 1e-4\n')
    message = user_error(["unet", "--config", str(recipe), "--out", str(tmp_path / "bad"), "--device", "cpu",
                          "--vae", str(full_runs / "vae_full"), "--clip", str(full_runs / "clip_full")])
    assert "caption_cache" in message and "frozen" in message


def test_a_pool_with_a_pair_share_names_relations_more_often_and_keeps_other_scenes_as_they_were():
    from sfumato.train.data import SceneMix, render_pool
    from sfumato.world.captions import describe_scene

    def relation_share(scenes: list) -> float:
        return np.mean([bool(describe_scene(s, random.Random(i)).relations) for i, s in enumerate(scenes)])

    _, usual = render_pool(5, 512, "train", 16, workers=1)
    _, pairs = render_pool(5, 512, "train", 16, workers=1, mix=SceneMix(pair_share=0.6))
    assert relation_share(pairs) > relation_share(usual) + 0.2
    assert 0.5 < np.mean([len(s.objects) == 2 for s in pairs]) < 0.85  # 0.6 plus the usual mix's pairs
    _, by_workers = render_pool(5, 1024, "train", 16, workers=2, mix=SceneMix(pair_share=0.6))
    assert by_workers[:512] == pairs
    for share in (-0.1, 1.5):
        with pytest.raises(SfumatoError, match=r"pair_share is .*; allowed: a share of the scenes, from 0 to 1"):
            SceneMix.of_recipe({"pair_share": share})


def test_a_pool_of_simple_pairs_holds_only_lined_up_pairs_and_other_counts_are_refused():
    from sfumato.train.data import SceneMix, random_captions, render_pool

    mix = SceneMix.of_recipe({"simple_share": 1.0, "simple_objects": 2})
    _, pairs = render_pool(7, 64, "train", 16, workers=1, mix=mix)
    assert all(len(s.objects) == 2 and {o.size for o in s.objects} == {"large"} for s in pairs)
    words = ("left of", "right of", "above", "below")
    assert all(sum(w in c for w in words) == 1 for c in random_captions(pairs, 0, 1, style="plain"))
    _, singles = render_pool(7, 64, "train", 16, workers=1, mix=SceneMix(simple_share=1.0))
    assert all(len(s.objects) == 1 for s in singles)
    with pytest.raises(SfumatoError, match="simple_objects is 3; allowed: 1 .* or 2"):
        SceneMix.of_recipe({"simple_objects": 3})


def test_timesteps_weighted_to_high_noise_keep_that_share_above_the_floor_and_none_keeps_the_old_stream():
    from sfumato.train.unet import high_noise_of_recipe, sample_timesteps

    usual = sample_timesteps(4000, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(usual, torch.randint(0, 1000, (4000,), generator=torch.Generator().manual_seed(0)))
    high = sample_timesteps(4000, torch.Generator().manual_seed(0), "cpu", 0.5, 600)
    assert high.min() >= 0 and high.max() <= 999
    assert abs((high >= 600).float().mean().item() - (0.5 + 0.5 * 0.4)) < 0.04
    assert high_noise_of_recipe({}) == (0.0, 500) and high_noise_of_recipe({"high_noise_share": 0.3}) == (0.3, 500)
    for recipe, wrong in (({"high_noise_share": 2}, "is 2; allowed: a share"), ({"high_noise_from": 1000}, "0 to 999"),
                          ({"high_noise_from": 0.5}, "an integer")):
        with pytest.raises(SfumatoError, match=wrong):
            high_noise_of_recipe(recipe)


def test_relation_swaps_pair_captions_with_their_opposites_and_the_hinge_stops_at_the_margin():
    from transformers import CLIPTextConfig, CLIPTextModel

    from sfumato.train.data import load_tokenizer, tokenize
    from sfumato.train.unet import relation_separation_loss, relation_swapped

    captions = ["a red star left of a blue circle", "", "a ring above a square on white", "two stars next to a cross"]
    kept, swapped = relation_swapped(captions)
    assert kept == [0, 2] and swapped == ["a red star right of a blue circle", "a ring below a square on white"]
    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, max_position_embeddings=77))
    tokenizer = load_tokenizer()
    ids, other = tokenize(tokenizer, [captions[i] for i in kept]), tokenize(tokenizer, swapped)
    right, wrong = (encoder(i).last_hidden_state for i in (ids, other))
    loss = relation_separation_loss(right, wrong, 10.0)  # far beyond any difference: the hinge pulls
    loss.backward()
    assert 0 < loss.item() < 10 and encoder.get_input_embeddings().weight.grad.abs().sum() > 0
    assert relation_separation_loss(right, wrong, 1e-6).item() == 0  # apart already: no pull
    assert relation_separation_loss(right, right, 0.2).item() == pytest.approx(0.2)  # the same: the margin


def test_a_run_on_plain_captions_of_white_scenes_trains_and_a_bad_style_is_refused(full_runs: Path, tmp_path: Path):
    recipe = tmp_path / "white.toml"
    white = '[data]\nsimple_share = 1.0\nsimple_backgrounds = ["white"]\n'
    recipe.write_text(f'base = "tiny_unet"\ncaption_cache = 1\n{white}captions = "plain"\n')
    out = full_runs / "unet_white"
    run_stage("unet", out, "--config", str(recipe), "--steps", "2")
    assert len(checkpoint(out)["losses"]) == 2 and (out / "unet" / "config.json").exists()
    recipe.write_text('base = "tiny_unet"\ntext_encoder_lr = 1e-4\nrelation_margin = 0.2\nhigh_noise_share = 0.5\n'
                      '[data]\npair_share = 0.5\n')
    run_stage("unet", full_runs / "unet_pairs", "--config", str(recipe), "--steps", "2")
    assert len(checkpoint(full_runs / "unet_pairs")["losses"]) == 2
    recipe.write_text('base = "tiny_unet"\ncaption_cache = 1\nrelation_margin = 0.2\n')
    message = user_error(["unet", "--config", str(recipe), "--out", str(tmp_path / "bad"), "--device", "cpu",
                          "--vae", str(full_runs / "vae_full"), "--clip", str(full_runs / "clip_full")])
    assert "relation_margin needs a tuned text encoder" in message
    for data, wrong in (('captions = "fancy"', "caption style 'fancy'"),
                        ('simple_share = 1.0\nsimple_backgrounds = ["sky"]', "not sky"),
                        ('pair_share = 2', "from 0 to 1")):
        recipe.write_text(f'base = "tiny_unet"\n[data]\n{data}\n')
        message = user_error(["unet", "--config", str(recipe), "--out", str(tmp_path / "bad"), "--device", "cpu",
                              "--vae", str(full_runs / "vae_full"), "--clip", str(full_runs / "clip_full")])
        assert wrong in message and "allowed" in message


def test_a_vae_recipe_may_train_on_every_concept_and_still_reports_on_the_training_split(tmp_path: Path, monkeypatch):
    import sfumato.train.vae as vae_stage

    splits = []

    def recording_pool(seed, n, split, size, *args, **kwargs):
        splits.append(split)
        return original(seed, n, split, size, *args, **kwargs)

    original = vae_stage.render_pool
    monkeypatch.setattr(vae_stage, "render_pool", recording_pool)
    (tmp_path / "codec.toml").write_text('base = "tiny_vae"\n[data]\nsplit = "eval"\n')
    run_stage("vae", tmp_path / "out", "--config", str(tmp_path / "codec.toml"), "--steps", "1")
    assert splits == ["eval", "train"]  # trained on everything, PSNR on the training split's scenes
    splits.clear()
    (tmp_path / "mixed.toml").write_text('base = "tiny_vae"\n[data]\nsplit = ["train", "concept"]\n')
    run_stage("vae", tmp_path / "mixed", "--config", str(tmp_path / "mixed.toml"), "--steps", "1")
    assert splits == ["train", "concept", "train"]  # half of each, then the evaluation pool
    (tmp_path / "bad.toml").write_text('base = "tiny_vae"\n[data]\nsplit = "everything"\n')
    message = user_error(["vae", "--config", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "bad"),
                          "--device", "cpu"])
    assert "split = 'everything'" in message and "eval" in message


def test_an_anchored_vae_keeps_the_latents_the_unet_knows(assembled: Path, tmp_path: Path):
    from types import SimpleNamespace

    from sfumato.train.vae import anchor_encoder, latent_drift

    recipe = tmp_path / "anchored.toml"
    recipe.write_text('base = "tiny_vae"\n[data]\nsplit = "eval"\n[loss]\nanchor = 100.0\n')
    run_stage("vae", tmp_path / "out", "--config", str(recipe), "--steps", "3", "--init-from", str(assembled))
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    start = json.loads((assembled / "vae" / "config.json").read_text())["scaling_factor"]
    assert metrics["scaling_factor"] == start  # the latent space is kept, not re-measured
    assert 0 < metrics["anchored_latent_drift_rms"] < 0.5  # the encoder trained, held near where it began

    model = load_recipe("tiny_vae", gpu=False)["model"]
    run = SimpleNamespace(init_from=assembled, out=tmp_path, device=torch.device("cpu"))
    moments = anchor_encoder(run, model)(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert torch.equal(latent_drift(moments[:, :4], moments, 2.0), torch.zeros(2))
    assert latent_drift(moments[:, :4] + 0.5, moments, 2.0).allclose(torch.ones(2))  # (0.5 x 2)^2


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).parents[1] / "src/sfumato/configs/train").glob(
    "unet*.toml")))
def test_every_shipped_unet_recipe_loads_and_its_data_and_timesteps_are_valid(name: str):
    from sfumato.train.data import SceneMix
    from sfumato.train.unet import high_noise_of_recipe

    recipe = load_recipe(name, gpu=False)
    SceneMix.of_recipe(recipe["data"])
    share, start = high_noise_of_recipe(recipe)
    assert 0 <= share <= 1 and 0 <= start < 1000 and recipe["steps"] > 0
    assert not recipe.get("relation_margin") or recipe.get("text_encoder_lr", 0) > 0
