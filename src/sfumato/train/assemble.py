"""`sfumato train assemble`: the three stages -> the shipped model folder (diffusers layout).

    model_index.json            as StableDiffusionPipeline's (no tokenizer: it ships in sfumato/data)
    unet/ vae/ text_encoder/    fp16 safetensors (fp32 where fp16 measurably changes outputs)
    scheduler/                  SD's noise schedule, the UNet's prediction type
    clip/                       vision tower + projections for a CLIP score (see load_clip); the whole
                                CLIP where the UNet stage tuned the text encoder
    MODEL_CARD.md, samples.png

Weights-only, it is also where training continues from: `sfumato train vae|clip|unet --init-from`
loads a component back with load_saved (clip/ + text_encoder/ make up the whole CLIP stage).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import Tensor

from sfumato.errors import SfumatoError
from sfumato.files import atomic_folder
from sfumato.train.common import param_count, stage_folder
from sfumato.train.data import render_pool, to_model_images

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
FP16_TOLERANCE = 1e-2  # RMS(fp16-weights output - fp32 output) / std(output) still called "the same"
TEXT_PREFIX = "text_model."  # SD's text_encoder key layout, which transformers 4.x and 5.x both load
# Config entries that describe a file, not an architecture (and the VAE's scale, measured after training).
CONFIG_METADATA = {"architectures", "dtype", "torch_dtype", "transformers_version", "scaling_factor"}


def _read_metrics(folder: Path) -> dict:
    path = folder / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}


@torch.no_grad()
def fp16_error(model: torch.nn.Module, inputs: dict, output_of) -> float:
    """How much rounding the weights to fp16 changes the output (computed in fp32 both times)."""
    reference = output_of(model(**inputs))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.half().float() if v.is_floating_point() else v for k, v in state.items()})
    rounded = output_of(model(**inputs))
    model.load_state_dict(state)
    return float((rounded - reference).square().mean().sqrt() / reference.std().clamp_min(1e-12))


def _probe_inputs(unet, vae, text_encoder) -> dict[str, tuple]:
    g = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    latents = torch.randn(2, 4, size, size, generator=g)
    ids = torch.randint(0, text_encoder.config.vocab_size, (2, 77), generator=g)
    context = text_encoder(ids).last_hidden_state
    return {
        "unet": (unet, {"sample": latents, "timestep": torch.tensor([10, 700]), "encoder_hidden_states": context},
                 lambda out: out.sample),
        "vae": (vae, {"sample": to_model_images(render_pool(0, 2, "train", 8 * size)[0], torch.device("cpu"))},
                lambda out: out.sample),
        "text_encoder": (text_encoder, {"input_ids": ids}, lambda out: out.last_hidden_state),
    }


def _save_weights(model, folder: Path, half: bool, filename: str, prefix: str = "") -> None:
    """config.json as the library writes it; the weights as one safetensors file, fp16 or fp32."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    if hasattr(model, "save_config"):  # diffusers: what save_config writes, less the folder it was loaded
        config = json.loads(model.to_json_string())  # from (a path on the builder's disk, not the model's)
        config.pop("_name_or_path", None)
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    else:  # transformers
        model.config.save_pretrained(folder)
    tensors = {prefix + k: (v.half() if half and v.is_floating_point() else v).contiguous()
               for k, v in model.state_dict().items()}
    save_file(tensors, folder / filename, metadata={"format": "pt"})


def model_index(text_encoder_class: str = "CLIPTextModel") -> dict:
    import diffusers

    return {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
            "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
            "safety_checker": [None, None], "scheduler": ["diffusers", "DDPMScheduler"],
            "text_encoder": ["transformers", text_encoder_class], "tokenizer": [None, None],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}


def _save_clip_score_parts(clip_dir: Path, folder: Path, half: bool, keep_text: bool = False) -> int:
    """The CLIP model minus its text tower (that is text_encoder/): vision tower + projections.
    keep_text: the whole CLIP, where text_encoder/ is a tuned copy of its text tower that no longer
    matches the vision tower's embedding space. clip_dir: a CLIP stage's folder or an assembled one."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    for name in ("config.json", "preprocessor_config.json"):
        if (clip_dir / "clip" / name).exists():
            shutil.copy(clip_dir / "clip" / name, folder / name)
    # the whole CLIP, wherever its text tower lies (an assembled folder keeps it in text_encoder/)
    weights = {k: v for k, v in saved_weights(clip_dir, "clip")[1].items() if keep_text or not k.startswith(TEXT_PREFIX)}
    save_file({k: (v.half() if half and k != "logit_scale" else v).contiguous() for k, v in weights.items()},
              folder / "model.safetensors", metadata={"format": "pt"})
    return sum(v.numel() for v in weights.values())


def load_clip(model_dir: str | Path):
    """The full CLIPModel of a built-in model folder (text_encoder/ + clip/), for a CLIP score."""
    from transformers import CLIPConfig, CLIPModel

    model_dir = Path(model_dir)
    clip = CLIPModel(CLIPConfig.from_pretrained(stage_folder(model_dir, "clip"))).eval()
    load_saved(clip, model_dir, "clip")
    return clip


def saved_weights(model_dir: Path, name: str) -> tuple[dict, dict[str, Tensor]]:
    """Config and tensors (as stored: fp16 or fp32) of component `name` (vae, unet or clip) of a
    folder that assemble or a stage wrote. An assembled clip/ lacks the text tower: text_encoder/ has it."""
    from safetensors.torch import load_file

    folder = stage_folder(model_dir, name)
    if name != "clip":
        return json.loads((folder / "config.json").read_text()), load_file(folder / DIFFUSERS_WEIGHTS)
    from transformers import CLIPConfig

    weights = load_file(folder / "model.safetensors")
    text_file = folder.parent / "text_encoder" / "model.safetensors"
    if not any(k.startswith(TEXT_PREFIX) for k in weights) and text_file.exists():
        text = load_file(text_file)
        weights |= {(k if k.startswith(TEXT_PREFIX) else TEXT_PREFIX + k): v for k, v in text.items()}
    return CLIPConfig.from_pretrained(folder).to_dict(), weights


def _architecture(config: dict, prefix: str = "") -> dict:
    """A config as flat {dotted key: JSON value}, without file metadata (tuples become lists as in JSON)."""
    flat = {}
    for key, value in config.items():
        if str(key).startswith("_") or key in CONFIG_METADATA:
            continue
        if isinstance(value, dict):
            flat |= _architecture(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = json.loads(json.dumps(value))
    return flat


def load_saved(module: torch.nn.Module, model_dir: str | Path, name: str, grow: bool = False) -> None:
    """Component `name` of model_dir's weights into `module`, in the module's dtype (fp32).

    The saved config must describe the module's architecture: entries both configs have must agree
    (entries only one library version writes are let through), and every tensor must be there.
    grow: the module may instead be the saved one plus attention blocks (see grow_into).
    """
    model_dir = Path(model_dir)
    saved_config, weights = saved_weights(model_dir, name)
    if grow:
        grow_into(module, weights, f"{model_dir}'s {name}")
        return
    config = module.config  # transformers: a PretrainedConfig; diffusers: a FrozenDict
    built = _architecture(config.to_dict() if hasattr(config, "to_dict") else dict(config))
    saved = _architecture(saved_config)
    differ = [key for key in sorted(built.keys() & saved.keys()) if built[key] != saved[key]]
    if differ:
        shown = "; ".join(f"{key} is {saved[key]} there, {built[key]} in the recipe" for key in differ[:4])
        raise SfumatoError(f"{model_dir} holds a {name} of another architecture ({shown}): "
                           f"continue it with the recipe it was trained with")
    target = module.state_dict()
    missing = [key for key in target if key not in weights]
    misshapen = [key for key in target if key in weights and weights[key].shape != target[key].shape]
    if missing or misshapen:
        raise SfumatoError(f"{model_dir} lacks {name} weights {(missing + misshapen)[:3]} (or they have other "
                           f"shapes): give a folder `sfumato train assemble` wrote from this architecture")
    module.load_state_dict({key: weights[key].to(target[key].dtype) for key in target})


def grow_into(module: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Load a smaller model's weights into `module`, which has every one of its tensors (same
    names and shapes) and some attention blocks more (e.g. cross-attention at 16x16 where it had
    a plain DownBlock2D). Each new block's output projection starts at zero, so the block adds
    nothing and the grown model computes what the saved one did: training continues from there
    instead of from scratch, which a 2-core CPU cannot afford for a new architecture."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    target = module.state_dict()
    unused = [k for k in weights if k not in target or weights[k].shape != target[k].shape]
    if unused:
        raise SfumatoError(f"{source} does not fit inside this architecture: {unused[:3]} have no place "
                           "of that shape (growing only adds attention blocks)")
    new_blocks = {path: m for path, m in module.named_modules() if isinstance(m, Transformer2DModel)
                  and not any(k.startswith(path + ".") for k in weights)}
    strays = [k for k in target if k not in weights and not any(k.startswith(p + ".") for p in new_blocks)]
    if strays:
        raise SfumatoError(f"{source} lacks {strays[:3]}, which are not in a new attention block: growing only "
                           "adds attention blocks")
    module.load_state_dict({**target, **{k: v.to(target[k].dtype) for k, v in weights.items()}})
    with torch.no_grad():
        for block in new_blocks.values():
            block.proj_out.weight.zero_()
            block.proj_out.bias.zero_()


def has_own_text_encoder(unet_dir: Path, clip_dir: Path) -> bool:
    """Whether the UNet was trained with a text encoder other than the CLIP's: a UNet stage that tuned it
    (text_encoder_lr) saved it beside the UNet, and an assembled folder always holds one, so compare."""
    from safetensors.torch import load_file

    own = unet_dir / "text_encoder" / "model.safetensors"
    if not own.exists():
        return False
    clip_text = load_file(stage_folder(clip_dir, "text_encoder") / "model.safetensors")
    clip_text = {k.removeprefix(TEXT_PREFIX): v for k, v in clip_text.items()}
    # an assembled copy may be fp16: the same weights rounded are not another text encoder
    return any(not torch.equal(v.half(), clip_text[k.removeprefix(TEXT_PREFIX)].half())
               for k, v in load_file(own).items())


def assemble_model(vae_dir: Path, clip_dir: Path, unet_dir: Path, out: Path, *, hardware: str = "") -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(stage_folder(unet_dir, "unet")).eval()
    vae = AutoencoderKL.from_pretrained(stage_folder(vae_dir, "vae")).eval()
    tuned_text = has_own_text_encoder(unet_dir, clip_dir)
    text_encoder = CLIPTextModel.from_pretrained(stage_folder(unet_dir if tuned_text else clip_dir,
                                                             "text_encoder")).eval()
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise SfumatoError(f"the UNet attends to width {unet.config.cross_attention_dim} but the text encoder "
                           f"has width {text_encoder.config.hidden_size}: train the UNet on this CLIP")
    errors = {name: fp16_error(*probe) for name, probe in _probe_inputs(unet, vae, text_encoder).items()}
    half = {name: err <= FP16_TOLERANCE for name, err in errors.items()}

    with atomic_folder(out) as tmp:
        _save_weights(unet, tmp / "unet", half["unet"], DIFFUSERS_WEIGHTS)
        _save_weights(vae, tmp / "vae", half["vae"], DIFFUSERS_WEIGHTS)
        _save_weights(text_encoder, tmp / "text_encoder", half["text_encoder"], "model.safetensors", TEXT_PREFIX)
        scheduler_dir = unet_dir / "scheduler"
        scheduler = (DDPMScheduler.from_pretrained(scheduler_dir) if scheduler_dir.exists()
                     else DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"))
        scheduler.save_pretrained(tmp / "scheduler")
        clip_params = 0
        if (clip_dir / "clip" / "model.safetensors").exists():
            clip_params = _save_clip_score_parts(clip_dir, tmp / "clip", half["text_encoder"], keep_text=tuned_text)
        (tmp / "model_index.json").write_text(json.dumps(model_index(), indent=2) + "\n")
        samples = sorted((unet_dir / "samples").glob("unet_*.png"))
        if samples:
            shutil.copy(samples[-1], tmp / "samples.png")
        params = {"unet": param_count(unet), "vae": param_count(vae), "text_encoder": param_count(text_encoder),
                  "clip_vision_and_projections": clip_params}
        locked = bool(_read_metrics(clip_dir).get("text_locked_to"))  # clip_dir's CLIP was realigned to it
        summary = {"params": params, "shipped_params": params["unet"] + params["vae"] + params["text_encoder"],
                   "text_encoder_tuned": tuned_text or locked, "clip_own_text_tower": tuned_text,
                   "vae_scaling_factor": vae.config.scaling_factor,
                   "fp16": half, "fp16_relative_error": {k: float(f"{v:.2e}") for k, v in errors.items()}}
        stages = {"vae": _read_metrics(vae_dir), "clip": _read_metrics(clip_dir), "unet": _read_metrics(unet_dir)}
        summary["megabytes"] = round(sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) / 1e6, 2)
        (tmp / "MODEL_CARD.md").write_text(model_card(summary, stages, hardware))
    return summary


def _figure(stage: dict, key: str, fmt: str = "{}") -> str:
    return fmt.format(stage[key]) if key in stage else "n/a"


def model_card(summary: dict, stages: dict, hardware: str) -> str:
    vae, clip, unet = stages["vae"], stages["clip"], stages["unet"]
    p = summary["params"]
    minutes = sum(s.get("minutes", 0) for s in stages.values())
    devices = sorted({f"{s.get('device', '?')} x{s.get('processes', 1)}" for s in stages.values() if s})
    lines = [
        "# sfumato built-in model",
        "",
        "A small latent-diffusion model of the same kind as Stable Diffusion 1.x, trained from scratch by",
        "`sfumato train` (scripts/train_builtin.sh) on the procedural shapes world (sfumato.world, split",
        "\"train\": held-out shape/colour pairs and concepts were never seen). 128x128 images, 16x16x4 latents.",
        "",
        "## Components",
        "",
        f"- VAE (AutoencoderKL): {p['vae']:,} parameters, scaling_factor {summary['vae_scaling_factor']:.4f}",
        f"- Text encoder (CLIPTextModel, the text tower of a CLIP trained here"
        f"{', then tuned with the UNet' if summary.get('text_encoder_tuned') else ''}):"
        f" {p['text_encoder']:,} parameters",
        f"- UNet (UNet2DConditionModel, EMA weights, {_figure(unet, 'prediction_type')}): {p['unet']:,} parameters",
        f"- Shipped total: {summary['shipped_params']:,} parameters, {summary['megabytes']} MB on disk",
        f"- clip/: CLIP vision tower + projections{' + its own text tower' if summary.get('clip_own_text_tower') else ''}"
        f"{' (trained again against the tuned text encoder, frozen: ' + clip['text_locked_to'] + ')' if clip.get('text_locked_to') else ''} "
        f"for a CLIP score ({p['clip_vision_and_projections']:,} "
        "parameters; `sfumato.train.assemble.load_clip`); images in [-1, 1] at 128x128",
        f"- fp16 weights: {summary['fp16']} (RMS output change of fp16 rounding, relative to the output's std: "
        f"{summary['fp16_relative_error']})",
        "- Scheduler: SD's (scaled_linear, beta 0.00085..0.012, 1000 steps). Tokenizer: CLIP BPE from sfumato/data.",
        "",
        "## Figures",
        "",
        f"- VAE held-out PSNR: {_figure(vae, 'heldout_psnr_db')} dB",
        f"- CLIP zero-shot image->caption top-1 among {_figure(clip, 'retrieval_candidates')} candidates: "
        f"unseen scenes {_figure(clip, 'retrieval_top1_train')}, held-out pairs {_figure(clip, 'retrieval_top1_heldout')} "
        f"(chance {_figure(clip, 'chance')})",
        f"- UNet final training loss {_figure(unet, 'final_loss', '{:.4f}')}; validation loss (fixed noise, "
        f"timesteps 0..999) unseen scenes {_figure(unet, 'val_loss_train')}, held-out pairs {_figure(unet, 'val_loss_heldout')}",
        "",
        "## Training",
        "",
        f"Hardware: {hardware or ', '.join(devices)}. Total wall time {minutes:.1f} min.",
        *[f"The {name} stage continued the weights of {s['init_from']} (--init-from): its steps and minutes "
          "below are this run's only." for name, s in stages.items() if s.get("init_from")],
        "",
        "| stage | steps | batch | minutes | samples/s | final loss |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in stages.items():
        lines.append(f"| {name} | {s.get('steps', 'n/a')} | {s.get('recipe', {}).get('batch_size', 'n/a')} | "
                     f"{s.get('minutes', 'n/a')} | {s.get('samples_per_second', 'n/a')} | "
                     f"{_figure(s, 'final_loss', '{:.4f}')} |")
    lines += ["", "## Recipes (as run)", ""]
    for name, s in stages.items():
        lines += [f"### {name}", "", "```json", json.dumps(s.get("recipe", {}), indent=1), "```", ""]
    return "\n".join(lines)
