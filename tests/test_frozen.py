import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sfumato import frozen
from sfumato.accel import Levers
from sfumato.params import GenerationParams
from sfumato.pipeline import Pipeline
from sfumato.text import load_clip_tokenizer

PARAMS = GenerationParams("a red star above a blue circle", negative_prompt="green", seed=5, steps=3,
                          cfg_scale=6.0, width=64, height=64, sampler="Euler", batch_size=2).validated()


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test starts without bundles or traces."""
    monkeypatch.setenv("SFUMATO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def run(model: Path, params: GenerationParams = PARAMS, **kwargs) -> list[np.ndarray]:
    return [np.asarray(g.image) for g in frozen.generate_once(str(model), params, **kwargs)]


def bundle(model: Path) -> Path:
    return frozen.bundle_folder(str(model), Levers())


def no_full_load(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("loaded the full model although the bundle serves the request")

    monkeypatch.setattr(Pipeline, "load", refuse)


def assert_same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_a_later_run_is_served_by_the_bundle_with_the_same_images(tiny_model_dir, monkeypatch):
    first = run(tiny_model_dir)
    assert (bundle(tiny_model_dir) / frozen.META).exists()
    skipped = dataclasses.replace(PARAMS, clip_skip=2)
    full = [np.asarray(g.image) for g in Pipeline.load(str(tiny_model_dir), device="cpu").generate(skipped)]
    no_full_load(monkeypatch)
    assert_same(run(tiny_model_dir), first)
    # Every clip skip is served: the text trace returns every layer's hidden states.
    assert_same(run(tiny_model_dir, skipped), full)


def test_the_metadata_matches_the_full_models(tiny_model_dir):
    full = frozen.generate_once(str(tiny_model_dir), PARAMS)
    served = frozen.generate_once(str(tiny_model_dir), PARAMS)
    assert [g.infotext for g in served] == [g.infotext for g in full]
    assert "Model: tiny-sd" in served[0].infotext


def test_a_shape_without_a_trace_falls_back_to_the_full_model_and_joins_the_bundle(tiny_model_dir, monkeypatch):
    run(tiny_model_dir)
    traces = set(bundle(tiny_model_dir).glob("trace-unet-*.pt"))
    bigger = dataclasses.replace(PARAMS, width=96)
    once = run(tiny_model_dir, bigger)
    assert len(set(bundle(tiny_model_dir).glob("trace-unet-*.pt")) - traces) == 1
    no_full_load(monkeypatch)
    assert_same(run(tiny_model_dir, bigger), once)


def test_a_damaged_trace_or_an_incomplete_bundle_is_not_used(tiny_model_dir):
    first = run(tiny_model_dir)
    for trace in bundle(tiny_model_dir).glob("trace-unet-*.pt"):
        trace.write_bytes(b"not a TorchScript archive")
    assert_same(run(tiny_model_dir), first)  # the full model, which writes the trace anew
    (bundle(tiny_model_dir) / frozen.META).unlink()
    with pytest.raises(frozen.FrozenMiss):
        frozen.load_bundle(bundle(tiny_model_dir), tiny_model_dir)
    assert_same(run(tiny_model_dir), first)


@pytest.mark.parametrize("change", [
    {"loras": (("style.safetensors", 1.0, 1.0),)},
    {"prompt": "a red star <lora:style:0.8>"},
    {"negative_prompt": "<lora:style:1>"},
    {"token_merging_ratio": 0.5},
])
def test_requests_that_change_the_networks_are_not_served(change):
    params = dataclasses.replace(PARAMS, **change)
    assert not frozen.serves(params, vae=None, device=None, levers=Levers(), init_image=None)


def test_only_the_default_levers_on_the_cpu_with_the_models_own_vae_are_served(monkeypatch):
    def served(**kwargs):
        return frozen.serves(PARAMS, **{"vae": None, "device": None, "levers": Levers(), "init_image": None,
                                        **kwargs})

    assert served() and served(device="cpu")
    assert not served(levers=Levers.parse(["deepcache"]))
    assert not served(levers=Levers.parse(["no-jit"]))
    assert not served(device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine: its GPU by default
    assert not served() and served(device="cpu")
    assert not served(vae="other.safetensors")
    assert not served(init_image=Image.new("RGB", (64, 64)))


def test_a_copy_of_the_model_shares_its_bundle_but_not_its_name(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    copy = shutil.copytree(tiny_model_dir, tmp_path / "renamed")
    assert bundle(copy) == bundle(tiny_model_dir)  # the same contents: the same bundle
    frozen.generate_once(str(tiny_model_dir), PARAMS)
    no_full_load(monkeypatch)
    assert "Model: renamed," in frozen.generate_once(str(copy), PARAMS)[0].infotext


def test_another_model_file_has_another_bundle(tiny_model_dir, tmp_path):
    import shutil

    copy = shutil.copytree(tiny_model_dir, tmp_path / "tiny-sd")
    config = copy / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "_note": "changed"}))
    assert bundle(copy) != bundle(tiny_model_dir)
    assert frozen.bundle_folder(str(tmp_path / "missing"), Levers()) is None


def test_a_model_too_big_to_be_small_has_no_bundle(tmp_path, monkeypatch):
    big = tmp_path / "big.safetensors"
    with open(big, "wb") as f:
        f.truncate(4 * frozen.accel.FP16_WEIGHTS_MIN_PARAMS + 1)  # sparse: no disk used, nothing hashed
    monkeypatch.setattr(frozen, "sha256_file", lambda path: pytest.fail("hashed a big model's files"))
    assert frozen.bundle_folder(str(big), Levers()) is None


PROMPTS = ["a red star above a blue circle", "", "  Lots   of\tWHITESPACE\n", "café naïve ÆØÅ 東京 🙂",
           "it's they're we've (word:1.2) [x] \\(escaped\\), 3.5 kg", "<|endoftext|> inside",
           " ".join(["long"] * 100), "a-b_c.d,e;f!?"]


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_the_bundled_tokenizer_tokenizes_as_clips(pad):
    clip = load_clip_tokenizer(pad_token=pad)
    ours = frozen.BundledTokenizer(clip.backend_tokenizer.to_str(), clip.bos_token_id, clip.eos_token_id,
                                   clip.pad_token_id)
    kwargs = {"add_special_tokens": False, "padding": False, "truncation": False, "verbose": False}
    assert ours(PROMPTS, **kwargs)["input_ids"] == clip(PROMPTS, **kwargs)["input_ids"]
    assert ours.convert_tokens_to_ids(",</w>") == clip.convert_tokens_to_ids(",</w>")


def test_a_served_run_imports_neither_diffusers_nor_transformers(tiny_model_dir, own_cache):
    run(tiny_model_dir)
    code = ("import sfumato, sys\n"
            "from sfumato.frozen import generate_once\n"
            "from sfumato.params import GenerationParams\n"
            f"generate_once({str(tiny_model_dir)!r}, GenerationParams(**{dataclasses.asdict(PARAMS)!r}))\n"
            "print(sorted(m for m in ('diffusers', 'transformers', 'peft') if m in sys.modules))\n")
    env = {**os.environ, "SFUMATO_CACHE": str(own_cache)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_pruning_keeps_what_every_run_of_the_model_needs(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(frozen, "KEEP_TRACES", 1)
    first = run(tiny_model_dir)
    run(tiny_model_dir, dataclasses.replace(PARAMS, width=96))  # its traces push out the first ones
    assert len(list(bundle(tiny_model_dir).glob("trace-*.pt"))) == 1
    assert list(bundle(tiny_model_dir).glob("text-norm-*.pt"))
    assert_same(run(tiny_model_dir), first)  # traced again, from the full model
    no_full_load(monkeypatch)
    frozen.load_bundle(bundle(tiny_model_dir), tiny_model_dir)


def test_an_image_decoded_in_tiles_is_left_to_the_full_model_before_sampling(tiny_model_dir, monkeypatch):
    run(tiny_model_dir)
    monkeypatch.setattr(Pipeline, "generate", lambda *a, **k: pytest.fail("sampled from the bundle"))
    huge = dataclasses.replace(PARAMS, width=1032, height=1032)
    with pytest.raises(frozen.FrozenMiss, match="tiles"):
        frozen._generate_from_bundle(bundle(tiny_model_dir), tiny_model_dir, huge, None, Levers(), None)
