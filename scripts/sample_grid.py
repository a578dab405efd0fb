"""Render the README's sample grid: the built-in model on a few prompts, each prompt under its image.

    python scripts/sample_grid.py docs/samples.png [--model DIR] [--seed 1] [--steps 20] [--cfg 7]
"""

from __future__ import annotations

import argparse
import textwrap

from PIL import Image, ImageDraw, ImageFont

import sfumato

PROMPTS = [
    "a red star above a blue circle under a night sky",
    "a yellow heart on a green background",
    "two orange triangles",
    "a striped purple square",
    "a white ring to the left of a black cross",
    "a large blue diamond in a grassy field",
    "three small pink circles",
    "a dotted cyan heart in a clear blue sky",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out")
    parser.add_argument("--model")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=7.0)
    args = parser.parse_args()

    pipe = sfumato.load(args.model)
    images = [pipe.generate(prompt=p, seed=args.seed, steps=args.steps, cfg_scale=args.cfg)[0].image
              for p in PROMPTS]
    size, caption_height, columns = images[0].width, 44, 4
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * size, rows * (size + caption_height)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for i, (image, prompt) in enumerate(zip(images, PROMPTS, strict=True)):
        x, y = (i % columns) * size, (i // columns) * (size + caption_height)
        sheet.paste(image, (x, y))
        lines = textwrap.wrap(prompt, width=size // 6)
        draw.multiline_text((x + 3, y + size + 2), "\n".join(lines[:3]), fill="black", font=font)
    sheet.save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
