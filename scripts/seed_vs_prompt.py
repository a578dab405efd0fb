"""Which decides a picture at the start of sampling, the seed or the prompt?

    python scripts/seed_vs_prompt.py [MODEL] [--seeds 8]

At the first step (t = 999) the UNet's estimate of the final image, x0, should depend on the
prompt alone: pure noise holds no picture. A noise schedule that leaves some signal at t = 999
(SD's keeps sqrt(alpha_bar) = 0.07) teaches the model to read a picture off the noise, and then
the seed decides and the prompt barely matters. Prints the share of x0's variance explained by
the seed and by the prompt, over a grid of seeds x prompts; then the same split of the finished
latents (20 steps of the default sampler, CFG 7): what decides the picture a user gets.
"""

from __future__ import annotations

import argparse

import sfumato  # isort: skip  (before torch: it makes idle OpenMP threads sleep, read at torch's import)
import torch

from sfumato.train.data import load_tokenizer, tokenize

PROMPTS = ["a picture of four triangles", "one red square", "a single yellow heart on green",
           "three blue circles", "a white star above a purple ring", "two crosses on a grey background"]


@torch.inference_mode()
def x0_at_the_first_step(pipe, seeds: int) -> torch.Tensor:
    """(seeds, prompts, c, h, w): the model's x0 estimate from pure noise at t = 999."""
    unet, text_encoder, model = pipe.model.unet, pipe.model.text_encoders[0], pipe.model
    context = text_encoder(tokenize(load_tokenizer(), PROMPTS)).last_hidden_state
    size = unet.config.sample_size
    noise = torch.randn(seeds, unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    x = noise.repeat_interleave(len(PROMPTS), 0)
    out = unet(x.to(unet.dtype), torch.full((len(x),), 999), context.repeat(seeds, 1, 1).to(unet.dtype)).sample.float()
    alpha_bar = model.alphas_cumprod[-1].float()
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    x0 = a * x - s * out if model.prediction_type == "v_prediction" else (x - s * out) / a
    return x0.reshape(seeds, len(PROMPTS), *x0.shape[1:])


@torch.inference_mode()
def final_latents(pipe, seeds: int) -> torch.Tensor:
    """(seeds, prompts, c, h, w): the latents a whole generation ends with (before the VAE)."""
    from sfumato.params import GenerationParams

    size = pipe.model.default_size
    rows = [[pipe.sample_latents(params := GenerationParams(prompt, seed=seed, steps=20, cfg_scale=7.0).validated(),
                                 params.prompt, params.negative_prompt, size, size)[0]
             for prompt in PROMPTS] for seed in range(seeds)]
    return torch.stack([torch.stack(row) for row in rows]).float()


def variance_shares(x0: torch.Tensor) -> tuple[float, float]:
    """Shares of the total variance explained by the seed (axis 0) and by the prompt (axis 1)."""
    mean = x0.mean((0, 1), keepdim=True)
    total = (x0 - mean).pow(2).mean()
    by_seed = (x0.mean(1, keepdim=True) - mean).pow(2).mean() / total
    by_prompt = (x0.mean(0, keepdim=True) - mean).pow(2).mean() / total
    return by_seed.item(), by_prompt.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default=None, help="model folder or file; default: built-in")
    parser.add_argument("--seeds", type=int, default=8)
    args = parser.parse_args()
    pipe = sfumato.load(args.model, device="cpu")
    by_seed, by_prompt = variance_shares(x0_at_the_first_step(pipe, args.seeds))
    print(f"{pipe.model.name}: x0 at t=999, share of variance explained by the seed {by_seed:.2f}, "
          f"by the prompt {by_prompt:.2f} ({args.seeds} seeds x {len(PROMPTS)} prompts)")
    by_seed, by_prompt = variance_shares(final_latents(pipe, args.seeds))
    print(f"{pipe.model.name}: finished latents (20 steps, CFG 7), explained by the seed {by_seed:.2f}, "
          f"by the prompt {by_prompt:.2f}")


if __name__ == "__main__":
    main()
