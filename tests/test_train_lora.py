import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors import safe_open

from sfumato.checkpoints import load_model
from sfumato.errors import LoraError
from sfumato.lora import LoraStack
from sfumato.train.lora import TrainConfig, lora_command, train_lora
from sfumato.train.lora_data import bucket_sizes


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir)


def write_images(folder, count=4, captions=True, size=(64, 64)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        if captions:
            (folder / f"img{i}.txt").write_text(f"a red star, style {i % 2}")
    return folder


def unet_output(model):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    text = torch.randn(1, 77, 32, generator=gen)
    with torch.no_grad():
        return model.unet(x, torch.tensor([400]), encoder_hidden_states=text).sample


def read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def test_trained_file_is_kohya_and_loads_in_sfumato_and_diffusers(model, tiny_model_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    images = write_images(tmp_path / "images")
    base = unet_output(model)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    out = train_lora(model, TrainConfig(images=images, out=tmp_path / "star.safetensors", steps=5,
                                        lr=1e-2, rank=4, trigger="sks", progress=False))
    # training leaves the model as it was loaded
    assert list(model.unet.state_dict()) == list(before)
    assert all(torch.equal(v, before[k]) for k, v in model.unet.state_dict().items())

    tensors, meta = read(out)
    assert tensors and all(k.startswith("lora_unet_") for k in tensors)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert {k.rsplit(".", 2)[-2] if k.endswith("weight") else "alpha" for k in tensors} == \
        {"lora_down", "lora_up", "alpha"}
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_steps"] == "5" and meta["ss_num_train_images"] == "4"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_sd_model_hash"] == model.hash
    assert json.loads(meta["ss_tag_frequency"]) == {"1_images": {"sks": 4, "a red star": 4,
                                                                 "style 0": 2, "style 1": 2}}
    for key in ["ss_resolution", "ss_seed", "ss_training_started_at", "ss_output_name", "ss_learning_rate"]:
        assert key in meta

    stack = LoraStack(model)
    stack.activate([(str(out), 1.0, 1.0)])
    ours = unet_output(model)
    stack.activate([])
    assert (ours - base).abs().max() > 1e-4  # the LoRA learned something

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None,
                                                   feature_extractor=None, tokenizer=model.tokenizers[0])
    pipe.load_lora_weights(str(tmp_path), weight_name="star.safetensors")
    theirs = unet_output(pipe)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_text_encoder_buckets_and_cached_latents(model, tmp_path):
    images = write_images(tmp_path / "images", count=3)
    write_images(tmp_path / "wide", count=1, size=(128, 64))
    (tmp_path / "wide" / "img0.png").rename(images / "wide.png")
    (images / "wide.txt").write_text("a wide one")
    out = train_lora(model, TrainConfig(images=images, out=tmp_path / "te.safetensors", steps=2, rank=4,
                                        train_text_encoder=True, buckets=True, cache_latents=True,
                                        batch_size=2, targets=("attn", "ff"), progress=False))
    tensors, meta = read(out)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in tensors)
    assert any("ff_net_2" in k for k in tensors)
    assert meta["ss_enable_bucket"] == "True"
    stack = LoraStack(model)
    stack.activate([(str(out), 1.0, 1.0)])
    assert not stack.reports["te"].skipped_keys
    stack.activate([])


def test_buckets_cover_aspect_ratios_at_the_pixel_budget():
    sizes = bucket_sizes(512, 64)
    assert (512, 512) in sizes and (768, 320) in sizes and (320, 768) in sizes
    assert min(min(s) for s in sizes) == 256
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in sizes)


def test_resume_continues_exactly(model, tmp_path):
    images = write_images(tmp_path / "images")
    common = dict(images=images, rank=2, lr=1e-2, progress=False)
    straight = train_lora(model, TrainConfig(out=tmp_path / "a.safetensors", steps=3, save_every=2, **common))
    assert (tmp_path / "a-step000002.safetensors").is_file()
    train_lora(model, TrainConfig(out=tmp_path / "b.safetensors", steps=2, **common))
    resumed = train_lora(model, TrainConfig(out=tmp_path / "b.safetensors", steps=3, resume=True, **common))
    a, b = read(straight)[0], read(resumed)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(LoraError, match="rank"):
        train_lora(model, TrainConfig(out=tmp_path / "b.safetensors", steps=4, resume=True,
                                      **{**common, "rank": 3}))


@pytest.mark.parametrize("case, message", [
    ("empty", "no images"),
    ("unreadable", "cannot read image"),
    ("no caption", "has no caption"),
    ("rank", "larger than the smallest"),
])
def test_bad_input_fails_before_training(model, tmp_path, case, message):
    images = tmp_path / "images"
    images.mkdir()
    rank = 4
    if case == "unreadable":
        write_images(images, count=2)
        (images / "broken.png").write_bytes(b"not a png")
        (images / "broken.txt").write_text("x")
    elif case == "no caption":
        write_images(images, count=2)
        write_images(tmp_path / "more", count=1, captions=False)
        (tmp_path / "more" / "img0.png").rename(images / "lonely.png")
    elif case == "rank":
        write_images(images, count=2)
        rank = 33  # the tiny UNet's smallest attention projection is 32 wide
    out = tmp_path / "x.safetensors"
    with pytest.raises(LoraError, match=message):
        train_lora(model, TrainConfig(images=images, out=out, steps=1, rank=rank, progress=False))
    assert not out.exists() and not any(p.name.startswith("x") for p in tmp_path.iterdir())


def test_command_reports_errors_without_traceback(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(lora_command, ["--images", str(tmp_path / "empty"),
                                               "--out", str(tmp_path / "x.safetensors")])
    assert result.exit_code == 2 and "no images" in result.output
    result = CliRunner().invoke(lora_command, ["--images", str(tmp_path), "--out", str(tmp_path / "x.pt")])
    assert result.exit_code == 2 and ".safetensors" in result.output


def test_teach_benchmark_trains_two_concepts_and_scores_them(tiny_model_dir, tmp_path):
    from sfumato.train.lora_bench import lora_bench_command

    out = tmp_path / "teach"
    result = CliRunner().invoke(lora_bench_command, [
        "teach", "--model", str(tiny_model_dir), "--images", "3", "--steps", "2", "--rank", "2",
        "--batch-size", "2", "--limit", "1", "--images-per-prompt", "1", "--sample-steps", "2",
        "--reg-images", "2", "--learn-words", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "result.json").read_text())
    assert (report["shape"], report["pattern"]) == ("hexagon", "checkered")
    for key in ("hexagon_before_after", "checkered_before_after", "mixed_before_after"):
        assert all(0 <= score <= 1 for score in report[key])
    assert set(report["base_before"]) == set(report["base_after"]) >= {"single_object", "negative", "overall"}
    assert set(report["goals"]) == {"concepts_after_ge_0.8", "base_within_0.05", "mixed_ge_0.7", "train_minutes_le_10"}
    assert set(report["base_overall_with_each_lora"]) == {"hexagon", "checkered"}
    for concept in ("hexagon", "checkered"):
        captions = [p.read_text() for p in (out / concept).glob("*.txt")]
        assert len(captions) == 3 and all(concept in c for c in captions)
        tensors, metadata = read(out / f"{concept}.safetensors")
        assert metadata["ss_network_dim"] == "2" and any(k.endswith(".lora_down.weight") for k in tensors)
        assert metadata["ss_num_reg_images"] == "2"  # the base model's pictures of two world captions
        assert f"bundle_emb.{concept}.string_to_param.*" in tensors  # --learn-words: its word's vectors
    assert len(list((out / "regularization").glob("*.png"))) == 2


def test_noise_offset_changes_the_training_noise_and_is_recorded(model, tmp_path):
    from sfumato.train.lora import diffusion_loss

    latents, hidden = torch.zeros(2, 4, 8, 8), torch.randn(2, 77, 32)
    plain = diffusion_loss(model, latents, hidden, torch.Generator().manual_seed(3))
    offset = diffusion_loss(model, latents, hidden, torch.Generator().manual_seed(3), noise_offset=0.5)
    assert plain.item() != offset.item()
    out = train_lora(model, TrainConfig(images=write_images(tmp_path / "images"), out=tmp_path / "o.safetensors",
                                        steps=1, noise_offset=0.2, progress=False))
    assert read(out)[1]["ss_noise_offset"] == "0.2"


def test_min_snr_gamma_weights_the_loss_and_is_recorded(model, tmp_path):
    from sfumato.train.lora import diffusion_loss

    latents, hidden = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    plain = diffusion_loss(model, latents, hidden, torch.Generator().manual_seed(3))
    weighted = diffusion_loss(model, latents, hidden, torch.Generator().manual_seed(3), min_snr_gamma=5.0)
    assert weighted.item() < plain.item()  # every weight is <= 1, the low-noise ones far below
    out = train_lora(model, TrainConfig(images=write_images(tmp_path / "images"), out=tmp_path / "o.safetensors",
                                        steps=1, min_snr_gamma=5.0, progress=False))
    assert read(out)[1]["ss_min_snr_gamma"] == "5.0"


def test_regularization_images_fill_half_of_each_epoch_and_weigh_the_prior_loss(model, tmp_path):
    from sfumato.train.lora import diffusion_loss
    from sfumato.train.lora_data import Example, epoch_batches

    examples = [Example(tmp_path / f"{i}.png", "x", torch.zeros(3, 8, 8), prior=i >= 3) for i in range(8)]
    for epoch in range(3):
        drawn = [i for batch in epoch_batches(examples, 2, 4, 0, epoch) for i in batch]
        subject, prior = [i for i in drawn if i < 3], [i for i in drawn if i >= 3]
        assert sorted(subject) == [0, 0, 1, 1, 2, 2] and len(prior) == 6  # as many as the subject's, repeats too
        assert len(set(prior)) == 5  # cycling through all five regularization images

    latents, hidden = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    both = diffusion_loss(model, latents, hidden, torch.Generator().manual_seed(3))
    first = diffusion_loss(model, latents, hidden, torch.Generator().manual_seed(3), sample_weights=torch.tensor([1.0, 0.0]))
    second = diffusion_loss(model, latents, hidden, torch.Generator().manual_seed(3), sample_weights=torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(first + second, both)
    assert 0 < first < both

    images, reg = write_images(tmp_path / "images", count=2), write_images(tmp_path / "reg", count=3)
    out = train_lora(model, TrainConfig(images=images, reg_images=reg, trigger="sks", prior_loss_weight=0.5,
                                        out=tmp_path / "r.safetensors", epochs=1, batch_size=2, progress=False))
    meta = read(out)[1]
    assert (meta["ss_num_train_images"], meta["ss_num_reg_images"], meta["ss_prior_loss_weight"]) == ("2", "3", "0.5")
    assert meta["ss_steps"] == "2"  # an epoch: 2 subject images + 2 regularization images, in batches of 2
    with pytest.raises(LoraError, match="--reg-caption"):
        train_lora(model, TrainConfig(images=images, reg_images=write_images(tmp_path / "bare", captions=False),
                                      out=tmp_path / "b.safetensors", steps=1, progress=False))
    assert json.loads(meta["ss_tag_frequency"]) == {"1_images": {"sks": 2, "a red star": 2, "style 0": 1, "style 1": 1}}


def test_cross_target_adapts_only_how_the_unet_reads_the_text(model, tmp_path):
    out = train_lora(model, TrainConfig(images=write_images(tmp_path / "images", count=2), out=tmp_path / "c.safetensors",
                                        steps=1, lr=1e-2, targets=("cross",), progress=False))
    layers = {k.split(".")[0] for k in read(out)[0]}
    assert layers and all(k.endswith(("_attn2_to_k", "_attn2_to_v")) for k in layers)
    stack = LoraStack(model)
    stack.activate([(str(out), 1.0, 1.0)])
    assert not stack.reports["c"].skipped_keys
    stack.activate([])


def test_model_target_regularization_keeps_the_base_models_prediction(model, tmp_path):
    from sfumato.train.lora import (
        adapters_off,
        attach_adapters,
        detach_adapters,
        diffusion_loss,
        target_names,
    )

    base = unet_output(model)
    roots = {"unet": model.unet}
    attach_adapters(roots, {"unet": target_names(model.unet, ("to_k", "to_v"))}, rank=2, alpha=2, seed=0)
    try:
        with torch.no_grad():
            for name, param in model.unet.named_parameters():
                if "lora_B" in name:
                    param.fill_(0.1)
        assert (unet_output(model) - base).abs().max() > 1e-3  # the adapters change the output...
        with adapters_off(roots):
            torch.testing.assert_close(unet_output(model), base)  # ...except while they are off
        assert (unet_output(model) - base).abs().max() > 1e-3

        latents, hidden = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)

        def own_prediction(noisy, t):
            with torch.no_grad():
                return torch.tensor([True, True]), model.unet(noisy, t, encoder_hidden_states=hidden).sample

        assert diffusion_loss(model, latents, hidden, torch.Generator().manual_seed(3), base_target=own_prediction) == 0
    finally:
        detach_adapters(roots)

    images, reg = write_images(tmp_path / "images", count=2), write_images(tmp_path / "reg", count=2)
    out = train_lora(model, TrainConfig(images=images, reg_images=reg, reg_target="model", reg_caption_dropout=0.5,
                                        train_text_encoder=True, out=tmp_path / "m.safetensors", steps=2,
                                        batch_size=4, progress=False))
    assert read(out)[1]["ss_num_reg_images"] == "2"
    torch.testing.assert_close(unet_output(model), base)  # and the model is left as it was


def test_learned_word_is_bundled_as_a1111_reads_it_and_leaves_the_encoder_as_it_was(model, tmp_path):
    embedding = model.text_encoders[0].get_input_embeddings().weight
    before = embedding.detach().clone()
    out = train_lora(model, TrainConfig(images=write_images(tmp_path / "images", count=2), out=tmp_path / "w.safetensors",
                                        steps=3, lr=1e-2, rank=2, words=("star",), progress=False))
    tensors, _ = read(out)
    [star] = model.tokenizers[0]("star", add_special_tokens=False).input_ids
    vectors = tensors["bundle_emb.star.string_to_param.*"]
    assert vectors.shape == (1, embedding.shape[1])
    assert (vectors[0] - before[star]).abs().max() > 1e-4  # learned
    assert not any(k.startswith("lora_te_") for k in tensors)  # the word only, not the encoder's layers
    assert torch.equal(model.text_encoders[0].get_input_embeddings().weight, before)
    stack = LoraStack(model)  # and sfumato reads it back as the word's rows
    stack.activate([(str(out), 1.0, 1.0)])
    torch.testing.assert_close(model.text_encoders[0].get_input_embeddings().weight[star], vectors[0])
    stack.remove_all()
    assert torch.equal(model.text_encoders[0].get_input_embeddings().weight, before)


@pytest.mark.parametrize("words, message", [(("hexagon",), "appears in none"), (("",), "not blank")])
def test_learned_word_must_be_in_the_captions(model, tmp_path, words, message):
    with pytest.raises(LoraError, match=message):
        train_lora(model, TrainConfig(images=write_images(tmp_path / "images", count=2), out=tmp_path / "w.safetensors",
                                      steps=1, words=words, progress=False))
