"""Training data: an endless, seeded stream of rendered scenes and their captions.

Item i of a stream depends only on (seed, split, i). Worker w of W DataLoader workers yields
items w, w+W, w+2W, ...: each worker has its own deterministic part of the one stream, and
together they cover it without repeats whatever W is.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sfumato.errors import SfumatoError
from sfumato.files import write_bytes_atomic
from sfumato.world.captions import caption
from sfumato.world.render import render
from sfumato.world.scenes import SPLITS, Scene, held_out, sample_scene, scene_rng


def make_item(seed: int, index: int, split: str, size: int) -> tuple[np.ndarray, str, Scene]:
    """(uint8 image, caption, scene) of item `index` of the stream (seed, split)."""
    rng = scene_rng(seed, index)
    scene = sample_scene(rng, split)
    return render(scene, size), caption(scene, rng), scene


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1.0)


class ShapesDataset(torch.utils.data.IterableDataset):
    """Yields {"image": (3, H, W) float32 in [-1, 1], "caption": str, "scene": JSON str, "index": int}.

    length=None streams forever. cache_dir keeps each item as PNG + caption + scene JSON and
    reads it back next time: rendering is fast, so the cache is for big sizes and for
    inspecting exactly what a model was trained on.
    """

    def __init__(self, seed: int, size: int = 128, split: str = "train", length: int | None = None,
                 cache_dir: str | Path | None = None):
        super().__init__()
        if split not in SPLITS:
            raise SfumatoError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
        if size < 16:
            raise SfumatoError(f"image size {size} is too small; use 16 px or more")
        self.seed, self.size, self.split, self.length = seed, size, split, length
        self.cache_dir = Path(cache_dir) / f"{split}-seed{seed}-{size}px" if cache_dir else None

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        index = worker
        while self.length is None or index < self.length:
            yield self[index]
            index += workers

    def __getitem__(self, index: int) -> dict:
        image, text, scene = self._cached(index) if self.cache_dir else make_item(
            self.seed, index, self.split, self.size)
        return {"image": to_tensor(image), "caption": text, "scene": scene.to_json(), "index": index}

    def _cached(self, index: int) -> tuple[np.ndarray, str, Scene]:
        stem = self.cache_dir / f"{index:08d}"
        png, txt, js = (stem.with_suffix(s) for s in (".png", ".txt", ".json"))
        if png.exists() and txt.exists() and js.exists():
            image = np.array(Image.open(png).convert("RGB"))
            return image, txt.read_text(), Scene.from_json(js.read_text())
        image, text, scene = make_item(self.seed, index, self.split, self.size)
        write_bytes_atomic(js, scene.to_json().encode())
        write_bytes_atomic(txt, text.encode())
        write_bytes_atomic(png, png_bytes(image))  # written last: its presence means the item is whole
        return image, text, scene


def concepts_in(scene: Scene) -> set[str]:
    """The held-out concepts (shapes and patterns base training never sees) that a scene shows."""
    rules = held_out()
    return ({o.shape for o in scene.objects if o.shape in rules.concept_shapes}
            | {o.pattern for o in scene.objects if o.pattern in rules.concept_patterns})


def export_folder(out_dir: str | Path, n: int, seed: int = 0, split: str = "train",
                  size: int = 128, concept: str | None = None) -> list[Path]:
    """Write n images as 00000.png ... with same-named .txt captions (LoRA-trainer layout).

    concept: only scenes of the "concept" split that show this one held-out concept and no other,
    captioned with its name (the images to teach it with a LoRA)."""
    if split not in SPLITS:
        raise SfumatoError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    if concept is not None:
        rules = held_out()
        allowed = sorted(rules.concept_shapes | rules.concept_patterns)
        if concept not in allowed:
            raise SfumatoError(f"unknown concept {concept!r}; the held-out concepts are: {', '.join(allowed)}")
        split = "concept"
    out = Path(out_dir)
    paths: list[Path] = []
    index = 0
    while len(paths) < n:
        image, text, scene = make_item(seed, index, split, size)
        index += 1
        if concept is not None and (concepts_in(scene) != {concept} or concept not in text):
            continue
        path = out / f"{len(paths):05d}.png"
        write_bytes_atomic(path.with_suffix(".txt"), text.encode())
        write_bytes_atomic(path, png_bytes(image))
        paths.append(path)
    return paths
