import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from sfumato import accel
from sfumato.accel import Levers
from sfumato.checkpoints import load_model
from sfumato.errors import ParamError
from sfumato.params import GenerationParams
from sfumato.pipeline import Pipeline, default_dtype

PARAMS = GenerationParams("a red star above a blue circle", negative_prompt="green", seed=5, steps=3,
                          cfg_scale=6.0, width=64, height=64, sampler="Euler")


def pipeline(tiny_model_dir, levers: Levers) -> Pipeline:
    return Pipeline.load(str(tiny_model_dir), device="cpu", levers=levers)


def latents_of(pipe: Pipeline) -> torch.Tensor:
    return pipe.sample_latents(PARAMS, PARAMS.prompt, PARAMS.negative_prompt, 64, 64)


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    pipe = pipeline(tiny_model_dir, Levers.none())
    return latents_of(pipe), np.asarray(pipe.generate(PARAMS)[0].image)


def test_defaults_are_exact_or_near_exact_levers_only():
    assert Levers() == Levers(channels_last=True, fp16_weights=True, compile=False, int8=False, bf16=False,
                              deepcache=False)
    assert Levers().lossy_names() == [] and Levers.none().names() == []
    assert Levers.parse(["int8", "no-channels_last"]) == Levers(channels_last=False, int8=True)
    with pytest.raises(ParamError, match="allowed: channels_last"):
        Levers.parse(["turbo"])


def test_tome_takes_a_ratio_and_a_later_name_wins():
    assert Levers.parse(["tome"]).tome == accel.TOME_RATIO
    assert Levers.parse(["tome=0.3"]).tome == 0.3
    assert Levers.parse(["tome=0.3", "no-tome"]).tome == 0.0
    for bad, needle in [("tome=1.5", "from 0 .off. to 0.9"), ("tome=half", "from 0"),
                        ("int8=1", "takes no value")]:
        with pytest.raises(ParamError, match=needle):
            Levers.parse([bad])


def test_channels_last_leaves_outputs_equal(tiny_model_dir, plain):
    pipe = pipeline(tiny_model_dir, Levers(channels_last=True, fp16_weights=False))
    conv = pipe.model.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    latents, image = plain
    # NHWC convs sum in another order: equal up to float32 rounding, relative to the values' scale
    assert (latents_of(pipe) - latents).abs().max() <= 1e-5 * latents.abs().max()
    assert np.abs(np.asarray(pipe.generate(PARAMS)[0].image, int) - image).max() <= 1


def test_channels_last_takes_the_vae_only_of_sd_sized_models(tiny_model_dir, plain, monkeypatch):
    def vae_is_nhwc() -> bool:
        pipe = pipeline(tiny_model_dir, Levers(channels_last=True, fp16_weights=False))
        return pipe.model.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)

    assert not vae_is_nhwc()  # the built-in model's image was slower with it
    monkeypatch.setattr(accel, "FP16_WEIGHTS_MIN_PARAMS", 0)  # the tiny model stands in for an SD-sized one
    assert vae_is_nhwc()
    pipe = pipeline(tiny_model_dir, Levers(channels_last=True, fp16_weights=False))
    assert np.abs(np.asarray(pipe.generate(PARAMS)[0].image, int) - plain[1]).max() <= 1


def test_int8_is_lossy_but_close(tiny_model_dir, plain):
    pipe = pipeline(tiny_model_dir, Levers(int8=True))
    linears = [m for m in pipe.model.unet.modules() if type(m) is torch.nn.Linear]
    assert not linears  # every Linear was swapped for its quantized version
    ours, reference = latents_of(pipe), plain[0]
    assert torch.isfinite(ours).all()
    assert 0 < (ours - reference).abs().max() < 0.5 * reference.abs().max()


def test_deepcache_skips_deep_blocks_on_most_calls_and_stays_close(tiny_model_dir, plain):
    pipe = pipeline(tiny_model_dir, Levers(deepcache=True))
    deep_calls = []
    pipe.model.unet.mid_block.register_forward_hook(lambda *_: deep_calls.append(1))
    ours, reference = latents_of(pipe), plain[0]
    assert 0 < len(deep_calls) <= -(-PARAMS.steps // 3) + 1  # one full call in three
    assert 0 < (ours - reference).abs().max() < 0.5 * reference.abs().max()
    assert Levers.parse(["deepcache"]) == Levers(deepcache=True)
    assert "Sfumato levers: deepcache" in pipe.generate(PARAMS)[0].infotext
    assert "Sfumato levers" not in pipeline(tiny_model_dir, Levers()).generate(PARAMS)[0].infotext


def test_bf16_autocast_runs_in_bf16(tiny_model_dir, plain):
    pipe = pipeline(tiny_model_dir, Levers(bf16=True))
    seen = []
    pipe.model.unet.conv_out.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    ours = latents_of(pipe)
    assert seen and set(seen) == {torch.bfloat16}
    assert ours.dtype == torch.float32 and not torch.equal(ours, plain[0])


def test_diffusers_uses_sdpa_attention(tiny_model_dir):
    model = load_model(tiny_model_dir)
    assert accel.attention_backends(model.unet) == {"AttnProcessor2_0"}


def test_bf16_speed_needs_native_bf16():
    assert accel.has_fast_bf16({"avx2", "avx512_bf16"})
    assert accel.has_fast_bf16({"amx_bf16"})
    assert not accel.has_fast_bf16({"avx2", "avx512f"})


def test_device_and_dtype_logic_for_cuda_without_a_gpu():
    """fp16 on CUDA, fp32 on the CPU; noise drawn on the CPU whatever the device."""
    from sfumato.latents import SeededNoise

    assert default_dtype(torch.device("cuda")) == torch.float16
    assert default_dtype(torch.device("cpu")) == torch.float32
    noise = SeededNoise([7, 8], (4, 8, 8), device="meta")  # stands in for a GPU: no values there
    assert all(g.device.type == "cpu" for g in noise.generators)
    assert noise().device.type == "meta"
    on_cpu = SeededNoise([8], (4, 8, 8), device="cpu")()
    assert torch.equal(on_cpu[0], torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(8)))
    with pytest.raises(ParamError, match="CPU only"):
        accel.prepare(None, Levers(channels_last=False, int8=True), device="cuda")


def test_cfg_one_skips_the_uncond_pass(tiny_model_dir):
    pipe = pipeline(tiny_model_dir, Levers(jit=False))  # a trace runs no Python hooks
    batches = []
    pipe.model.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    pipe.sample_latents(GenerationParams("x", seed=1, steps=2, cfg_scale=1.0, sampler="Euler"), "x", "",
                        64, 64)
    assert batches == [1, 1]
    batches.clear()
    pipe.sample_latents(GenerationParams("x", seed=1, steps=2, cfg_scale=5.0, sampler="Euler"), "x", "",
                        64, 64)
    assert batches == [2, 2]


def test_compile_wraps_only_the_unet_forward(tiny_model_dir):
    model = load_model(tiny_model_dir)
    eager = model.unet.forward
    accel.prepare(model, Levers(channels_last=False, compile=True))
    assert model.unet.forward is not eager and model.unet.forward.__wrapped__ == eager  # compiled lazily
    assert "forward" not in vars(model.vae)


def test_compile_gives_the_eager_numbers_and_sees_weights_changed_later(tiny_model_dir, plain):
    exact = Levers(channels_last=False, fp16_weights=False)
    compiled, eager = pipeline(tiny_model_dir, Levers(channels_last=False, fp16_weights=False, compile=True)), \
        pipeline(tiny_model_dir, exact)
    latents = plain[0]
    assert (latents_of(compiled) - latents).abs().max() <= 1e-5 * latents.abs().max()
    for pipe in (compiled, eager):  # in place, as applying a LoRA does
        with torch.no_grad():
            pipe.model.unet.conv_in.weight.mul_(1.5)
    changed = latents_of(eager)
    assert (changed - latents).abs().max() > 1e-2 * latents.abs().max()
    # the compiled code froze the old weights in; compiling again takes the new ones
    assert (latents_of(compiled) - changed).abs().max() > 1e-2 * changed.abs().max()
    accel.compile_unet(compiled.model.unet, compiled.device)
    assert (latents_of(compiled) - changed).abs().max() <= 1e-5 * changed.abs().max()
    assert accel.compile_cache().is_relative_to(os.environ["SFUMATO_CACHE"])


def test_a_compiled_unet_is_compiled_again_when_its_loras_change(tiny_model_dir, tmp_path, monkeypatch):
    from test_lora import kohya_file

    compiled = []
    monkeypatch.setattr(accel, "compile_unet", lambda unet, device: compiled.append(unet))
    kohya_file(tmp_path / "a.safetensors")
    pipe = Pipeline.load(str(tiny_model_dir), device="cpu", levers=Levers(compile=True), lora_dir=tmp_path)
    assert compiled == [pipe.model.unet]
    for prompt, compiles in [("x <lora:a:1>", 2), ("x <lora:a:1>", 2), ("x <lora:a:0.5>", 3), ("x", 4), ("x", 4)]:
        pipe.generate(prompt=prompt, seed=1, steps=1, width=64, height=64)
        assert len(compiled) == compiles, prompt


def test_fp16_weights_store_half_and_compute_in_float32(tiny_model_dir, tmp_path, plain, monkeypatch):
    from sfumato.checkpoints import export_single_file

    monkeypatch.setattr(accel, "FP16_WEIGHTS_MIN_PARAMS", 0)  # the tiny model stands in for an SD-sized one

    single = tmp_path / "tiny.safetensors"
    export_single_file(tiny_model_dir, single)  # fp32 on disk: read as converted copies
    for source in (tiny_model_dir, single):
        pipe = Pipeline.load(str(source), device="cpu", levers=Levers(fp16_weights=True))
        unet, vae, [encoder] = pipe.model.unet, pipe.model.vae, pipe.model.text_encoders
        assert unet.conv_in.weight.dtype == torch.float16 and vae.decoder.conv_out.weight.dtype == torch.float16
        assert unet.dtype == vae.dtype == encoder.dtype == torch.float32  # what inputs are cast to
        assert {p.dtype for m in (unet, vae, encoder) for n, p in m.named_parameters() if "norm" in n} == {
            torch.float32}
        resting = unet.conv_in.weight.data_ptr()
        ours, reference = latents_of(pipe), plain[0]
        assert ours.dtype == torch.float32
        assert unet.conv_in.weight.data_ptr() == resting  # the fp16 tensor put back, not cast again
        # fp16 rounding of the weights alone: close to the fp32 path, not equal
        assert 0 < (ours - reference).abs().max() < 0.05 * reference.abs().max()
    with_int8 = pipeline(tiny_model_dir, Levers(fp16_weights=True, int8=True))  # int8 wins: fp32 in
    assert with_int8.model.unet.conv_in.weight.dtype == torch.float32


def test_fp16_weights_cast_convs_to_nhwc_and_never_rewrite_the_loaded_weights(tiny_model_dir, tmp_path,
                                                                             monkeypatch):
    from sfumato.checkpoints import export_single_file

    monkeypatch.setattr(accel, "FP16_WEIGHTS_MIN_PARAMS", 0)  # the tiny model stands in for an SD-sized one
    single = tmp_path / "tiny-fp16.safetensors"
    export_single_file(tiny_model_dir, single, half=True)  # fp16 on disk, as most checkpoints are
    pipe = Pipeline.load(str(single), device="cpu", levers=Levers(page_out=False))
    conv = pipe.model.unet.conv_in
    assert conv.weight.dtype == torch.float16 and conv.weight.is_contiguous()  # the file's layout
    layouts = []
    conv.register_forward_hook(lambda m, a, out: layouts.append(
        out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()))
    resting = {name: p.data_ptr() for name, p in pipe.model.unet.named_parameters()}
    image = np.asarray(pipe.generate(PARAMS)[0].image, int)
    assert layouts and all(layouts)  # the cast wrote the conv weights in NHWC while they ran
    assert resting == {name: p.data_ptr() for name, p in pipe.model.unet.named_parameters()}
    # still the checkpoint's memory map: clean pages of the file that page_out can drop
    assert accel.page_out(pipe.model.unet) > 0
    nchw = Pipeline.load(str(single), device="cpu", levers=Levers(channels_last=False))
    assert np.abs(np.asarray(nchw.generate(PARAMS)[0].image, int) - image).max() <= 1


def rss_file_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssFile in /proc/self/status")


def test_page_out_drops_clean_pages_of_a_mapped_file_only(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    n = 4 << 20  # 16 MB of float32 a tensor
    save_file({"clean": torch.arange(n, dtype=torch.float32), "written": torch.ones(n)},
              str(tmp_path / "w.safetensors"))
    module = torch.nn.Module()
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        for name in ("clean", "written"):
            module.register_buffer(name, f.get_tensor(name))
    module.register_buffer("own", torch.full((n,), 2.0))  # memory of its own, not of the file
    module.written.add_(1)  # every page of it copied on write: no longer the file's
    expected = {name: t.clone() for name, t in module.named_buffers()}
    assert module.clean.sum() > 0  # resident now
    before = rss_file_mb()
    dropped = accel.page_out(module) / 2**20
    assert 16 - 0.01 < dropped < 16 + 0.01  # the clean tensor's pages, give or take a shared one
    assert before - rss_file_mb() > 15
    assert all(torch.equal(t, expected[name]) for name, t in module.named_buffers())  # read back
    assert module.clean.sum() > 0 and accel.page_out(tensors=[module.clean]) / 2**20 > 15  # outside a module


def test_sd_sized_models_page_out_each_component_when_its_part_is_done(tiny_model_dir, tmp_path, monkeypatch):
    from test_lora import kohya_file

    calls = []
    monkeypatch.setattr(accel, "page_out", lambda *modules, tensors=(): calls.append(
        {id(m) for m in [*modules, *tensors]}) or 0)
    pipeline(tiny_model_dir, Levers()).generate(PARAMS)
    assert calls == []  # a small model's weights were cast at load, into memory of their own
    monkeypatch.setattr(accel, "FP16_WEIGHTS_MIN_PARAMS", 0)
    pipeline(tiny_model_dir, Levers(page_out=False)).generate(PARAMS)
    assert calls == []
    pipe = pipeline(tiny_model_dir, Levers())
    pipe.generate(PARAMS)
    model = pipe.model
    assert calls == [{id(e) for e in model.text_encoders}, {id(model.unet), id(model.vae.encoder)},
                     {id(model.vae)}]
    calls.clear()
    kohya_file(tmp_path / "a.safetensors")
    pipe = Pipeline.load(str(tiny_model_dir), device="cpu", lora_dir=tmp_path)
    pipe.generate(dataclasses.replace(PARAMS, prompt="a star <lora:a:1>"))
    set_aside = pipe._loras.set_aside()
    assert set_aside and calls[0] == {id(t) for t in set_aside}  # what the merge read, out at once


def test_fp16_weights_on_a_small_model_cast_once_to_the_same_numbers(tiny_model_dir, monkeypatch):
    cast_once = pipeline(tiny_model_dir, Levers(fp16_weights=True))
    assert cast_once.model.unet.conv_in.weight.dtype == torch.float32
    assert not hasattr(cast_once.model.unet.conv_in, "_diffusers_hook")  # no per-call casting
    monkeypatch.setattr(accel, "FP16_WEIGHTS_MIN_PARAMS", 0)
    hooked = pipeline(tiny_model_dir, Levers(fp16_weights=True))
    assert hooked.model.unet.conv_in.weight.dtype == torch.float16
    assert torch.equal(latents_of(cast_once), latents_of(hooked))


def test_tome_merges_half_the_full_resolution_tokens_reproducibly(tiny_model_dir, plain):
    pipe = pipeline(tiny_model_dir, Levers(tome=accel.TOME_RATIO))
    tokens = []
    merged = [m for m in pipe.model.unet.modules() if type(m).__name__ == "ToMeBlock"]
    for block in merged:
        block.attn1.register_forward_pre_hook(lambda _, args: tokens.append(args[0].shape[1]))
    ours, reference = latents_of(pipe), plain[0]
    assert merged and tokens
    # the 8x8 latent's 64 tokens, half of them merged; the 4x4 mid block's 16 left alone
    assert set(tokens) == {32, 16}
    assert 0 < (ours - reference).abs().max() < 0.5 * reference.abs().max()
    assert torch.equal(ours, latents_of(pipe))  # no random merge targets: a seed is one picture
    infotext = pipe.generate(PARAMS)[0].infotext
    assert "Sfumato levers: tome" in infotext and "Token merging ratio: 0.5" in infotext


def test_a_request_sets_its_own_token_merging_ratio_and_zero_restores_the_plain_unet(tiny_model_dir):
    pipe = pipeline(tiny_model_dir, Levers())
    plain_image = np.asarray(pipe.generate(PARAMS)[0].image)
    merged = pipe.generate(dataclasses.replace(PARAMS, token_merging_ratio=0.5))[0]
    by_lever = pipeline(tiny_model_dir, Levers(tome=0.5)).generate(PARAMS)[0]
    assert np.array_equal(np.asarray(merged.image), np.asarray(by_lever.image))
    assert "Token merging ratio: 0.5" in merged.infotext and merged.params.token_merging_ratio == 0.5
    assert not np.array_equal(np.asarray(merged.image), plain_image)
    again = pipe.generate(PARAMS)[0]  # no ratio asked: the pipeline's lever (off) again
    assert np.array_equal(np.asarray(again.image), plain_image)
    assert "Token merging" not in again.infotext and "Sfumato levers" not in again.infotext


def test_tome_works_under_deepcache_which_skips_the_unet_forward(tiny_model_dir, plain):
    ours = latents_of(pipeline(tiny_model_dir, Levers(tome=accel.TOME_RATIO, deepcache=True)))
    alone = latents_of(pipeline(tiny_model_dir, Levers(deepcache=True)))
    assert torch.isfinite(ours).all() and not torch.equal(ours, alone)
    assert (ours - plain[0]).abs().max() < 0.5 * plain[0].abs().max()


def test_tome_says_so_when_a_model_has_no_full_resolution_attention(caplog):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    accel.merge_tokens(unet, torch.device("cpu"))
    assert "changes nothing on this model" in caplog.text
    assert not [m for m in unet.modules() if type(m).__name__ == "ToMeBlock"]


def test_one_thread_runs_a_small_models_denoising_loop_on_one_thread(tiny_model_dir):
    before = torch.get_num_threads()
    seen = []
    pipe = pipeline(tiny_model_dir, Levers())
    assert pipe.one_thread and not pipeline(tiny_model_dir, Levers(one_thread=False)).one_thread
    pipe.model.unet.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    pipe.unet.unet = pipe.model.unet  # eager, so that the hook sees each call
    try:
        torch.set_num_threads(2)
        pipe.sample_latents(PARAMS, PARAMS.prompt, PARAMS.negative_prompt, 64, 64)
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2  # restored after the loop
    finally:
        torch.set_num_threads(before)
