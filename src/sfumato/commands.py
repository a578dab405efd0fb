"""`sfumato generate | info | export`: thin clients of the Python API."""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from sfumato.errors import SfumatoError


def user_errors(command):
    """Show a SfumatoError as one line on stderr and exit 2 (no traceback)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SfumatoError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)

    return wrapper


def parse_lora_option(value: str) -> tuple[str, float, float]:
    """'file.safetensors:0.8' or 'file:0.8:0.5' (text encoder, UNet) -> (path, te, unet)."""
    parts = value.rsplit(":", 2)
    numbers = []
    while len(parts) > 1 and re.fullmatch(r"-?\d+(\.\d+)?", parts[-1]):
        numbers.insert(0, float(parts.pop()))
    path = ":".join(parts)
    te = numbers[0] if numbers else 1.0
    unet = numbers[1] if len(numbers) > 1 else te
    return (path, te, unet)


# CLI option name -> GenerationParams field
OPTION_FIELDS = {
    "negative": "negative_prompt", "seed": "seed", "steps": "steps", "cfg": "cfg_scale",
    "width": "width", "height": "height", "sampler": "sampler", "scheduler": "scheduler",
    "batch": "batch_size", "clip_skip": "clip_skip", "strength": "denoising_strength",
}


@click.command()
@click.argument("prompt", required=False)
@click.option("--model", "-m", help="Checkpoint (.safetensors) or diffusers folder; default: built-in.")
@click.option("--vae", help="VAE weights that replace the model's own.")
@click.option("--negative", "-n", default="", help="Negative prompt.")
@click.option("--seed", "-s", type=int, default=-1, show_default=True, help="-1 = random.")
@click.option("--steps", type=int, default=20, show_default=True)
@click.option("--cfg", type=float, default=7.0, show_default=True, help="CFG scale (1 = off).")
@click.option("--width", "-W", type=int, default=0, help="Multiple of 8; 0 = model default.")
@click.option("--height", "-H", type=int, default=0, help="Multiple of 8; 0 = model default.")
@click.option("--sampler", default="DPM++ 2M", show_default=True)
@click.option("--scheduler", "--schedule", "scheduler", default="karras", show_default=True,
              help="normal | karras")
@click.option("--batch", "-b", type=int, default=1, show_default=True)
@click.option("--clip-skip", type=int, default=1, show_default=True)
@click.option("--lora", "loras", multiple=True, help="FILE[:weight[:unet_weight]], repeatable.")
@click.option("--lora-dir", type=click.Path(file_okay=False), help="Folder for <lora:name:w> tags.")
@click.option("--init-image", type=click.Path(dir_okay=False), help="img2img: start from this image.")
@click.option("--strength", type=float, default=0.75, show_default=True, help="img2img denoising strength.")
@click.option("--from", "from_png", type=click.Path(dir_okay=False),
              help="Re-create an image from the metadata of a PNG (ours or A1111's).")
@click.option("--out", "-o", default="outputs", show_default=True, type=click.Path(file_okay=False))
@click.option("--device", help="cpu | cuda | cuda:N | mps; default: best available.")
@click.option("--allow-pickle", is_flag=True, help="Allow .ckpt/.pt (loaded with weights_only=True).")
@click.option("--lever", "levers", multiple=True,
              help="Speed lever, repeatable: deepcache, tome (tome=RATIO: another ratio than 0.5), int8, "
                   "bf16 (lossy), compile; no-NAME turns one off (e.g. no-fp16_weights, on by default on "
                   "the CPU: half the memory).")
@click.option("--server", envvar="SFUMATO_SERVER",
              help="Send the job to a running `sfumato serve` (or any A1111 API) at this URL instead of "
                   "loading the model here: no imports or loading to wait for. --model then names one of "
                   "the server's models. Env: SFUMATO_SERVER.")
@click.option("--api-key", envvar="SFUMATO_API_KEY", help="With --server: its API key, if it asks for one.")
@click.pass_context
@user_errors
def generate(ctx: click.Context, prompt: str | None, model, vae, loras, lora_dir, init_image,
             from_png, out, device, allow_pickle, levers, server, api_key, **options) -> None:
    """Generate images from PROMPT and save them as PNGs with their parameters."""
    from sfumato.params import GenerationParams

    params = _params_from_png(from_png) if from_png else None
    png_levers = _levers_from_png(from_png) if from_png else []
    if params is None and prompt is None:
        raise SfumatoError("give a PROMPT (or --from IMAGE.png)")
    chosen = {OPTION_FIELDS[name]: value for name, value in options.items()
              if params is None or ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    if any(name.removeprefix("no-").partition("=")[0] == "tome" for name in levers):
        chosen["token_merging_ratio"] = None  # the command line's lever, not the PNG's ratio
    levers = (*png_levers, *levers)  # the lossy levers it was made with, unless the command line turns them off
    if prompt is not None:
        chosen["prompt"] = prompt
    chosen["loras"] = tuple(parse_lora_option(v) for v in loras)
    params = (params.__class__(**{**params.to_dict(), **chosen}) if params
              else GenerationParams(**chosen)).validated()
    init = _open_image(init_image) if init_image else None
    if server:
        others = [name for name in png_levers if name != "tome"]  # its ratio goes with the request
        if others:
            click.echo(f"note: {from_png} was made with the lever(s) {', '.join(others)}; the server "
                       "applies its own (`sfumato serve --lever ...`), so the picture may differ", err=True)
        _generate_on_server(ctx, server, api_key, params, init_image, model, vae, Path(out))
        quick_exit(ctx)
        return

    from sfumato.accel import Levers
    from sfumato.frozen import generate_once

    with _progress_bar(params.steps, "sampling") as progress:
        images = generate_once(model, params, vae=vae, device=device, allow_pickle=allow_pickle,
                               lora_dir=lora_dir, levers=Levers.parse(levers), init_image=init,
                               callback=progress)
    for result in images:
        path = _save(result, Path(out))
        click.echo(f"{path}  seed={result.seed}")
    quick_exit(ctx)


def quick_exit(ctx: click.Context) -> None:
    """End a finished command's process now: run the exit handlers (logging's flush among them),
    then leave without the interpreter's teardown. That teardown frees torch's modules and
    libraries one by one, 0.5-1.3 s on the 2-core CPU here: up to a fifth of a whole built-in
    `sfumato generate`, spent on a process about to end. Every image is written and closed by then
    (atomically, files.py). Only the real command line does this (cli.main), not a CliRunner."""
    if not (ctx.find_root().obj or {}).get("quick_exit"):
        return
    atexit._run_exitfuncs()  # what Py_Finalize would run first; the rest is what we skip
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@contextlib.contextmanager
def _progress_bar(steps: int, desc: str) -> Iterator[Callable[..., None]]:
    """A tqdm bar and its callback, update(step, total, *rest): the pipeline's and the server's."""
    from tqdm import tqdm

    with tqdm(total=steps, desc=desc, unit="step", leave=False) as bar:
        def update(step: int, total: int, *_rest: Any) -> None:
            bar.total = total
            bar.update(step - bar.n)

        yield update


# Options that choose how this process runs a model: a server was started with its own.
LOCAL_OPTIONS = {"loras": "--lora", "lora_dir": "--lora-dir", "device": "--device",
                 "allow_pickle": "--allow-pickle", "levers": "--lever"}


def _generate_on_server(ctx: click.Context, url: str, api_key: str | None, params, init_image: str | None,
                        model: str | None, vae: str | None, out: Path) -> None:
    from sfumato.files import write_bytes_atomic
    from sfumato.remote import generate_remote

    for name, option in LOCAL_OPTIONS.items():
        if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE:
            raise SfumatoError(f"{option} is set where the server starts (`sfumato serve`), not with --server"
                               + (": name a LoRA of the server's folder with <lora:name:weight> in the prompt"
                                  if name == "loras" else ""))
    with _progress_bar(params.steps, f"sampling on {url}") as progress:
        try:
            images = generate_remote(url, params, init_png=Path(init_image).read_bytes() if init_image else None,
                                     model=model, vae=vae, api_key=api_key, on_progress=progress)
        except KeyboardInterrupt:  # the job is the server's now: say so rather than "Aborted!"
            click.echo(f"\nstopped waiting; the server goes on with the job and keeps its images "
                       f"(POST {url.rstrip('/')}/sdapi/v1/interrupt stops its current job)", err=True)
            sys.exit(130)
    for image in images:
        path = write_bytes_atomic(_next_path(out, image.seed), image.png)
        click.echo(f"{path}  seed={image.seed}")


def _params_from_png(path: str):
    from sfumato.metadata import params_from_png

    return params_from_png(path)


def _levers_from_png(path: str) -> list[str]:
    from sfumato.metadata import levers_from_png

    return levers_from_png(path)


def _open_image(path: str):
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError) as error:
        raise SfumatoError(f"--init-image {path}: not a readable image ({error})") from None


def _save(result, folder: Path) -> Path:
    """A1111-style names, NNNNN-SEED.png, never overwriting an earlier image."""
    from sfumato.metadata import save_png

    path = _next_path(folder, result.seed)
    return save_png(result.image, path, infotext=result.infotext, params=result.params.to_dict())


def _next_path(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    numbers = [int(m.group(1)) for p in folder.glob("*.png") if (m := re.match(r"(\d{5})-", p.name))]
    return folder / f"{max(numbers, default=-1) + 1:05d}-{seed}.png"


@click.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--allow-pickle", is_flag=True, help="Allow .ckpt/.pt (read with weights_only=True).")
@user_errors
def info(path: str, as_json: bool, allow_pickle: bool) -> None:
    """Describe a checkpoint: family, components, dtype, hashes."""
    from sfumato.checkpoints import describe

    facts = describe(path, allow_pickle=allow_pickle)
    if as_json:
        click.echo(json.dumps(facts, indent=2, default=str))
        return
    width = max(len(k) for k in facts)
    for key, value in facts.items():
        click.echo(f"{key:<{width}}  {_fact_text(value)}")


def _fact_text(value: Any) -> str:
    """One line of `sfumato info`: nested configs by name only (--json prints them whole)."""
    if not isinstance(value, dict):
        return str(value)
    return ", ".join(f"{k} ({', '.join(v)})" if isinstance(v, dict) else f"{k}: {v}" for k, v in value.items())


@click.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--half", is_flag=True, help="Store weights as fp16.")
@user_errors
def export(model_dir: str, out: str, half: bool) -> None:
    """Write a diffusers-format model as one .safetensors in SD's original key layout."""
    from sfumato.checkpoints import export_single_file

    export_single_file(Path(model_dir), Path(out), half=half)
    click.echo(out)
