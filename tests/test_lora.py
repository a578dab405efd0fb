import hashlib
import logging
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from tiny import tiny_components

from sfumato.errors import LoraError
from sfumato.lora import LoraStack, model_components, resolve_lora_path
from sfumato.lora_formats import canonical_path
from sfumato.text import load_clip_tokenizer

RANK = 4
TOKENIZER = load_clip_tokenizer()


@pytest.fixture(scope="module")
def model():
    unet, _, text = tiny_components(seed=0)
    return SimpleNamespace(family="sd1", unet=unet, text_encoders=[text], tokenizers=[TOKENIZER])


def weights(model):
    """Every tensor of the model, under the names LoRA files use."""
    return {f"{c}.{canonical_path(c, k)}": v.clone() for c, root in model_components(model).items()
            for k, v in root.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def unet_output(model):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    text = torch.randn(1, 77, 32, generator=gen)
    with torch.no_grad():
        return model.unet(x, torch.tensor([500]), encoder_hidden_states=text).sample


def low_rank(out_shape, in_shape, seed):
    """(down, up) random factors for a layer: down (r, *in_shape), up (out, r, *1s)."""
    gen = torch.Generator().manual_seed(seed)
    down = torch.randn(RANK, *in_shape, generator=gen) * 0.1
    up = torch.randn(out_shape[0], RANK, *out_shape[1:], generator=gen) * 0.1
    return down, up


# (component, module path, kohya diffusers-style name, LDM-style name, down shape, up shape)
LAYERS = [
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
     "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
     "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q", (32,), (32,)),
    # linear LoRA on a 1x1 conv (SD1 proj_in is a conv, SD2/SDXL's a linear)
    ("unet", "up_blocks.1.attentions.1.proj_in", "lora_unet_up_blocks_1_attentions_1_proj_in",
     "lora_unet_output_blocks_3_1_proj_in", (32,), (32,)),
    # 3x3 conv: 3x3 down, 1x1 up
    ("unet", "down_blocks.1.resnets.0.conv1", "lora_unet_down_blocks_1_resnets_0_conv1",
     "lora_unet_input_blocks_3_0_in_layers_2", (32, 3, 3), (64, 1, 1)),
    ("unet", "up_blocks.0.upsamplers.0.conv", "lora_unet_up_blocks_0_upsamplers_0_conv",
     "lora_unet_output_blocks_1_1_conv", (64, 3, 3), (64, 1, 1)),
    ("text_encoder", "text_model.encoder.layers.1.self_attn.q_proj",
     "lora_te_text_model_encoder_layers_1_self_attn_q_proj",
     "lora_te_text_model_encoder_layers_1_self_attn_q_proj", (32,), (32,)),
]


def expected_delta(down, up, alpha, shape):
    return (torch.einsum("or,ri->oi", up.flatten(1), down.flatten(1)) * alpha / RANK).reshape(shape)


def kohya_file(path, ldm=False, alpha=2.0):
    tensors, deltas = {}, {}
    for i, (component, module, name, ldm_name, down_shape, up_shape) in enumerate(LAYERS):
        down, up = low_rank(up_shape, down_shape, seed=i)
        key = ldm_name if ldm else name
        tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                    f"{key}.alpha": torch.tensor(alpha)}
        deltas[f"{component}.{module}.weight"] = (down, up, alpha)
    save_file(tensors, str(path))
    return deltas


def assert_applied(before, after, deltas, te_weight, unet_weight):
    for key, (down, up, alpha) in deltas.items():
        multiplier = unet_weight if key.startswith("unet.") else te_weight
        change = expected_delta(down, up, alpha, before[key].shape) * multiplier
        torch.testing.assert_close(after[key], before[key] + change, rtol=1e-5, atol=1e-6)
    untouched = [k for k in before if k not in deltas]
    assert all(torch.equal(before[k], after[k]) for k in untouched)


@pytest.mark.parametrize("ldm", [False, True], ids=["diffusers-names", "ldm-names"])
def test_kohya_file_applies_known_deltas_and_removes_exactly(model, tmp_path, ldm):
    deltas = kohya_file(tmp_path / "k.safetensors", ldm=ldm)
    before, out_before = weights(model), unet_output(model)
    stack = LoraStack(model)
    hashes = stack.activate([(str(tmp_path / "k.safetensors"), 0.5, 1.0)])
    assert list(hashes) == ["k"]
    assert_applied(before, weights(model), deltas, te_weight=0.5, unet_weight=1.0)
    assert stack.reports["k"].layers == len(LAYERS) and not stack.reports["k"].skipped_keys
    assert not torch.equal(unet_output(model), out_before)
    stack.activate([])
    assert same(before, weights(model))
    assert torch.equal(unet_output(model), out_before)


def test_peft_file_without_alpha_has_scale_one(model, tmp_path):
    tensors, deltas = {}, {}
    for i, (component, module, _, _, down_shape, up_shape) in enumerate(LAYERS):
        down, up = low_rank(up_shape, down_shape, seed=10 + i)
        tensors |= {f"{component}.{module}.lora_A.weight": down, f"{component}.{module}.lora_B.weight": up}
        deltas[f"{component}.{module}.weight"] = (down, up, float(RANK))
    save_file(tensors, str(tmp_path / "p.safetensors"))
    before = weights(model)
    stack = LoraStack(model, lora_dir=tmp_path)
    stack.activate([("p", 1.0, 0.7)])
    assert_applied(before, weights(model), deltas, te_weight=1.0, unet_weight=0.7)
    stack.activate([])
    assert same(before, weights(model))


def test_same_set_is_not_reapplied_and_switching_is_exact(model, tmp_path, monkeypatch):
    kohya_file(tmp_path / "a.safetensors", alpha=1.0)
    kohya_file(tmp_path / "b.safetensors", alpha=3.0)
    stack = LoraStack(model, lora_dir=tmp_path)
    stack.activate([("a", 1, 1)])
    only_a = weights(model)
    merges = []
    monkeypatch.setattr(stack, "_merge", lambda deltas: merges.append(deltas))
    stack.activate([("a", 1, 1)])
    assert merges == []
    monkeypatch.undo()
    stack.activate([("b", 0.5, 0.5)])
    half_b = weights(model)
    stack.activate([("a", 1, 1), ("b", 0.5, 0.5)])
    both = weights(model)
    stack.activate([("a", 1, 1)])
    assert same(only_a, weights(model))
    stack.activate([])
    base = weights(model)
    for key in base:  # two LoRAs on one layer add up
        torch.testing.assert_close(both[key], only_a[key] + half_b[key] - base[key], rtol=1e-5, atol=1e-6)


def test_fp16_model_restores_bit_exactly(tmp_path):
    unet, _, text = tiny_components(seed=1)
    model = SimpleNamespace(family="sd1", unet=unet.half(), text_encoders=[text.half()], tokenizers=[TOKENIZER])
    kohya_file(tmp_path / "k.safetensors")
    before = weights(model)
    stack = LoraStack(model)
    stack.activate([(str(tmp_path / "k.safetensors"), 1, 1)])
    assert not same(before, weights(model))
    stack.activate([])
    assert same(before, weights(model))


def test_merging_never_writes_into_the_loaded_weights(tmp_path):
    """The weights as loaded (views of a checkpoint's memory map) stay untouched: merged weights
    get memory of their own, and removing the LoRAs puts the very same tensors back."""
    unet, _, text = tiny_components(seed=2)
    model = SimpleNamespace(family="sd1", unet=unet.half(), text_encoders=[text.half()], tokenizers=[TOKENIZER])
    kohya_file(tmp_path / "k.safetensors")
    loaded = {name: (p, p.data, p.data.clone())
              for name, p in [*model.unet.named_parameters(), *model.text_encoders[0].named_parameters()]}
    stack = LoraStack(model)
    stack.activate([(str(tmp_path / "k.safetensors"), 1, 1)])
    merged = [name for name, (p, data, _) in loaded.items() if p.data.data_ptr() != data.data_ptr()]
    assert len(merged) == len(LAYERS)
    assert all(torch.equal(data, copy) for _, data, copy in loaded.values())
    stack.activate([])
    assert all(p.data.data_ptr() == data.data_ptr() for p, data, _ in loaded.values())


def tiny_sdxl_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, use_linear_projection=True)


def test_sdxl_ldm_names_match_the_sdxl_checkpoint_layout():
    """Correspondences from the SDXL base checkpoint vs its diffusers conversion."""
    from sfumato.lora_formats import ModuleIndex

    index = ModuleIndex({"unet": tiny_sdxl_unet()})
    known = {
        "input_blocks_4_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "input_blocks_8_1_proj_out": "down_blocks.2.attentions.1.proj_out",
        "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
        "input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
        "middle_block_1_transformer_blocks_0_ff_net_2": "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
        "middle_block_2_emb_layers_1": "mid_block.resnets.1.time_emb_proj",
        "output_blocks_0_1_transformer_blocks_0_attn2_to_k": "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
        "output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
        "output_blocks_5_2_conv": "up_blocks.1.upsamplers.0.conv",
        "output_blocks_8_0_out_layers_3": "up_blocks.2.resnets.2.conv2",
        "input_blocks_0_0": "conv_in", "out_2": "conv_out", "time_embed_0": "time_embedding.linear_1",
    }
    for ldm, module in known.items():
        assert index.kohya["lora_unet_" + ldm] == ("unet", module), ldm


def test_sdxl_te1_and_te2_go_to_their_own_encoder(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, projection_dim=32)
    torch.manual_seed(0)
    model = SimpleNamespace(family="sdxl", unet=tiny_sdxl_unet(),
                            text_encoders=[CLIPTextModel(config), CLIPTextModelWithProjection(config)],
                            tokenizers=[TOKENIZER, TOKENIZER])
    down1, up1 = low_rank((32,), (32,), seed=1)
    down2, up2 = low_rank((32,), (32,), seed=2)
    layer = "text_model_encoder_layers_0_self_attn_v_proj"
    vectors = {"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 32)}
    save_file({f"lora_te1_{layer}.lora_down.weight": down1, f"lora_te1_{layer}.lora_up.weight": up1,
               f"lora_te2_{layer}.lora_down.weight": down2, f"lora_te2_{layer}.lora_up.weight": up2,
               **{f"bundle_emb.star.{k}": v for k, v in vectors.items()}},
              str(tmp_path / "xl.safetensors"))
    before = weights(model)
    LoraStack(model).activate([(str(tmp_path / "xl.safetensors"), 1.0, 1.0)])
    after = weights(model)
    key = "text_model.encoder.layers.0.self_attn.v_proj.weight"
    torch.testing.assert_close(after[f"text_encoder.{key}"],
                               before[f"text_encoder.{key}"] + expected_delta(down1, up1, RANK, (32, 32)))
    torch.testing.assert_close(after[f"text_encoder_2.{key}"],
                               before[f"text_encoder_2.{key}"] + expected_delta(down2, up2, RANK, (32, 32)))
    [star] = TOKENIZER("star", add_special_tokens=False).input_ids
    for component, part in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
        torch.testing.assert_close(after[f"{component}.{EMBEDDING}"][star], vectors[part][0])


EMBEDDING = "text_model.embeddings.token_embedding.weight"


def test_bundled_embedding_sets_its_names_rows_while_applied(model, tmp_path):
    tokens = TOKENIZER("hexagon", add_special_tokens=False).input_ids
    vectors = torch.randn(len(tokens), 32)
    save_file({"bundle_emb.hexagon.string_to_param.*": vectors}, str(tmp_path / "hex.safetensors"))
    before = weights(model)
    stack = LoraStack(model)
    stack.activate([(str(tmp_path / "hex.safetensors"), 0.0, 0.0)])  # applied whatever the weights, as A1111
    assert stack.reports["hex"].embeddings == ["hexagon"] and stack.reports["hex"].layers == 0
    after = weights(model)
    torch.testing.assert_close(after["text_encoder." + EMBEDDING][tokens], vectors)
    others = torch.ones(len(after["text_encoder." + EMBEDDING]), dtype=torch.bool)
    others[tokens] = False
    assert torch.equal(after["text_encoder." + EMBEDDING][others], before["text_encoder." + EMBEDDING][others])
    stack.remove_all()
    assert same(weights(model), before)


def test_bundled_embeddings_that_cannot_apply_are_errors(model, tmp_path):
    save_file({"bundle_emb.hexagon.string_to_param.*": torch.randn(5, 32)}, str(tmp_path / "five.safetensors"))
    save_file({"bundle_emb.star.string_to_param.*": torch.randn(1, 32)}, str(tmp_path / "a.safetensors"))
    save_file({"bundle_emb.star.string_to_param.*": torch.randn(1, 32)}, str(tmp_path / "b.safetensors"))
    before = weights(model)
    stack = LoraStack(model)
    with pytest.raises(LoraError, match="has 5 vectors but its name reads as 2 tokens"):
        stack.activate([(str(tmp_path / "five.safetensors"), 1.0, 1.0)])
    with pytest.raises(LoraError, match="set the same token"):
        stack.activate([(str(tmp_path / "a.safetensors"), 1.0, 1.0), (str(tmp_path / "b.safetensors"), 1.0, 1.0)])
    assert same(weights(model), before)


@pytest.mark.parametrize("keys, fmt", [
    (["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"], "LoHa"),
    (["lokr_w1", "lokr_w2"], "LoKr"),
])
def test_lycoris_files_are_refused_by_name(model, tmp_path, keys, fmt):
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{name}.{k}": torch.zeros(4, 4) for k in keys}, str(tmp_path / "ly.safetensors"))
    with pytest.raises(LoraError, match=fmt):
        LoraStack(model).activate([(str(tmp_path / "ly.safetensors"), 1, 1)])


def test_file_matching_nothing_is_an_error_and_partial_match_warns(model, tmp_path, caplog):
    save_file({"lora_unet_nowhere.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_nowhere.lora_up.weight": torch.zeros(32, 4)}, str(tmp_path / "none.safetensors"))
    stack = LoraStack(model, lora_dir=tmp_path)
    before = weights(model)
    with pytest.raises(LoraError, match="match"):
        stack.activate([("none", 1, 1)])
    assert same(before, weights(model))

    kohya_file(tmp_path / "part.safetensors")
    from safetensors.torch import load_file
    tensors = load_file(str(tmp_path / "part.safetensors")) | {
        "lora_unet_nowhere.lora_down.weight": torch.zeros(4, 32),
        "lora_unet_nowhere.lora_up.weight": torch.zeros(32, 4),
        # right name, wrong shape: made for another model
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(37, 4)}
    save_file(tensors, str(tmp_path / "part.safetensors"))
    with caplog.at_level(logging.WARNING):
        stack.activate([("part", 1, 1)])
    report = stack.reports["part"]
    assert report.matched_keys == 3 * len(LAYERS) and len(report.skipped_keys) == 4
    assert "15 keys matched, 4 skipped" in caplog.text
    stack.activate([])


def test_names_resolve_inside_the_folder_only(tmp_path):
    folder = tmp_path / "loras"
    (folder / "styles").mkdir(parents=True)
    (folder / "styles" / "ink.safetensors").write_bytes(b"x")
    (folder / "plain.safetensors").write_bytes(b"x")
    (tmp_path / "secret.safetensors").write_bytes(b"x")
    os.symlink(tmp_path / "secret.safetensors", folder / "link.safetensors")
    assert resolve_lora_path("plain", folder) == (folder / "plain.safetensors").resolve()
    assert resolve_lora_path("ink", folder) == (folder / "styles" / "ink.safetensors").resolve()
    for bad in ["../secret", "styles/../../secret", "/nonexistent/secret", "link"]:
        with pytest.raises(LoraError, match=str(folder.resolve())):
            resolve_lora_path(bad, folder, allow_paths=False)
    with pytest.raises(LoraError, match="not found in .*available: ink, link, plain"):
        resolve_lora_path("missing", folder)
    with pytest.raises(LoraError, match="no LoRA folder"):
        resolve_lora_path("plain", None)


def test_hash_is_a1111_short_hash_of_tensor_data(model, tmp_path):
    kohya_file(tmp_path / "h.safetensors")
    data = (tmp_path / "h.safetensors").read_bytes()
    header = int.from_bytes(data[:8], "little")
    expected = hashlib.sha256(data[8 + header:]).hexdigest()[:12]
    stack = LoraStack(model, lora_dir=tmp_path)
    assert stack.activate([("h", 1, 1)]) == {"h": expected}
    stack.activate([])


def test_pickle_files_are_refused(model, tmp_path):
    (tmp_path / "old.pt").write_bytes(b"not read")
    with pytest.raises(LoraError, match="only .safetensors"):
        LoraStack(model).activate([(str(tmp_path / "old.pt"), 1, 1)])
