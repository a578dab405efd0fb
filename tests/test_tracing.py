import dataclasses
import logging
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sfumato import tracing
from sfumato.accel import Levers
from sfumato.params import GenerationParams
from sfumato.pipeline import Pipeline

PARAMS = GenerationParams("a red star above a blue circle", negative_prompt="green", seed=5, steps=3,
                          cfg_scale=6.0, width=64, height=64, sampler="Euler", batch_size=2)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test starts without cached traces."""
    monkeypatch.setenv("SFUMATO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "jit"


def load(tiny_model_dir, *levers: str, **kwargs) -> Pipeline:
    return Pipeline.load(str(tiny_model_dir), device="cpu", levers=Levers.parse(list(levers)), **kwargs)


def pixels(pipe: Pipeline, **changes) -> list[np.ndarray]:
    return [np.asarray(g.image) for g in pipe.generate(dataclasses.replace(PARAMS, **changes))]


def assert_same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def eager(tiny_model_dir):
    return Pipeline.load(str(tiny_model_dir), device="cpu", levers=Levers.parse(["no-jit"]))


def test_the_traced_unet_gives_the_eager_images_bit_for_bit(tiny_model_dir, eager, own_cache):
    traced = load(tiny_model_dir)
    assert eager._traced is None and traced._traced is not None
    assert_same(pixels(traced), pixels(eager))
    assert_same(pixels(traced, cfg_scale=1.0), pixels(eager, cfg_scale=1.0))  # batch 1: its own trace
    assert len(list(own_cache.glob("*.pt"))) == 2


def test_a_later_process_loads_the_trace_instead_of_tracing(tiny_model_dir, eager, own_cache, monkeypatch):
    pixels(load(tiny_model_dir))
    saved = {p: p.read_bytes() for p in own_cache.glob("*.pt")}
    assert saved

    def no_tracing(*args):
        raise AssertionError("traced again although the trace was cached")

    monkeypatch.setattr(tracing, "trace_unet", no_tracing)
    assert_same(pixels(load(tiny_model_dir)), pixels(eager))
    assert {p: p.read_bytes() for p in own_cache.glob("*.pt")} == saved


def test_a_damaged_cached_trace_is_traced_again(tiny_model_dir, eager, own_cache, caplog):
    pixels(load(tiny_model_dir))
    for path in own_cache.glob("*.pt"):
        path.write_bytes(b"not a TorchScript archive")
    with caplog.at_level(logging.WARNING, logger="sfumato.tracing"):
        assert_same(pixels(load(tiny_model_dir)), pixels(eager))
    assert "ignoring the cached UNet trace" in caplog.text
    assert all(torch.jit.load(str(p)) is not None for p in own_cache.glob("*.pt"))


def test_a_unet_that_cannot_be_traced_runs_eagerly(tiny_model_dir, eager, own_cache, monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("unsupported op")

    monkeypatch.setattr(tracing, "trace_unet", broken)
    with caplog.at_level(logging.WARNING, logger="sfumato.tracing"):
        assert_same(pixels(load(tiny_model_dir)), pixels(eager))
    assert "could not trace this UNet (unsupported op); running it eagerly" in caplog.text
    assert not list(own_cache.glob("*.pt"))


def test_a_merged_lora_gets_a_trace_of_its_own_and_removing_it_goes_back(tiny_model_dir, tmp_path):
    loras = tmp_path / "loras"
    loras.mkdir()
    layer = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    gen = torch.Generator().manual_seed(0)
    save_file({f"{layer}.lora_down.weight": torch.randn(4, 32, generator=gen),
               f"{layer}.lora_up.weight": torch.randn(32, 4, generator=gen),
               f"{layer}.alpha": torch.tensor(4.0)}, str(loras / "style.safetensors"))
    traced = load(tiny_model_dir, lora_dir=loras)
    eager = load(tiny_model_dir, "no-jit", lora_dir=loras)
    before = pixels(traced)
    styled = pixels(traced, prompt=PARAMS.prompt + " <lora:style:1>")
    assert not all(np.array_equal(a, b) for a, b in zip(before, styled, strict=True))
    assert_same(styled, pixels(eager, prompt=PARAMS.prompt + " <lora:style:1>"))
    assert_same(pixels(traced), before)


def test_token_merging_turns_the_trace_off_and_ratio_zero_back_on(tiny_model_dir):
    pipe = load(tiny_model_dir)
    pixels(pipe, token_merging_ratio=0.5)
    assert not pipe._traced.enabled
    pixels(pipe, token_merging_ratio=0.0)
    assert pipe._traced.enabled


def test_an_unwritable_cache_still_traces(tiny_model_dir, eager, own_cache, caplog):
    own_cache.parent.mkdir(parents=True)
    own_cache.write_bytes(b"a file where the folder should be")
    with caplog.at_level(logging.WARNING, logger="sfumato.tracing"):
        assert_same(pixels(load(tiny_model_dir)), pixels(eager))
    assert "could not save the UNet trace" in caplog.text


def test_levers_that_change_the_unets_code_leave_it_untraced(tiny_model_dir):
    assert load(tiny_model_dir, "int8")._traced is None
    assert load(tiny_model_dir, "tome")._traced.enabled is False


def test_prune_keeps_the_most_recently_used(tmp_path):
    for i in range(5):
        path = tmp_path / f"{i}.pt"
        path.write_bytes(b"x")
        os.utime(path, (i, i))
    tracing.prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["3.pt", "4.pt"]


def test_the_weights_digest_sees_every_value():
    layer = torch.nn.Linear(3, 2)
    before = tracing.weights_digest(layer)
    with torch.no_grad():
        layer.bias[1] += 1e-7
    assert tracing.weights_digest(layer) != before


def test_tracing_a_transformers_model_warns_nothing_a_user_cannot_act_on():
    import warnings

    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=8)
    encoder = CLIPTextModel(config).eval()

    class Call(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder

        def forward(self, ids):
            return self.encoder(ids).last_hidden_state

    log = logging.getLogger("transformers.modeling_utils")
    level = log.level
    with tracing.quiet_torchscript():
        # the tracer reads every attribute of the model: its loss function and deprecated properties
        assert not log.isEnabledFor(logging.WARNING)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # inside: quiet_torchscript's filters come first
            tracing.freeze_trace(Call(), (torch.zeros(1, 8, dtype=torch.long),))
    assert log.level == level
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]
