"""Does a decoder draw patterns nobody asked for? The share of objects found patterned, prompts naming none.

    python scripts/unasked_patterns.py [MODEL ...] [--prompts 32] [--seeds 2]

A VAE that can draw a pattern may also draw it where the UNet's latents are only imperfect (session 26's
codec VAE shows a faint texture on some large plain objects). This asks each model for one large object or
three of a kind, naming a colour and a shape but no pattern (default sampler, 20 steps, CFG 7), and prints
the patterns the analyzer finds on the objects it detects: patterned ones are drawn unasked.
"""

from __future__ import annotations

import argparse
import collections
import random

import sfumato
from sfumato.world import vocabulary
from sfumato.world.analyzer import detect
from sfumato.world.scenes import COLORS


def plain_prompts(n: int) -> list[str]:
    """n prompts of one large object (three quarters) or three of a kind, colour and training shape named."""
    rng, shapes = random.Random("unasked-patterns"), vocabulary("train")[0]
    prompts = []
    for i in range(n):
        color, shape = rng.choice(list(COLORS)), rng.choice(shapes)
        prompts.append(f"three {color} {shape}s" if i % 4 == 3 else f"a large {color} {shape}")
    return prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="model folders or files (default: the built-in model)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=2, help="images per prompt")
    args = parser.parse_args()
    for model in args.models or [None]:
        pipe, found = sfumato.load(model, device="cpu"), collections.Counter()
        for index, prompt in enumerate(plain_prompts(args.prompts)):
            for result in pipe.generate(prompt=prompt, seed=index, steps=20, cfg_scale=7, batch_size=args.seeds):
                found.update(d.pattern for d in detect(result.image)[1])
        total = sum(found.values())
        share = 1 - found["plain"] / total if total else float("nan")
        print(f"{model or 'built-in'}: {total} objects, patterned {share:.3f} {dict(found)}")


if __name__ == "__main__":
    main()
