"""The training images of `sfumato train lora`: captions, checks, buckets, batches."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from sfumato.errors import LoraError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass
class Example:
    image: Path
    caption: str
    pixels: Tensor | None = field(default=None, repr=False)  # (3, h, w) in [-1, 1]
    prior: bool = False  # a regularization image (kohya's reg_data_dir), not one of the subject


# ----------------------------------------------------------------------------- data

def collect_examples(folder: Path, caption: str | None, trigger: str | None, prior: bool = False
                     ) -> list[Example]:
    """Every image of the folder with its caption; checks them all before any training.
    prior: the folder holds regularization images."""
    if not folder.is_dir():
        raise LoraError(f"image folder {folder} does not exist")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise LoraError(f"no images in {folder}; allowed: {', '.join(sorted(IMAGE_SUFFIXES))}")
    examples = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
        except (UnidentifiedImageError, OSError) as e:
            raise LoraError(f"cannot read image {path}: {e}") from None
        text = caption
        if text is None:
            caption_file = path.with_suffix(".txt")
            if not caption_file.is_file():
                option = "--reg-caption" if prior else "--caption"
                raise LoraError(f"image {path.name} has no caption file {caption_file.name}; "
                                f"add one per image or give {option} for all")
            text = caption_file.read_text(encoding="utf-8").strip()
        examples.append(Example(path, f"{trigger}, {text}" if trigger else text, prior=prior))
    return examples


def bucket_sizes(resolution: int, step: int) -> list[tuple[int, int]]:
    """(width, height) pairs of at most resolution^2 pixels, multiples of step, sides between
    resolution/2 and 2*resolution (kohya's buckets: 256..1024 at 512)."""
    low, high = max(step, resolution // 2 // step * step), resolution * 2
    sizes = set()
    for width in range(low, high + 1, step):
        height = min(resolution * resolution // width // step * step, high)
        if height >= low:
            sizes.add((width, height))
    return sorted(sizes)


def fit(image: Image.Image, size: tuple[int, int]) -> Tensor:
    """Scale to cover `size`, centre-crop, and return (3, h, w) in [-1, 1]."""
    width, height = size
    scale = max(width / image.width, height / image.height)
    resized = image.convert("RGB").resize((max(width, round(image.width * scale)),
                                           max(height, round(image.height * scale))),
                                          Image.Resampling.LANCZOS)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    array = np.asarray(resized.crop((left, top, left + width, top + height)), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1


def load_pixels(examples: list[Example], resolution: int, step: int, buckets: bool) -> None:
    sizes = bucket_sizes(resolution, step) if buckets else [(resolution, resolution)]
    for example in examples:
        with Image.open(example.image) as image:
            aspect = image.width / image.height
            size = min(sizes, key=lambda s: abs(math.log(s[0] / s[1] / aspect)))
            example.pixels = fit(image, size)


def epoch_batches(examples: list[Example], repeats: int, batch_size: int, seed: int, epoch: int
                  ) -> list[list[int]]:
    """Shuffled batches of example indices for one epoch; a batch holds one image size only.

    Regularization images, as kohya draws them: as many per epoch as subject images (with their
    repeats), cycling through the regularization set, so each batch holds about half of each."""
    rng = np.random.default_rng([seed, epoch])
    subject = np.repeat([i for i, e in enumerate(examples) if not e.prior], repeats)
    prior = rng.permutation([i for i, e in enumerate(examples) if e.prior]).astype(int)
    if len(prior):
        subject = np.concatenate([subject, np.resize(prior, len(subject))])
    by_size: dict[tuple, list[int]] = {}
    for i in rng.permutation(subject):
        by_size.setdefault(tuple(examples[i].pixels.shape), []).append(int(i))
    batches = [group[k:k + batch_size] for group in by_size.values()
               for k in range(0, len(group), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]
