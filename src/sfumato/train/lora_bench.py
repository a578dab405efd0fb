"""`sfumato bench lora switch|teach`: how fast LoRA sets switch, and whether training teaches.

switch: ms per activate() for ~10 MB kohya LoRAs on SD1.5-sized UNet + text-encoder layers
        (weights uninitialised: only the shapes matter for the timing).
teach:  export the shapes world's held-out "concept" split (shapes/patterns the built-in model
        never saw), train a LoRA on it within a time budget, and score the adherence suite's
        "concept" prompts before and after.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import click
import torch

from sfumato.commands import user_errors

SD15_TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77)
KOHYA_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2",
                      "proj_in", "proj_out")  # kohya's default: the transformer blocks' layers
KOHYA_TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def sd15_shaped_model():
    """SD1.5's UNet and CLIP-L text encoder built without initialising their weights."""
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)
        text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
    unet, text = unet.to_empty(device="cpu"), text.to_empty(device="cpu")
    with torch.no_grad():  # real memory, values irrelevant: zeros keep it free of NaNs
        for param in [*unet.parameters(), *text.parameters()]:
            param.zero_()
    return SimpleNamespace(family="sd1", unet=unet, text_encoders=[text])


def random_kohya_lora(model, path: Path, megabytes: float, seed: int) -> int:
    """A kohya file over kohya's default layers, its rank chosen to weigh ~megabytes in fp16."""
    from safetensors.torch import save_file

    from sfumato.lora_formats import canonical_path

    layers = [("lora_unet_", "unet", n, m) for n, m in model.unet.named_modules()
              if n.endswith(KOHYA_UNET_TARGETS)]
    layers += [("lora_te_", "text_encoder", n, m) for n, m in model.text_encoders[0].named_modules()
               if n.endswith(KOHYA_TE_TARGETS)]
    per_rank = sum(m.weight.shape[0] + m.weight[0].numel() for *_, m in layers) * 2  # fp16 bytes
    rank = max(1, round(megabytes * 1e6 / per_rank))
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for prefix, component, name, module in layers:
        key = prefix + canonical_path(component, name).replace(".", "_")
        out_dim, in_shape = module.weight.shape[0], module.weight.shape[1:]
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, *in_shape, generator=gen).half()
        tensors[f"{key}.lora_up.weight"] = torch.randn(out_dim, rank, *[1] * (len(in_shape) - 1),
                                                       generator=gen).half() * 0.01
        tensors[f"{key}.alpha"] = torch.tensor(float(rank)).half()
    save_file(tensors, str(path))
    return rank


def switch_report(megabytes: float = 10.0, rounds: int = 3) -> dict:
    from sfumato.lora import LoraStack, switch_timing

    model = sd15_shaped_model()
    with tempfile.TemporaryDirectory() as folder:
        rank = random_kohya_lora(model, Path(folder) / "a.safetensors", megabytes, seed=0)
        random_kohya_lora(model, Path(folder) / "b.safetensors", megabytes, seed=1)
        stack = LoraStack(model, lora_dir=folder)
        start = time.perf_counter()
        stack.activate([("a", 1.0, 1.0)])
        first = (time.perf_counter() - start) * 1000
        switches = switch_timing(stack, [[("b", 1.0, 1.0)], [("a", 1.0, 1.0)]], rounds)
        removals = switch_timing(stack, [[], [("a", 1.0, 1.0)]], rounds)[::2]
        size = (Path(folder) / "a.safetensors").stat().st_size / 1e6
    return {"lora_mb": round(size, 1), "rank": rank, "layers": stack.reports["a"].layers,
            "first_activate_ms (read+hash+merge)": round(first, 1),
            "switch_ms_median (A->B, files cached)": round(statistics.median(switches), 1),
            "remove_all_ms_median": round(statistics.median(removals), 1),
            "threads": torch.get_num_threads()}


@click.group("lora")
def lora_bench_command() -> None:
    """LoRA benchmarks: switching speed, and teaching the held-out concept."""


@lora_bench_command.command("switch")
@click.option("--mb", "megabytes", default=10.0, show_default=True, help="size of each LoRA file")
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(min=1))
def switch_command(megabytes: float, rounds: int) -> None:
    """ms to switch between two ~10 MB LoRAs on SD1.5-sized layers (CPU, fp32 weights)."""
    click.echo(json.dumps(switch_report(megabytes, rounds)))


def concept_score(pipe, images_per_prompt: int, steps: int, limit: int | None, seed: int) -> float:
    from sfumato.world.adherence import run_adherence, select_prompts
    from sfumato.world.suite import read_suite

    prompts = select_prompts(read_suite(), ["concept"], limit)
    report = run_adherence(pipe, prompts, images_per_prompt=images_per_prompt, steps=steps, seed=seed)
    return report.scores()["concept"]


@lora_bench_command.command("teach")
@click.option("--model", "model_path", default=None, help="checkpoint or folder [built-in model]")
@click.option("--images", "count", default=30, show_default=True, type=click.IntRange(min=1))
@click.option("--minutes", default=10.0, show_default=True, help="training time budget")
@click.option("--steps", default=600, show_default=True, help="at most this many steps")
@click.option("--rank", default=8, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--batch-size", default=4, show_default=True)
@click.option("--images-per-prompt", default=4, show_default=True)
@click.option("--limit", default=None, type=int, help="at most N concept prompts")
@click.option("--sample-steps", default=20, show_default=True, help="sampler steps when scoring")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", default="outputs/lora-teach", show_default=True, type=click.Path(path_type=Path))
@click.option("--device", default=None)
@user_errors
def teach_command(model_path, count, minutes, steps, rank, lr, batch_size, images_per_prompt, limit,
                  sample_steps, seed, out: Path, device) -> None:
    """Teach the held-out concept from COUNT exported images; adherence before/after."""
    from sfumato.checkpoints import BUILTIN_MODEL, load_model
    from sfumato.lora import LoraStack
    from sfumato.pipeline import Pipeline, pick_device
    from sfumato.train.lora import TrainConfig, train_lora
    from sfumato.world.dataset import export_folder

    torch_device = pick_device(device)
    model = load_model(model_path or BUILTIN_MODEL, device=torch_device)
    pipe = Pipeline(model, torch_device, torch.float32)
    images = out / "images"
    export_folder(images, count, seed, "concept", model.default_size)
    before = concept_score(pipe, images_per_prompt, sample_steps, limit, seed)

    lora = out / "concept.safetensors"
    started = time.perf_counter()
    train_lora(model, TrainConfig(images=images, out=lora, steps=steps, rank=rank, lr=lr,
                                  batch_size=batch_size, cache_latents=True, seed=seed,
                                  targets=("attn", "ff"), max_minutes=minutes))
    train_minutes = (time.perf_counter() - started) / 60
    LoraStack(model).activate([(str(lora), 1.0, 1.0)])
    after = concept_score(pipe, images_per_prompt, sample_steps, limit, seed)
    result = {"concept_before": round(before, 3), "concept_after": round(after, 3),
              "train_minutes": round(train_minutes, 2), "images": count, "rank": rank, "lr": lr,
              "device": str(torch_device), "threads": torch.get_num_threads(), "lora": str(lora)}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    click.echo(json.dumps(result))
