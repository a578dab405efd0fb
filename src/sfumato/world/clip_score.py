"""The adherence benchmark's CLIP score: how well an image matches its prompt, by the CLIP that this
project trained on the shapes world (the built-in model's clip/ and its text tower).

The same CLIP judges every model, whichever made the images (an SD checkpoint has no CLIP trained on
this world), so that scores compare across models, as the analyzer's do. The score is torchmetrics'
CLIPScore: 100 x max(cosine(image embedding, prompt embedding), 0). Unlike the analyzer's pass/fail
claims it moves a little with every improvement, and it judges nothing the prompt does not say, so a
negative prompt is not part of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sfumato.checkpoints import BUILTIN_MODEL

if TYPE_CHECKING:
    from PIL import Image


class ClipScorer:
    """`scorer(images, prompt)` -> a CLIP score per image, on the CPU (a ~4 M-parameter CLIP)."""

    def __init__(self, model_dir: str | Path = BUILTIN_MODEL):
        from sfumato.text import load_clip_tokenizer
        from sfumato.train.assemble import load_clip

        self.clip = load_clip(model_dir).float()
        self.tokenizer = load_clip_tokenizer()
        self.size = self.clip.config.vision_config.image_size

    def pixels(self, images: list[Image.Image]):
        """As the vision tower was trained: RGB at its size, in [-1, 1] (train/clip.py)."""
        import torch
        from PIL import Image

        from sfumato.train.data import to_model_images

        arrays = [np.asarray(im.convert("RGB").resize((self.size, self.size), Image.Resampling.BICUBIC))
                  for im in images]
        return to_model_images(np.stack(arrays), torch.device("cpu"))

    def __call__(self, images: list[Image.Image], prompt: str) -> list[float]:
        import torch

        from sfumato.train.clip import similarity
        from sfumato.train.data import tokenize

        with torch.no_grad():
            cosines = similarity(self.clip, self.pixels(images), tokenize(self.tokenizer, [prompt]))[:, 0]
        return [100 * max(float(c), 0.0) for c in cosines]
