import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sfumato.errors import ParamError
from sfumato.text import TextEncoder, load_clip_tokenizer, tokenize_prompt

# Token ids published with other CLIP tokenizers (OpenAI's BPE; Apple's ml-stable-diffusion tests).
KNOWN_IDS = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "a photo of an astronaut riding a horse on mars":
        [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407],
    "Apple CoreML developer tools on a Macbook Air are fast":
        [49406, 3055, 19622, 5780, 10929, 5771, 525, 320, 20617, 1922, 631, 1953, 49407],
    "it's a cat's toy, running   fast": [49406, 585, 568, 320, 2368, 568, 5988, 267, 2761, 1953, 49407],
    "2 dogs and 3 cats": [49406, 273, 3255, 537, 274, 3989, 49407],
    "": [49406, 49407],
}


def tiny_config(hidden: int = 32, projection: int = 16) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=projection,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    )


@pytest.fixture(scope="module")
def tokenizer():
    return load_clip_tokenizer()


def tiny_clip(config: CLIPTextConfig, cls=CLIPTextModel):
    model = cls(config).eval()
    # A fresh LayerNorm has weight 1 and bias 0, so its outputs average exactly 0 and the mean
    # that weighting restores would be 0/0; trained encoders have learned affine parameters.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.1, 0.2)
    return model


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return tiny_clip(tiny_config())


@pytest.fixture(scope="module")
def sd1(tokenizer, clip):
    return TextEncoder([tokenizer], [clip], "sd1")


def padded_ids(tokenizer, prompt: str) -> torch.Tensor:
    return tokenizer(prompt, padding="max_length", max_length=77, truncation=True,
                     return_tensors="pt").input_ids


def words(n: int) -> str:
    """A prompt of exactly n tokens, without commas."""
    return " ".join(["cat"] * n)


@pytest.mark.parametrize(("text", "ids"), KNOWN_IDS.items())
def test_tokenizer_gives_clip_ids(tokenizer, text, ids):
    assert tokenizer(text).input_ids == ids


def test_tokenizer_vocabulary_and_padding():
    default, sd2 = load_clip_tokenizer(), load_clip_tokenizer(pad_token="!")
    assert len(default) == 49408 and default.model_max_length == 77
    assert (default.bos_token_id, default.eos_token_id, default.pad_token_id) == (49406, 49407, 49407)
    assert sd2.pad_token_id == 0
    assert padded_ids(sd2, "a cat")[0, :5].tolist() == [49406, 320, 2368, 49407, 0]


def test_long_prompt_is_split_into_75_token_chunks(tokenizer, sd1):
    chunks = tokenize_prompt(tokenizer, words(200))
    assert [len(c.tokens) for c in chunks] == [75, 75, 50]
    cond = sd1.encode([words(200), ""])
    assert cond.hidden.shape == (2, 3 * 77, 32)
    assert cond.pooled is None and cond.time_ids is None


def test_chunk_ends_at_a_comma_near_its_end(tokenizer):
    # A comma as the 71st token: the chunk ends there and the 4 words after it move on.
    chunks = tokenize_prompt(tokenizer, words(70) + ", " + words(10))
    assert [len(c.tokens) for c in chunks] == [71, 10]
    assert chunks[0].tokens[-1] == tokenizer.convert_tokens_to_ids(",</w>")
    # A comma more than 20 tokens back is not used.
    chunks = tokenize_prompt(tokenizer, words(50) + ", " + words(30))
    assert [len(c.tokens) for c in chunks] == [75, 6]


def test_break_starts_a_new_chunk(tokenizer, sd1):
    assert [len(c.tokens) for c in tokenize_prompt(tokenizer, "a cat BREAK a dog")] == [2, 2]
    assert len(tokenize_prompt(tokenizer, "a cat BREAK")) == 1
    split = sd1.encode(["a cat BREAK a dog"]).hidden
    assert split.shape == (1, 2 * 77, 32)
    assert torch.allclose(split[:, :77], sd1.encode(["a cat"]).hidden)


def test_empty_prompt_encodes_the_empty_string(tokenizer, clip, sd1):
    with torch.no_grad():
        expected = clip(padded_ids(tokenizer, "")).last_hidden_state
    assert torch.allclose(sd1.encode([""]).hidden, expected, atol=1e-6)


def test_weight_scales_its_token_and_keeps_the_mean(sd1):
    plain = sd1.encode(["a cat"]).hidden
    weighted = sd1.encode(["a (cat:1.5)"]).hidden
    # Every token is rescaled by the same factor to restore the mean, "cat" (position 2) also by 1.5.
    ratio = weighted / plain
    factor = ratio[0, 1, 0]
    assert torch.allclose(ratio[0, 2], 1.5 * factor, rtol=1e-4)
    assert torch.allclose(ratio[0, [0, 1, 3, 50]], factor, rtol=1e-4)
    assert weighted.mean().item() == pytest.approx(plain.mean().item(), rel=1e-4)
    assert not torch.allclose(weighted, plain)


def test_weights_do_not_depend_on_the_batch(sd1):
    alone = sd1.encode(["a (cat:1.3)"]).hidden
    batched = sd1.encode(["a (cat:1.3)", "[dog]", "a (cat:1.3)"]).hidden
    assert torch.allclose(batched[0], alone[0], atol=1e-6)
    assert torch.equal(batched[0], batched[2])


def test_clip_skip_selects_the_layer(tokenizer, clip, sd1):
    ids = padded_ids(tokenizer, "a photo of a cat")
    with torch.no_grad():
        out = clip(ids, output_hidden_states=True)
        # transformers 5 has the final layer norm on CLIPTextModel itself, 4.x under .text_model
        penultimate = getattr(clip, "text_model", clip).final_layer_norm(out.hidden_states[-2])
    assert torch.allclose(sd1.encode(["a photo of a cat"], clip_skip=2).hidden, penultimate, atol=1e-6)
    assert not torch.allclose(penultimate, out.last_hidden_state, atol=1e-3)
    for bad in (0, 3):
        with pytest.raises(ParamError, match="clip_skip"):
            sd1.encode(["a cat"], clip_skip=bad)


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_matches_diffusers_encode_prompt(clip, pad_token):
    torch.manual_seed(0)
    tokenizer = load_clip_tokenizer(pad_token)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, norm_num_groups=8,
    )
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=clip, tokenizer=tokenizer, unet=unet, scheduler=DDIMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    prompts = ["a photo of an astronaut riding a horse on mars", ""]
    # Only the default layer: diffusers 0.42's clip_skip path looks for CLIPTextModel.text_model,
    # which transformers 5 removed (test_clip_skip_selects_the_layer checks our clip skip).
    theirs, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    ours = TextEncoder([tokenizer], [clip], "sd1").encode(prompts).hidden
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_sdxl_concatenates_penultimate_states_and_pools_encoder_two():
    torch.manual_seed(0)
    first = tiny_clip(tiny_config(hidden=32))
    second = tiny_clip(tiny_config(hidden=48, projection=16), CLIPTextModelWithProjection)
    tok1, tok2 = load_clip_tokenizer(), load_clip_tokenizer(pad_token="!")
    sdxl = TextEncoder([tok1, tok2], [first, second], "sdxl")

    prompts = ["a red cube", words(100)]
    cond = sdxl.encode(prompts)
    assert cond.hidden.shape == (2, 2 * 77, 32 + 48)
    assert cond.pooled.shape == (2, 16)

    with torch.no_grad():
        out1 = first(padded_ids(tok1, prompts[0]), output_hidden_states=True)
        out2 = second(padded_ids(tok2, prompts[0]), output_hidden_states=True)
        long2 = second(padded_ids(tok2, words(75)))
    expected = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    assert torch.allclose(cond.hidden[:1, :77], expected, atol=1e-6)
    assert torch.allclose(cond.pooled[0], out2.text_embeds[0], atol=1e-6)
    # The pooled output of a long prompt comes from its first chunk.
    assert torch.allclose(cond.pooled[1], long2.text_embeds[0], atol=1e-6)
    # SDXL ignores clip skip, as A1111 does by default.
    assert torch.equal(sdxl.encode(prompts, clip_skip=2).hidden, cond.hidden)


def test_runs_in_the_encoder_dtype(tokenizer):
    torch.manual_seed(0)
    half = tiny_clip(tiny_config()).to(torch.bfloat16)
    hidden = TextEncoder([tokenizer], [half], "sd1").encode(["a (cat:1.2)"]).hidden
    assert hidden.dtype == torch.bfloat16 and torch.isfinite(hidden.float()).all()


def test_wrong_number_of_encoders_is_refused(tokenizer, clip):
    with pytest.raises(ValueError, match="sdxl"):
        TextEncoder([tokenizer], [clip], "sdxl")
