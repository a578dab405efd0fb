"""The trainers' data: rendered scene pools, per-step batches, captions and token ids.

Everything random here is keyed by (seed, step, ...) rather than drawn from global state, so a
resumed run sees the very batches an uninterrupted one would.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import random
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from sfumato.errors import SfumatoError

EVAL_SEED_OFFSET = 1_000_003  # eval scenes come from another stream than training scenes


def hash_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integer keys (numpy's SeedSequence: nearby keys, unrelated seeds)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)


# ----------------------------------------------------------------------------- rendered pools

@dataclass(frozen=True)
class SceneMix:
    """Which scenes a pool holds. grid: objects moved onto a grid x grid lattice
    (world.scenes.snap_to_grid); simple_share: about that share of the scenes are simple ones
    (world.scenes.is_simple) instead, on one of simple_backgrounds (default: any plain colour), of
    simple_objects objects (2: a lined-up pair, world.scenes.sample_simple_scene); pair_share: about
    that share of the others are two different objects lined up (world.scenes.sample_pair_scene),
    whose captions mostly name a relation."""

    grid: int = 0
    simple_share: float = 0.0
    simple_backgrounds: tuple[str, ...] = ()
    pair_share: float = 0.0
    simple_objects: int = 1

    @classmethod
    def of_recipe(cls, data: dict) -> SceneMix:
        for key in ("simple_share", "pair_share"):
            if not 0 <= data.get(key, 0.0) <= 1:
                raise SfumatoError(f"data.{key} is {data[key]!r}; allowed: a share of the scenes, from 0 to 1")
        if data.get("simple_objects", 1) not in (1, 2):
            raise SfumatoError(f"data.simple_objects is {data['simple_objects']!r}; allowed: 1 (one object) "
                               "or 2 (a lined-up pair)")
        return cls(data.get("grid", 0), data.get("simple_share", 0.0), tuple(data.get("simple_backgrounds", ())),
                   data.get("pair_share", 0.0), data.get("simple_objects", 1))


def _render_range(args: tuple) -> list:
    """Scenes start..stop of stream `seed` (each depends only on (seed, index)), rendered into
    rows start..stop of the array file `path` (no pickling of gigabytes back to the parent)."""
    from sfumato.world import render

    seed, start, stop, split, size, path, n, mix = args
    scenes = _scenes(seed, range(start, stop), split, mix)
    rows = np.memmap(path, np.uint8, "r+", shape=(n, size, size, 3))
    for i, scene in enumerate(scenes):
        rows[start + i] = render(scene, size)
    rows.flush()
    return scenes


def _scene(seed: int, index: int, split: str, mix: SceneMix):
    """Scene `index` of the stream; with probability simple_share (decided by its own rng) a simple
    one, else with probability pair_share a lined-up pair."""
    from sfumato.world.scenes import sample_pair_scene, sample_scene, sample_simple_scene, scene_rng

    rng = scene_rng(seed, index)
    if mix.simple_share and rng.random() < mix.simple_share:
        return sample_simple_scene(rng, split, mix.simple_backgrounds, mix.simple_objects)
    if mix.pair_share and rng.random() < mix.pair_share:
        return sample_pair_scene(rng, split)
    return sample_scene(rng, split)


def _scenes(seed: int, indices: range, split: str, mix: SceneMix) -> list:
    from sfumato.world.scenes import snap_to_grid

    scenes = [_scene(seed, i, split, mix) for i in indices]
    return [snap_to_grid(scene, mix.grid) for scene in scenes] if mix.grid else scenes


def render_pool(seed: int, n: int, split: str, size: int, workers: int = 0,
                mix: SceneMix = SceneMix()) -> tuple[np.ndarray, list]:
    """Scenes 0..n-1 of `split` (of the given mix) and their images, (n, size, size, 3) uint8, by a
    process pool.

    Rendering once into memory keeps a GPU fed: a training step only gathers rows.
    """
    from sfumato.world import render

    workers = workers or len(os.sched_getaffinity(0))
    if workers <= 1 or n < 1024:
        scenes = _scenes(seed, range(n), split, mix)
        return np.stack([render(scene, size) for scene in scenes]), scenes
    # A file, not /dev/shm: containers often give shared memory only a few MB.
    with tempfile.TemporaryDirectory(prefix="sfumato-render-") as folder:
        path = os.path.join(folder, "pool.u8")
        np.memmap(path, np.uint8, "w+", shape=(n, size, size, 3)).flush()
        chunk = math.ceil(n / (workers * 4))
        jobs = [(seed, i, min(n, i + chunk), split, size, path, n, mix) for i in range(0, n, chunk)]
        # forkserver: a CUDA context in the parent must not be forked.
        with multiprocessing.get_context("forkserver").Pool(workers) as pool:
            scenes = [scene for part in pool.map(_render_range, jobs) for scene in part]
        images = np.array(np.memmap(path, np.uint8, "r", shape=(n, size, size, 3)))
    return images, scenes


def pixels_to_model(pixels: Tensor) -> Tensor:
    """(b, H, W, 3) uint8 -> (b, 3, H, W) float in [-1, 1], on the pixels' device."""
    return pixels.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_model_images(pixels: np.ndarray, device: torch.device) -> Tensor:
    return pixels_to_model(torch.from_numpy(np.ascontiguousarray(pixels)).to(device))


# ----------------------------------------------------------------------------- captions and tokens

CAPTION_STYLES = ("world", "plain")


def caption_style(name: str) -> str:
    if name not in CAPTION_STYLES:
        raise SfumatoError(f"unknown caption style {name!r}; allowed: {', '.join(CAPTION_STYLES)}")
    return name


def random_captions(scenes: list, seed: int, *keys: int, style: str = "world") -> list[str]:
    """A fresh caption of each scene: the same scene gets other words every epoch. style "plain":
    always the same words instead (world.captions.plain_caption; a curriculum's first stage)."""
    from sfumato.world.captions import caption, plain_caption

    if caption_style(style) == "plain":
        return [plain_caption(scene) for scene in scenes]
    return [caption(scene, random.Random(hash_seed(seed, *keys, i))) for i, scene in enumerate(scenes)]


def eval_captions(scenes: list, seed: int) -> list[str]:
    """One fixed caption per evaluation scene."""
    from sfumato.world import caption

    return [caption(scene, random.Random(f"eval/{seed}/{i}")) for i, scene in enumerate(scenes)]


def load_tokenizer():
    from sfumato.text import load_clip_tokenizer

    return load_clip_tokenizer()


def tokenize(tokenizer, captions: list[str]) -> Tensor:
    """(b, 77) token ids on the CPU, padded as SD1 pads (with <|endoftext|>)."""
    return tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


# ----------------------------------------------------------------------------- batches

class _StepBatches(torch.utils.data.Dataset):
    """Item `step` is the batch of that step: DataLoader workers build batches ahead of the GPU."""

    def __init__(self, make_batch: Callable[[int], dict]):
        self.make_batch = make_batch

    def __getitem__(self, step: int) -> dict:
        return self.make_batch(step)


def step_batches(make_batch: Callable[[int], dict], start: int, stop: int, *, workers: int,
                 device: torch.device) -> Iterator[dict]:
    """make_batch(start), ..., make_batch(stop - 1) built by `workers` processes, moved to `device`."""
    loader = torch.utils.data.DataLoader(
        _StepBatches(make_batch), batch_size=None, sampler=range(start, stop),
        num_workers=workers, pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None,
        # fork: workers share the rendered pool copy-on-write and never touch CUDA.
        multiprocessing_context="fork" if workers else None, persistent_workers=False)
    for batch in loader:
        yield {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}
