"""Checkpoint loading and export: tiny diffusers folders, the real SD architectures' key layouts
(at zero-memory weights), and every kind of bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sfumato import checkpoints, convert
from sfumato.checkpoints import (
    CONFIGS,
    Weights,
    build_components,
    describe,
    detect_family,
    load_model,
)
from sfumato.errors import CheckpointError

# ---------------------------------------------------------------- a tiny SD1-shaped model


def make_tiny_folder(folder: Path) -> Path:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=32,
        attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).save_pretrained(folder / "unet")
    AutoencoderKL(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
    ).save_pretrained(folder / "vae")
    CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                 num_hidden_layers=2, vocab_size=49408, projection_dim=32)
                  ).save_pretrained(folder / "text_encoder")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
                  ).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_model(tiny):
    return load_model(tiny)


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exported") / "tiny.safetensors"
    checkpoints.export_single_file(tiny, out)
    return out


def state_dicts(model) -> dict[str, dict[str, torch.Tensor]]:
    return component_states(model.unet, model.vae, model.text_encoders)


def component_states(unet, vae, encoders) -> dict[str, dict[str, torch.Tensor]]:
    parts = {"unet": unet, "vae": vae, **{f"text_encoder{i}": e for i, e in enumerate(encoders)}}
    return {name: module.state_dict() for name, module in parts.items()}


def test_tiny_folder_loads(tiny, tiny_model):
    from diffusers import DDPMScheduler

    m = tiny_model
    assert (m.family, m.prediction_type, m.name) == ("sd1", "epsilon", tiny.name)
    assert m.default_size == 16 * 2  # sample_size times the 2x VAE
    assert len(m.text_encoders) == len(m.tokenizers) == 1
    assert m.tokenizers[0].pad_token == "<|endoftext|>"
    unet_file = tiny / "unet" / "diffusion_pytorch_model.safetensors"
    assert m.hash == hashlib.sha256(unet_file.read_bytes()).hexdigest()[:10]
    reference = DDPMScheduler.from_pretrained(tiny / "scheduler").alphas_cumprod
    assert m.alphas_cumprod.dtype == torch.float64 and m.alphas_cumprod.shape == (1000,)
    torch.testing.assert_close(m.alphas_cumprod.float(), reference, rtol=1e-5, atol=1e-6)
    assert not m.unet.training and next(m.unet.parameters()).dtype == torch.float32


def test_describe_names_a_zero_terminal_snr_schedule(tiny, tmp_path):
    import shutil

    assert "noise_schedule" not in describe(tiny)
    folder = shutil.copytree(tiny, tmp_path / "zsnr")
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}))
    single = tmp_path / "zsnr.safetensors"
    convert.export_single_file(folder, single)  # the scheduler config rides in the file's metadata
    for path in (folder, single):
        facts = describe(path)
        assert facts["prediction_type"] == "v_prediction"
        assert facts["noise_schedule"].startswith("zero terminal SNR")


def test_zero_terminal_snr_schedule_matches_diffusers_but_keeps_sigma_max_finite():
    from diffusers import DDPMScheduler

    config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
              "rescale_betas_zero_snr": True}
    ours = checkpoints.alphas_cumprod(config)
    reference = DDPMScheduler(**config).alphas_cumprod  # ends at exactly 0: sigma_max = infinity
    assert reference[-1] == 0
    torch.testing.assert_close(ours[:-1].float(), reference[:-1], rtol=1e-5, atol=1e-6)
    assert ours[-1] == checkpoints.ZERO_SNR_LAST_ALPHA_BAR  # sigma_max ~ 4519, as A1111
    assert not torch.allclose(ours, checkpoints.alphas_cumprod({**config, "rescale_betas_zero_snr": False}))


def test_export_and_reload_reproduces_every_tensor(tiny_model, exported):
    out = exported
    with safe_open(str(out), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        attn_q = f.get_slice("first_stage_model.decoder.mid.attn_1.q.weight").get_shape()
    # SD's original layout, as the other tools and diffusers' converter know it
    assert detect_family(keys) == "sd1"
    assert {"model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.bias",
            "model.diffusion_model.middle_block.1.proj_in.weight",
            "cond_stage_model.transformer.text_model.final_layer_norm.weight"} <= keys
    assert len(attn_q) == 4  # 1x1 convs in the original VAE
    assert json.loads(meta["sfumato.configs"])["unet"]["block_out_channels"] == [32, 64]
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # atomic: no temp file left

    again = load_model(out)
    assert (again.family, again.default_size, again.prediction_type) == ("sd1", 32, "epsilon")
    assert again.hash == hashlib.sha256(out.read_bytes()).hexdigest()[:10]
    expected, got = state_dicts(tiny_model), state_dicts(again)
    for part in expected:
        assert got[part].keys() == expected[part].keys(), part
        for key, value in expected[part].items():
            assert torch.equal(got[part][key], value), f"{part}.{key}"


def test_export_half_stores_fp16(tiny, tiny_model, tmp_path):
    out = tmp_path / "half.safetensors"
    checkpoints.export_single_file(tiny, out, half=True)
    with safe_open(str(out), "pt") as f:
        names = f.keys()
        assert {f.get_slice(k).get_dtype() for k in names} == {"F16"}
    again = load_model(out)
    weight = tiny_model.unet.conv_in.weight
    assert torch.equal(again.unet.conv_in.weight, weight.half().float())


def test_an_fp32_file_read_as_fp16_is_kept_converted_in_the_cache(exported, tmp_path, monkeypatch):
    from sfumato import accel

    monkeypatch.setenv("SFUMATO_CACHE", str(tmp_path / "cache"))
    converted_each_time = load_model(exported, dtype=torch.float16)
    first = load_model(exported, dtype=torch.float16, keep_converted=True)
    copy = checkpoints.converted_path(exported, torch.float16)
    with safe_open(str(copy), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # noqa: SIM118
    monkeypatch.setattr(checkpoints, "write_converted", lambda *a: pytest.fail("written again"))
    later = load_model(exported, dtype=torch.float16, keep_converted=True)
    expected = state_dicts(converted_each_time)
    for model in (first, later):
        got = state_dicts(model)
        assert all(torch.equal(got[part][k], v) for part, state in expected.items() for k, v in state.items())
        assert model.hash == converted_each_time.hash  # the checkpoint's own hash, not the copy's
    assert accel.page_out(later.unet) > 0  # views of the copy's memory map
    assert accel.page_out(converted_each_time.unet) == 0  # memory of the process's own


def test_converted_copies_are_few_and_a_damaged_or_unwritable_cache_only_costs_time(
        exported, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SFUMATO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(checkpoints, "CONVERTED_KEPT", 1)
    other = tmp_path / "other.safetensors"
    with safe_open(str(exported), "pt") as f:  # the same weights in another file
        save_file({k: f.get_tensor(k) for k in f.keys()}, str(other), metadata={**f.metadata(), "x": "y"})  # noqa: SIM118
    load_model(exported, dtype=torch.float16, keep_converted=True)
    load_model(other, dtype=torch.float16, keep_converted=True)
    assert list((tmp_path / "cache" / "converted").glob("*")) == [checkpoints.converted_path(other, torch.float16)]
    checkpoints.converted_path(other, torch.float16).write_bytes(b"not a safetensors file")
    reference = state_dicts(load_model(exported, dtype=torch.float16))
    assert state_dicts(load_model(other, dtype=torch.float16, keep_converted=True)).keys() == reference.keys()
    assert not checkpoints.converted_path(other, torch.float16).exists()  # removed: written anew next time
    monkeypatch.setenv("SFUMATO_CACHE", str(other))  # a file where the cache folder should be
    with caplog.at_level("WARNING"):
        model = load_model(exported, dtype=torch.float16, keep_converted=True)
    assert "can't keep a converted copy" in caplog.text
    assert torch.equal(model.unet.conv_in.weight, reference["unet"]["conv_in.weight"])


def test_describe_file_and_folder(tiny, exported):
    out = exported
    facts = describe(out)
    sha = hashlib.sha256(out.read_bytes()).hexdigest()
    assert (facts["family"], facts["sha256"], facts["model_hash"]) == ("sd1", sha, sha[:10])
    assert facts["prediction_type"] == "epsilon" and facts["dtypes"] == "F32"
    assert facts["size_bytes"] == out.stat().st_size
    assert set(facts["components"]) == {"unet", "vae", "text_encoder"}
    assert facts["sfumato"]["sfumato.family"] == "sd1"
    folder = describe(tiny)
    assert folder["format"] == "diffusers folder" and folder["components"] == facts["components"]


def test_vae_override_from_original_layout_file(tiny, tiny_model, tmp_path):
    vae = {k: v + 1 for k, v in tiny_model.vae.state_dict().items()}
    path = tmp_path / "vae.safetensors"  # a VAE alone, in the original layout with no prefix
    save_file({k.removeprefix(convert.VAE): v.contiguous()
               for k, v in convert.vae_to_original(vae, tiny_model.vae.config).items()}, str(path))
    m = load_model(tiny, vae=path)
    for key, value in vae.items():
        assert torch.equal(m.vae.state_dict()[key], value), key


def test_vae_override_from_diffusers_folder(tiny, tiny_model, exported):
    m = load_model(exported, vae=tiny / "vae")
    assert torch.equal(m.vae.decoder.conv_out.weight, tiny_model.vae.decoder.conv_out.weight)


def test_folder_with_pickled_weights(tiny, tmp_path):
    import shutil

    folder = shutil.copytree(tiny, tmp_path / "pickled")
    unet_file = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = {}
    with safe_open(str(unet_file), "pt") as f:
        for key in f.keys():  # noqa: SIM118  (safe_open handles are not iterable)
            state[key] = f.get_tensor(key)
    torch.save(state, folder / "unet" / "diffusion_pytorch_model.bin")
    unet_file.unlink()
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(folder)
    loaded = load_model(folder, allow_pickle=True)
    assert torch.equal(loaded.unet.conv_in.weight, state["conv_in.weight"])


def _half_copy(folder: Path, dest: Path, prefix: str, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """A copy of a saved text encoder with fp16 weights (as the built-in model ships them), its
    keys under `prefix` ("text_model." as transformers 4 and sfumato's trainer save them)."""
    import shutil

    from safetensors.torch import load_file

    dest = Path(shutil.copytree(folder, dest))
    state = {prefix + k.removeprefix("text_model."): v.half()
             for k, v in load_file(dest / "model.safetensors").items()}
    save_file({**state, **(extra or {})}, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@pytest.mark.parametrize("prefix", ["", "text_model."])
def test_saved_text_encoder_is_built_as_from_pretrained_builds_it(tiny, tmp_path, prefix):
    from transformers import CLIPTextModel

    folder = _half_copy(tiny / "text_encoder", tmp_path / "te", prefix)
    direct = checkpoints._saved_text_encoder("CLIPTextModel", folder, "cpu", torch.float32)
    stock = CLIPTextModel.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    assert isinstance(direct, CLIPTextModel) and not direct.training
    ours, theirs = direct.state_dict(), stock.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == torch.float32 for k in ours)
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(direct(ids).last_hidden_state, stock(ids).last_hidden_state)


def test_text_encoder_in_another_layout_is_left_to_from_pretrained(tiny, tmp_path):
    # transformers 4 also saved the position_ids buffer; from_pretrained knows to drop it
    folder = _half_copy(tiny / "text_encoder", tmp_path / "te", "text_model.",
                        {"text_model.embeddings.position_ids": torch.arange(77)[None]})
    assert checkpoints._saved_text_encoder("CLIPTextModel", folder, "cpu", torch.float32) is None
    model = checkpoints._from_pretrained("CLIPTextModel", folder, "cpu", torch.float32, False)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        saved = f.get_tensor("text_model.embeddings.token_embedding.weight")
    assert torch.equal(model.state_dict()["embeddings.token_embedding.weight"], saved.float())


# ---------------------------------------------------------------- the real architectures


def tagged(shape, tag: int) -> torch.Tensor:
    """A full-size tensor that costs 2 bytes: one distinct fp16 bit pattern, broadcast."""
    value = torch.tensor([tag], dtype=torch.int16).view(torch.float16)
    return value.reshape([1] * len(shape)).expand(*shape) if shape else value[0]


def tag_of(t: torch.Tensor) -> tuple:
    first = t[(0,) * t.ndim].view(torch.int16).item()
    last = t[tuple(s - 1 for s in t.shape)].view(torch.int16).item()
    return tuple(t.shape), first, last


def meta_state(kind: str, config: dict) -> dict[str, torch.Tensor]:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    with init_empty_weights():
        if kind == "unet":
            return UNet2DConditionModel.from_config(config).state_dict()
        if kind == "vae":
            return AutoencoderKL.from_config(config).state_dict()
        return checkpoints._text_encoder_class(config)(CLIPTextConfig.from_dict(config)).state_dict()


def open_clip_shapes(config: dict, layers: int) -> dict[str, tuple]:
    """OpenCLIP's own names (open_clip's TextTransformer), written independently of sfumato."""
    d, ff = config["hidden_size"], config["intermediate_size"]
    shapes = {"token_embedding.weight": (49408, d), "positional_embedding": (77, d),
              "ln_final.weight": (d,), "ln_final.bias": (d,), "text_projection": (d, d),
              "logit_scale": ()}
    for i in range(layers):
        block = f"transformer.resblocks.{i}."
        shapes.update({block + "ln_1.weight": (d,), block + "ln_1.bias": (d,),
                       block + "attn.in_proj_weight": (3 * d, d), block + "attn.in_proj_bias": (3 * d,),
                       block + "attn.out_proj.weight": (d, d), block + "attn.out_proj.bias": (d,),
                       block + "ln_2.weight": (d,), block + "ln_2.bias": (d,),
                       block + "mlp.c_fc.weight": (ff, d), block + "mlp.c_fc.bias": (ff,),
                       block + "mlp.c_proj.weight": (d, ff), block + "mlp.c_proj.bias": (d,)})
    return shapes


def original_checkpoint(family: str, folder: str) -> dict[str, torch.Tensor]:
    """Every key of a real SD checkpoint of this family, each a distinct zero-memory tensor."""
    configs = checkpoints._shipped_configs(family, "epsilon")
    shapes = {k: tuple(v.shape) for k, v in {
        **convert.unet_to_original(meta_state("unet", configs["unet"]), configs["unet"]),
        **convert.vae_to_original(meta_state("vae", configs["vae"]), configs["vae"])}.items()}
    for name, prefix in convert.TEXT_ENCODER_PREFIXES[family].items():
        config = configs[name]
        if prefix.endswith(".transformer."):  # OpenAI CLIP-L, stored in transformers' layout
            state = meta_state("clip", config)
            shapes.update({k: tuple(v.shape) for k, v in convert.clip_to_original(state, prefix).items()})
            shapes[prefix + "text_model.embeddings.position_ids"] = (1, 77)
        else:  # the original SD2 file keeps OpenCLIP-H's 24th layer, which diffusers drops
            layers = config["num_hidden_layers"] + (1 if family == "sd2" else 0)
            shapes.update({prefix + k: s for k, s in open_clip_shapes(config, layers).items()})
    tensors = {}
    for i, (key, shape) in enumerate(sorted(shapes.items())):
        if key.endswith("in_proj_weight") or key.endswith("in_proj_bias"):
            rows = torch.tensor([3 * i + 1, 3 * i + 2, 3 * i + 3], dtype=torch.int16)
            rows = rows.repeat_interleave(shape[0] // 3).view(torch.float16)  # q, k, v told apart
            tensors[key] = rows.reshape(-1, *[1] * (len(shape) - 1)).expand(*shape)
        else:
            tensors[key] = tagged(shape, 3 * i + 1)
    return tensors


def reference_tags(ckpt: dict, family: str) -> dict[str, dict[str, tuple]]:
    """Where diffusers' own converters put each tensor (shape and tag per diffusers key)."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    configs = checkpoints._shipped_configs(family, "epsilon")
    out = {"unet": convert_ldm_unet_checkpoint(ckpt, configs["unet"]),
           "vae": convert_ldm_vae_checkpoint(ckpt, configs["vae"])}
    tags = {part: {k: tag_of(v) for k, v in sd.items()} for part, sd in out.items()}
    for i, (name, prefix) in enumerate(convert.TEXT_ENCODER_PREFIXES[family].items()):
        if prefix.endswith(".transformer."):
            sd = convert_ldm_clip_checkpoint(ckpt, prefix)
        else:
            class Stub:
                config = type("C", (), {"hidden_size": configs[name]["hidden_size"]})
            sd = convert_open_clip_checkpoint(Stub(), ckpt, prefix=prefix)
        tags[f"text_encoder{i}"] = {k: tag_of(v) for k, v in sd.items() if "position_ids" not in k}
    return tags


@pytest.mark.parametrize("family,folder,model_type", [
    ("sd1", "sd15", "v1"), ("sd2", "sd2", "v2"), ("sdxl", "sdxl", "xl_base")])
def test_real_architecture_lands_where_diffusers_puts_it(family, folder, model_type):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    ckpt = original_checkpoint(family, folder)
    assert infer_diffusers_model_type(ckpt) == model_type  # diffusers agrees it is a real one
    assert detect_family(ckpt) == family
    expected = reference_tags(ckpt, family)
    parts = build_components(Weights(ckpt, {}), dtype=torch.float16)
    assert parts["family"] == family and parts["prediction_type"] == "epsilon"
    got = component_states(parts["unet"], parts["vae"], parts["text_encoders"])
    for i, encoder in enumerate(parts["text_encoders"]):
        if not hasattr(encoder, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
            part = f"text_encoder{i}"
            expected[part] = {k.removeprefix("text_model."): v for k, v in expected[part].items()}
    for part, tags in expected.items():
        assert got[part].keys() == tags.keys(), part
        for key, tag in tags.items():
            assert tag_of(got[part][key]) == tag, f"{part}.{key}"


def test_prediction_type_rules():
    ckpt = {"model.diffusion_model.x": torch.zeros(1), "cond_stage_model.model.y": torch.zeros(1)}
    assert convert.detect_prediction_type("sd2", Weights(ckpt, {}), None) == "v_prediction"
    probe = {**ckpt, convert.SD2_V_PROBE: torch.linspace(-1, 1, 320)}
    assert convert.detect_prediction_type("sd2", Weights(probe, {}), None) == "v_prediction"
    flat = {**ckpt, convert.SD2_V_PROBE: torch.full((320,), 0.01)}
    assert convert.detect_prediction_type("sd2", Weights(flat, {}), None) == "epsilon"
    assert convert.detect_prediction_type("sdxl", Weights({"v_pred": torch.zeros(())}, {}), None) == "v_prediction"
    assert convert.detect_prediction_type("sd1", Weights(ckpt, {}), None) == "epsilon"
    configs = {"scheduler": {"prediction_type": "v_prediction"}}
    assert convert.detect_prediction_type("sd1", Weights(ckpt, {}), configs) == "v_prediction"


def test_shipped_configs_are_complete():
    for name in ["sd15", "sd2", "sd2-v", "sdxl"]:
        for part in ["model_index.json", "unet/config.json", "vae/config.json",
                     "text_encoder/config.json", "scheduler/scheduler_config.json"]:
            assert json.loads((CONFIGS / name / part).read_text()), f"{name}/{part}"
    assert checkpoints._shipped_configs("sd2", "v_prediction")["unet"]["sample_size"] == 96
    assert checkpoints._shipped_configs("sdxl", "epsilon")["vae"]["scaling_factor"] == 0.13025


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickles_are_refused_unless_allowed(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match="run arbitrary code.*--allow-pickle"):
        load_model(path)
    with pytest.raises(CheckpointError, match="no text encoder"):  # read, then judged on its keys
        load_model(path, allow_pickle=True)


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "callback": Path("x")}, path)  # not a plain tensor container
    with pytest.raises(CheckpointError, match="Can't read pickle"):
        load_model(path, allow_pickle=True)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.safetensors")


def test_truncated_file(exported, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(exported.read_bytes()[: exported.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(cut)
    with pytest.raises(CheckpointError, match="truncated"):
        describe(cut)


def test_text_file_renamed(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("these are not weights\n" * 10)
    with pytest.raises(CheckpointError, match="not a readable .safetensors"):
        load_model(path)


def test_unrecognized_keys(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"foo.bar": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="No Stable Diffusion weights"):
        load_model(path)


def test_wrong_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "odd.safetensors"  # SD1 key names, but nothing like SD1's shapes
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(3),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1, 1, 1, 1)}, str(path))
    with pytest.raises(CheckpointError, match="UNet weights don't fit"):
        load_model(path)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a diffusers model folder"):
        load_model(tmp_path)


def test_bad_prediction_type(tiny):
    with pytest.raises(CheckpointError, match="prediction_type"):
        load_model(tiny, prediction_type="x0")


def test_sha256_is_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    import hashlib
    import os

    from sfumato.checkpoints import hash_cache_path, sha256_file

    monkeypatch.setenv("SFUMATO_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.safetensors"
    f.write_bytes(b"abc")
    assert sha256_file(f) == hashlib.sha256(b"abc").hexdigest()
    assert hash_cache_path().exists()
    stat = f.stat()
    f.write_bytes(b"xyz")  # same size; restore the mtime: the cached value is returned
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert sha256_file(f) == hashlib.sha256(b"abc").hexdigest()
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # touched: hashed again
    assert sha256_file(f) == hashlib.sha256(b"xyz").hexdigest()


def test_copying_reader_reads_what_safetensors_reads(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {"f32": torch.randn(3, 5), "bf16": torch.randn(7).bfloat16(), "ids": torch.arange(4),
               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
               "big": torch.randn(checkpoints.CopyingReader.CHUNK_BYTES // 4 + 3)}  # > one chunk
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, path, metadata={"k": "v"})
    reference = load_file(path)
    reader = checkpoints.CopyingReader(path, torch.float16)
    try:
        for key, tensor in reference.items():
            got = reader.get(key)
            want = tensor.half() if tensor.is_floating_point() else tensor
            assert got.dtype == want.dtype and torch.equal(got, want), key
    finally:
        reader.close()


def test_weights_are_read_as_copies_only_when_converted(exported):
    with checkpoints.open_weights(exported, dtype=torch.float16) as weights:
        assert weights._copies is not None  # fp32 file, fp16 wanted: converted as read
        key = weights.keys[0]
        assert weights.get(key).dtype == torch.float16
    with checkpoints.open_weights(exported, dtype=torch.float32) as weights:
        assert weights._copies is None  # nothing to convert: views of the memory map


def test_the_shipped_single_file_holds_the_shipped_folders_weights(tmp_path: Path):
    # A retrained built-in model must be exported again (`sfumato export --half`), or the two drift.
    single = checkpoints.BUILTIN_MODEL.parent / "sfumato-shapes.safetensors"
    fresh = tmp_path / "fresh.safetensors"
    checkpoints.export_single_file(checkpoints.BUILTIN_MODEL, fresh, half=True)
    with safe_open(single, "pt") as shipped, safe_open(fresh, "pt") as exported:
        names = sorted(shipped.keys())
        assert names == sorted(exported.keys())
        stale = [k for k in names if not torch.equal(shipped.get_tensor(k), exported.get_tensor(k))]
    assert not stale, f"{len(stale)} tensors differ, e.g. {stale[:3]}"
