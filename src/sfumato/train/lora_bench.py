"""`sfumato bench lora switch|teach`: how fast LoRA sets switch, and whether training teaches.

switch: ms per activate() for ~10 MB kohya LoRAs on SD1.5-sized UNet + text-encoder layers
        (weights uninitialised: only the shapes matter for the timing).
teach:  teach the built-in model a held-out shape and a held-out pattern (never in its training
        data), one LoRA each from 30 exported images within a time budget, and score before/after:
        each concept's prompts, the base suite (no damage) and both LoRAs mixed in one image.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch

from sfumato.commands import user_errors
from sfumato.train.lora import REG_TARGETS, TARGETS

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
    return SimpleNamespace(family="sd1", unet=unet, text_encoders=[text], tokenizers=[])


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


def concept_prompts(suite: list, concept: str) -> list:
    """The suite's "concept" prompts that ask for this held-out shape or pattern."""
    return [p for p in suite if p.category == "concept"
            and any(concept in (q.shape, q.pattern) for q in p.expectation.objects)]


def mixed_prompts(shape: str, pattern: str, count: int = 8, seed: int = 0) -> list:
    """Prompts for one object that needs both LoRAs: the taught shape wearing the taught pattern."""
    import random

    from sfumato.world.captions import Expectation, ObjectQuery
    from sfumato.world.scenes import COLORS
    from sfumato.world.suite import SuitePrompt, prompt_words

    rng = random.Random(f"sfumato-lora-teach/{shape}/{pattern}/{seed}")
    prompts = []
    for number in range(1, count + 1):
        expectation = Expectation(objects=(ObjectQuery(shape, rng.choice([None, *COLORS]), pattern),))
        prompts.append(SuitePrompt(f"mixed-{number:03d}", "mixed", prompt_words(expectation, rng), "", expectation))
    return prompts


def scores(pipe, prompts: list, settings: dict) -> dict[str, float]:
    """Adherence per category of these prompts (and "overall" when there are several)."""
    from sfumato.world.adherence import run_adherence

    report = run_adherence(pipe, prompts, **settings)
    result = {k: round(v, 3) for k, v in report.scores().items()}
    if len(result) > 1:
        result["overall"] = round(report.overall(), 3)
    return result


def regularization_images(pipe, folder: Path, count: int, source: str, seed: int, size: int) -> Path:
    """COUNT captioned images of what the base model already knows: scenes of the world's training
    split ("world"), or the base model's own pictures of their captions ("model": DreamBooth's prior
    preservation, which asks the LoRA to leave every other prompt as it was)."""
    from sfumato.files import write_bytes_atomic
    from sfumato.world.dataset import export_folder, png_bytes

    paths = export_folder(folder, count, seed, split="train", size=size)
    if source == "model":  # the same captions, drawn by the model
        for index, path in enumerate(paths):
            caption = path.with_suffix(".txt").read_text(encoding="utf-8")
            image = pipe.generate(prompt=caption, seed=seed + index, steps=20)[0].image
            write_bytes_atomic(path, png_bytes(np.asarray(image)))
    return folder


def teach_one(model, concept: str, folder: Path, count: int, reg_images: Path | None, learn_word: bool,
              options: dict) -> tuple[Path, float]:
    """Export COUNT images of the concept and train a LoRA on them: (file, training minutes)."""
    from sfumato.train.lora import TrainConfig, train_lora
    from sfumato.world.dataset import export_folder

    images = folder / concept
    export_folder(images, count, options["seed"], size=model.default_size, concept=concept)
    lora = folder / f"{concept}.safetensors"
    started = time.perf_counter()
    train_lora(model, TrainConfig(images=images, out=lora, cache_latents=True, reg_images=reg_images,
                                  words=(concept,) if learn_word else (),
                                  **options))
    return lora, (time.perf_counter() - started) / 60


@lora_bench_command.command("teach")
@click.option("--model", "model_path", default=None, help="checkpoint or folder [built-in model]")
@click.option("--shape", default=None, help="held-out shape to teach [the first that can wear a pattern]")
@click.option("--pattern", default=None, help="held-out pattern to teach [the first in heldout.json]")
@click.option("--images", "count", default=30, show_default=True, type=click.IntRange(min=1))
@click.option("--minutes", default=10.0, show_default=True, help="training time budget of each LoRA")
@click.option("--steps", default=3000, show_default=True, help="at most this many steps per LoRA")
@click.option("--rank", default=8, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--batch-size", default=4, show_default=True)
@click.option("--target", "targets", multiple=True, default=("attn", "ff", "conv"), show_default=True,
              type=click.Choice(list(TARGETS)), help="UNet layers to adapt (repeatable)")
@click.option("--train-text-encoder", is_flag=True, help="adapt the text encoder too")
@click.option("--te-lr", default=None, type=float, help="text-encoder learning rate [= --lr]")
@click.option("--learn-words/--no-learn-words", default=True, show_default=True,
              help="each LoRA also learns its concept word's token vectors")
@click.option("--word-lr", default=5e-3, show_default=True, type=float, help="learning rate of the word vectors")
@click.option("--reg-images", "reg_count", default=60, show_default=True, type=click.IntRange(min=0),
              help="regularization images: this many captions of the world's training split")
@click.option("--reg-source", default="model", show_default=True, type=click.Choice(["model", "world"]),
              help="regularization pictures: the base model's own (prior preservation) or the world's scenes")
@click.option("--prior-loss-weight", default=1.0, show_default=True, type=click.FloatRange(min=0))
@click.option("--reg-target", default="model", show_default=True, type=click.Choice(REG_TARGETS))
@click.option("--reg-caption-dropout", default=0.2, show_default=True, type=click.FloatRange(0, 1))
@click.option("--noise-offset", default=0.2, show_default=True,
              help="kohya's noise offset: the built-in model's recipe uses 0.2")
@click.option("--images-per-prompt", default=4, show_default=True)
@click.option("--limit", default=8, show_default=True, type=click.IntRange(min=1),
              help="at most N prompts per category (base suite, each concept, mixed)")
@click.option("--sample-steps", default=20, show_default=True, help="sampler steps when scoring")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", default="outputs/lora-teach", show_default=True, type=click.Path(path_type=Path))
@click.option("--device", default=None)
@user_errors
def teach_command(model_path, shape, pattern, count, minutes, steps, rank, lr, batch_size, targets,
                  train_text_encoder, te_lr, learn_words, word_lr, reg_count, reg_source, prior_loss_weight, reg_target,
                  reg_caption_dropout, noise_offset, images_per_prompt, limit, sample_steps, seed, out: Path,
                  device) -> None:
    """Teach a held-out shape and a held-out pattern (a LoRA each, from COUNT exported images).

    Scores, before and after: each concept's prompts (its LoRA alone), the base suite's categories
    (both LoRAs applied: they must not break what the model knew) and prompts that need both LoRAs
    at once (the taught shape wearing the taught pattern). The defaults are the best recipe measured
    so far (README): resnet convs adapted too, the concept's word learned, the base model's own
    pictures as regularization images."""
    from sfumato.checkpoints import BUILTIN_MODEL, load_model
    from sfumato.errors import SfumatoError
    from sfumato.files import write_bytes_atomic
    from sfumato.lora import LoraStack
    from sfumato.pipeline import Pipeline, pick_device
    from sfumato.world.adherence import select_prompts
    from sfumato.world.scenes import can_have_pattern, held_out
    from sfumato.world.suite import EXCLUDED_FROM_OVERALL, read_suite

    rules = held_out()
    # the default shape must be able to wear the pattern (a thin crescent cannot), for the mixed prompts
    wearers = [s for s in sorted(rules.concept_shapes) if can_have_pattern(s, "large")]
    shape, pattern = shape or wearers[0], pattern or sorted(rules.concept_patterns)[0]
    if shape not in wearers or pattern not in rules.concept_patterns:
        raise SfumatoError(f"--shape {shape} --pattern {pattern}: allowed shapes {', '.join(wearers)} "
                           f"(held out, able to wear a pattern), patterns {', '.join(sorted(rules.concept_patterns))}")
    torch_device = pick_device(device)
    model = load_model(model_path or BUILTIN_MODEL, device=torch_device)
    pipe = Pipeline(model, torch_device, torch.float32)
    settings = {"images_per_prompt": images_per_prompt, "steps": sample_steps, "seed": seed}
    suite = read_suite()
    base = [p for p in select_prompts(suite, limit=limit) if p.category not in EXCLUDED_FROM_OVERALL]
    suites = {shape: concept_prompts(suite, shape)[:limit], pattern: concept_prompts(suite, pattern)[:limit],
              "mixed": mixed_prompts(shape, pattern, limit, seed), "base": base}
    before = {name: scores(pipe, prompts, settings) for name, prompts in suites.items()}

    options = {"steps": steps, "rank": rank, "lr": lr, "te_lr": te_lr, "batch_size": batch_size, "seed": seed,
               "noise_offset": noise_offset, "prior_loss_weight": prior_loss_weight,
               "reg_target": reg_target, "reg_caption_dropout": reg_caption_dropout,
               "targets": tuple(targets), "train_text_encoder": train_text_encoder, "max_minutes": minutes,
               "word_lr": word_lr, "fp16": True}
    reg_images = (regularization_images(pipe, out / "regularization", reg_count, reg_source, seed + 1,
                                        model.default_size) if reg_count else None)
    (shape_lora, shape_minutes), (pattern_lora, pattern_minutes) = (
        teach_one(model, concept, out, count, reg_images, learn_words, options)
        for concept in (shape, pattern))
    stack, after, base_each = LoraStack(model), {}, {}
    for name, loras in ((shape, [shape_lora]), (pattern, [pattern_lora]), ("mixed", [shape_lora, pattern_lora]),
                        ("base", [shape_lora, pattern_lora])):
        stack.activate([(str(path), 1.0, 1.0) for path in loras])
        after[name] = scores(pipe, suites[name], settings)
    for name, lora in ((shape, shape_lora), (pattern, pattern_lora)):  # which LoRA costs the base what
        stack.activate([(str(lora), 1.0, 1.0)])
        base_each[name] = scores(pipe, base, settings)["overall"]
    stack.remove_all()

    def concept_of(name: str) -> tuple[float, float]:
        return before[name]["concept"], after[name]["concept"]

    base_drop = {k: round(before["base"][k] - v, 3) for k, v in after["base"].items()}
    result = {
        "shape": shape, "pattern": pattern, "images": count,
        "train_minutes": {shape: round(shape_minutes, 2), pattern: round(pattern_minutes, 2)},
        f"{shape}_before_after": concept_of(shape), f"{pattern}_before_after": concept_of(pattern),
        "mixed_before_after": (before["mixed"]["mixed"], after["mixed"]["mixed"]),
        "base_before": before["base"], "base_after": after["base"], "base_drop": base_drop,
        "base_overall_with_each_lora": base_each,
        "goals": {"concepts_after_ge_0.8": min(concept_of(shape)[1], concept_of(pattern)[1]) >= 0.8,
                  "base_within_0.05": max(base_drop.values()) <= 0.05,
                  "mixed_ge_0.7": after["mixed"]["mixed"] >= 0.7,
                  "train_minutes_le_10": max(shape_minutes, pattern_minutes) <= 10},
        "settings": {**options, "targets": list(options["targets"]), "learn_words": learn_words,
                     "reg_images": reg_count,
                     "reg_source": reg_source, "images_per_prompt": images_per_prompt,
                     "sample_steps": sample_steps, "base_limit": limit,
                     "device": str(torch_device), "threads": torch.get_num_threads()},
        "loras": [str(shape_lora), str(pattern_lora)],
    }
    write_bytes_atomic(out / "result.json", (json.dumps(result, indent=2) + "\n").encode())
    click.echo(json.dumps(result, indent=2))
