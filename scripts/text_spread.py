"""Where in the text encoder's output does a shape, colour, relation or number word make a difference?

    python scripts/text_spread.py [MODEL ...] [--random]

For "a large red X on a white background" with each training shape as X, and "a large C star on a
white background" with each colour as C, prints at each token position how far the prompts' hidden
states lie from their mean (the states the UNet's cross-attention reads), beside the states' norm; the
same for "a red circle to the left|right of a blue square", "a red circle above|below a blue square"
and "N red circles on a white background" (N two, three, four).
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
from sfumato.world.captions import NUMBERS

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
    sides = [f"a red circle to the {side} of a blue square" for side in ("left", "right")]
    heights = [f"a red circle {where} a blue square" for where in ("above", "below")]
    numbers = [f"{n} red circles on a white background" for n in NUMBERS.values()]
    rows = {"shape swapped": shape_spread, "colour swapped": colour_spread,
            "left/right": spread_by_position(encoder, tokenizer, sides)[0],
            "above/below": spread_by_position(encoder, tokenizer, heights)[0],
            "number": spread_by_position(encoder, tokenizer, numbers)[0], "state norm": norm}
    print(name)
    for label, row in rows.items():
        print(f"  {label:>15}: " + " ".join(f"{x:5.2f}" for x in row))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=[str(BUILTIN_MODEL)])
    parser.add_argument("--random", action="store_true", help="also a text encoder at random weights")
    args = parser.parse_args()
    tokenizer = load_tokenizer()
    print(f"token positions 0..{POSITIONS - 1} (0 is BOS; the colour word is at 3, the shape word at 4, "
          "left/right at 6, above/below at 4, the number at 1)")
    for model in args.models:
        report(model, CLIPTextModel.from_pretrained(model, subfolder="text_encoder").eval(), tokenizer)
    if args.random:
        torch.manual_seed(0)
        config = CLIPTextConfig.from_pretrained(args.models[0], subfolder="text_encoder")
        report("random weights", CLIPTextModel(config).eval(), tokenizer)


if __name__ == "__main__":
    main()
