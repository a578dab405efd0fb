"""Where in the text encoder's output does a shape word, or a colour word, make a difference?

    python scripts/text_spread.py [MODEL ...] [--random]

For "a large red X on a white background" with each training shape as X, and "a large C star on a
white background" with each colour as C, prints at each token position how far the prompts' hidden
states lie from their mean (the states the UNet's cross-attention reads), beside the states' norm.
`--random` adds a text encoder of the first model's size at random weights: what an encoder that
learnt nothing about the words would give. Session 17 found the contrastive CLIP spreading colours
through the whole sequence (2.5x a random encoder) and shapes over less than a random encoder does.
"""

from __future__ import annotations

import argparse

import sfumato  # noqa: F401  # isort: skip  (before torch: idle OpenMP threads then sleep, read at its import)
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from sfumato.checkpoints import BUILTIN_MODEL
from sfumato.train.data import load_tokenizer, tokenize
from sfumato.world import COLORS, vocabulary

POSITIONS = 12  # BOS and the prompt's ten tokens, then padding


@torch.inference_mode()
def spread_by_position(encoder, tokenizer, prompts: list[str]) -> tuple[list[float], list[float]]:
    """Per token position: the mean distance of the prompts' states from their mean, and that mean's norm."""
    states = encoder(tokenize(tokenizer, prompts)).last_hidden_state[:, :POSITIONS].float()
    centre = states.mean(0)
    return (states - centre).norm(dim=-1).mean(0).tolist(), centre.norm(dim=-1).tolist()


def report(name: str, encoder, tokenizer) -> None:
    shapes = [f"a large red {shape} on a white background" for shape in vocabulary("train")[0]]
    colours = [f"a large {colour} star on a white background" for colour in COLORS]
    shape_spread, norm = spread_by_position(encoder, tokenizer, shapes)
    colour_spread, _ = spread_by_position(encoder, tokenizer, colours)
    print(name)
    for label, row in (("shape swapped", shape_spread), ("colour swapped", colour_spread), ("state norm", norm)):
        print(f"  {label:>15}: " + " ".join(f"{x:5.2f}" for x in row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=[str(BUILTIN_MODEL)])
    parser.add_argument("--random", action="store_true", help="also a text encoder at random weights")
    args = parser.parse_args()
    tokenizer = load_tokenizer()
    print(f"token positions 0..{POSITIONS - 1} (0 is BOS; the colour word is at 3, the shape word at 4)")
    for model in args.models:
        report(model, CLIPTextModel.from_pretrained(model, subfolder="text_encoder").eval(), tokenizer)
    if args.random:
        torch.manual_seed(0)
        config = CLIPTextConfig.from_pretrained(args.models[0], subfolder="text_encoder")
        report("random weights", CLIPTextModel(config).eval(), tokenizer)


if __name__ == "__main__":
    main()
