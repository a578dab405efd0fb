"""`sfumato world ...` (export, show) and `sfumato bench render`."""

from __future__ import annotations

import os
import textwrap
import time
from pathlib import Path

import click
import numpy as np

from sfumato.commands import user_errors
from sfumato.world.scenes import SPLITS, sample_scenes


@click.group()
def world() -> None:
    """The shapes world: a procedurally drawn, captioned training set."""


@world.command()
@click.option("--n", "count", type=click.IntRange(1), default=30, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--split", type=click.Choice(SPLITS), default="train", show_default=True)
@click.option("--size", type=click.IntRange(16, 2048), default=128, show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True)
@click.option("--concept", default=None,
              help="only scenes showing this held-out concept (e.g. hexagon, checkered) and no other")
@user_errors
def export(count: int, seed: int, split: str, size: int, out_dir: str, concept: str | None) -> None:
    """Write N images + same-named .txt captions into a folder (for LoRA trainers)."""
    from sfumato.world.dataset import export_folder

    paths = export_folder(out_dir, count, seed, split, size, concept)
    click.echo(f"wrote {len(paths)} images and captions to {out_dir}")


def contact_sheet(seed: int, count: int, split: str, size: int, columns: int = 4) -> np.ndarray:
    """A grid of images of the stream (seed, split), each with its caption underneath."""
    from PIL import Image, ImageDraw

    from sfumato.world.dataset import make_item

    cell_w, text_h = max(size, 160), 52
    rows = -(-count // columns)
    sheet = Image.new("RGB", (columns * cell_w, rows * (size + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for index in range(count):
        image, text, _ = make_item(seed, index, split, size)
        left, top = (index % columns) * cell_w, (index // columns) * (size + text_h)
        sheet.paste(Image.fromarray(image), (left, top))
        lines = textwrap.wrap(text, width=cell_w // 6)[:4]
        draw.multiline_text((left + 2, top + size + 1), "\n".join(lines), fill="black", spacing=1)
    return np.asarray(sheet)


@world.command()
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--n", "count", type=click.IntRange(1, 256), default=16, show_default=True)
@click.option("--split", type=click.Choice(SPLITS), default="train", show_default=True)
@click.option("--size", type=click.IntRange(16, 512), default=128, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), required=True)
def show(seed: int, count: int, split: str, size: int, out: str) -> None:
    """Save a contact sheet of N scenes with their captions."""
    from sfumato.files import write_bytes_atomic
    from sfumato.world.dataset import png_bytes

    write_bytes_atomic(Path(out), png_bytes(contact_sheet(seed, count, split, size)))
    click.echo(f"wrote {out}")


def render_speed(size: int, count: int, seed: int = 0) -> float:
    """Images per second rendering `count` train scenes at `size` px (scene sampling excluded)."""
    from sfumato.world.render import render

    scenes = sample_scenes(seed, count)
    render(scenes[0], size)  # warm the background cache
    start = time.perf_counter()
    for scene in scenes:
        render(scene, size)
    return count / (time.perf_counter() - start)


@click.command("render")
@click.option("--n", "count", type=click.IntRange(10), default=2000, show_default=True)
def render_bench_command(count: int) -> None:
    """Rendering speed (images/s) at 64 and 128 px, one process on one core."""
    if hasattr(os, "sched_setaffinity"):  # measure one core even where numpy could use more
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    for size in (64, 128):
        click.echo(f"render {size:>3} px: {render_speed(size, count):8.0f} images/s")
