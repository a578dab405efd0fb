"""`sfumato train vae|clip|unet|assemble|lora`: the built-in model from scratch, stage by stage."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import click

from sfumato.cli import LazyGroup
from sfumato.commands import user_errors


@click.group(cls=LazyGroup, lazy={"lora": "sfumato.train.lora:lora_command"})
def train() -> None:
    """Train the built-in model (VAE -> CLIP -> UNet -> assemble) on the shapes world."""


def stage_command(stage: str) -> Callable:
    """The options every trainer shares; the decorated function gets a ready `Run`."""

    def decorate(fn: Callable) -> click.Command:
        @train.command(stage, help=fn.__doc__)
        @click.option("--config", default=stage, show_default=True,
                      help="recipe: a name in sfumato/configs/train or a .toml path")
        @click.option("--out", required=True, type=click.Path(file_okay=False), help="output folder")
        @click.option("--resume", is_flag=True, help="continue from OUT/checkpoint.pt")
        @click.option("--init-from", type=click.Path(file_okay=False),
                      help="start from the weights of a model folder `sfumato train assemble` wrote "
                           "(fresh optimizer, step 0; the architecture must be the recipe's)")
        @click.option("--max-minutes", type=float, help="stop cleanly (saving) after this wall time")
        @click.option("--steps", type=int, help="override the recipe's number of steps")
        @click.option("--batch-size", type=int, help="override the recipe's global batch size")
        @click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="override the recipe's peak learning rate (a continuation "
                                               "from --init-from usually wants less than from scratch)")
        @click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
        @functools.wraps(fn)
        @user_errors
        def command(config, out, resume, init_from, max_minutes, steps, batch_size, lr, device, **extra) -> None:
            from sfumato.train.common import start_run

            overrides = {"steps": steps, "batch_size": batch_size, "lr": lr}
            run = start_run(config, out, resume=resume, max_minutes=max_minutes, overrides=overrides,
                            device=device, init_from=init_from)
            metrics = fn(run, **extra)
            if run.is_main:
                shown = {k: v for k, v in metrics.items() if k not in ("loss_curve", "recipe")}
                click.echo(f"{stage}: " + json.dumps(shown))

        return command

    return decorate


@stage_command("vae")
def vae(run) -> dict:
    """Train the VAE (128x128 RGB <-> 16x16x4 latents); writes OUT/vae."""
    from sfumato.train.vae import train_vae

    return train_vae(run)


@click.option("--lock-text", type=click.Path(exists=True, file_okay=False),
              help="load the text tower from DIR/text_encoder (a UNet run that tuned it, or a model folder) and "
                   "keep it frozen: the vision tower and projections learn to match it")
@stage_command("clip")
def clip(run, lock_text: str | None) -> dict:
    """Train CLIP (text + vision towers, contrastive); writes OUT/clip and OUT/text_encoder."""
    from sfumato.train.clip import train_clip

    return train_clip(run, Path(lock_text) if lock_text else None)


@click.option("--vae", "vae_dir", required=True, type=click.Path(exists=True), help="VAE stage output")
@click.option("--clip", "clip_dir", required=True, type=click.Path(exists=True), help="CLIP stage output")
@stage_command("unet")
def unet(run, vae_dir: str, clip_dir: str) -> dict:
    """Train the UNet on cached VAE latents, conditioned on the frozen CLIP text encoder."""
    from sfumato.train.unet import train_unet

    return train_unet(run, Path(vae_dir), Path(clip_dir))


@train.command("assemble")
@click.option("--vae", "vae_dir", required=True, type=click.Path(exists=True))
@click.option("--clip", "clip_dir", required=True, type=click.Path(exists=True))
@click.option("--unet", "unet_dir", required=True, type=click.Path(exists=True))
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--hardware", default="", help="what it was trained on, for the model card")
@user_errors
def assemble(vae_dir: str, clip_dir: str, unet_dir: str, out: str, hardware: str) -> None:
    """Build the shipped diffusers-layout model folder (fp16 safetensors + MODEL_CARD.md)."""
    from sfumato.train.assemble import assemble_model

    summary = assemble_model(Path(vae_dir), Path(clip_dir), Path(unet_dir), Path(out), hardware=hardware)
    click.echo("assemble: " + json.dumps(summary))


if __name__ == "__main__":  # `python -m sfumato.train.cli` / `accelerate launch -m sfumato.train.cli`
    train()
