"""Key mapping between Stable Diffusion's original single-file layout and diffusers' layout.

Original -> diffusers uses diffusers' own converters (the ones `from_single_file` runs), so
sfumato puts every tensor exactly where diffusers would. Diffusers -> original (export) is
written here: diffusers ships that direction only as a script, not as a library function.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from sfumato.errors import CheckpointError
from sfumato.files import atomic_path

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_CLIP = "cond_stage_model.transformer."
SD2_OPEN_CLIP = "cond_stage_model.model."
SDXL_CLIP_L = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_G = "conditioner.embedders.1.model."

# Where each family keeps its text encoders, in diffusers' order (text_encoder, text_encoder_2).
TEXT_ENCODER_PREFIXES = {
    "sd1": {"text_encoder": SD1_CLIP},
    "sd2": {"text_encoder": SD2_OPEN_CLIP},
    "sdxl": {"text_encoder": SDXL_CLIP_L, "text_encoder_2": SDXL_OPEN_CLIP_G},
}
SD2_V_PROBE = UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"

# ---------------------------------------------------------------- recognizing a checkpoint


def detect_family(keys: Iterable[str]) -> str:
    """"sd1", "sd2" or "sdxl" from a single file's key names (SD's original layout)."""
    keys = list(keys)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has(SDXL_OPEN_CLIP_G):
        return "sdxl"
    if has("conditioner.embedders.0.model."):
        raise CheckpointError("This is an SDXL refiner; sfumato loads SD1, SD2 and SDXL base models.")
    if has(SD2_OPEN_CLIP):
        return "sd2"
    if has(SD1_CLIP):
        return "sd1"
    if has(UNET):
        raise CheckpointError("The file has UNet weights but no text encoder; sfumato needs a full "
                              "checkpoint (UNet, VAE and text encoder).")
    if has("encoder.conv_in.") or has(VAE):
        raise CheckpointError("The file holds only a VAE; pass it with --vae next to a full model.")
    raise CheckpointError("No Stable Diffusion weights found (expected keys like "
                          "model.diffusion_model.*, first_stage_model.*, cond_stage_model.*).")


def detect_prediction_type(family: str, weights: Any, configs: dict | None) -> str:
    """epsilon or v_prediction, by the rules in sfumato.checkpoints' docstring (3 to 5)."""
    if configs and "prediction_type" in configs.get("scheduler", {}):
        return configs["scheduler"]["prediction_type"]
    if "v_pred" in weights.keys:
        return "v_prediction"
    if family == "sd2":
        if SD2_V_PROBE not in weights.keys:
            return "v_prediction"
        probe = weights.get(SD2_V_PROBE).float()
        return "v_prediction" if torch.std(probe, unbiased=False) > 0.09 else "epsilon"
    return "epsilon"


# ---------------------------------------------------------------- original -> diffusers


def unet_to_diffusers(ldm: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    return convert_ldm_unet_checkpoint(dict(ldm), dict(config))


def vae_to_diffusers(ldm: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    """Original-layout VAE keys (with or without first_stage_model./vae.) or diffusers keys."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in ldm):
        return dict(ldm)  # already diffusers layout (a VAE saved by diffusers)
    return convert_ldm_vae_checkpoint(dict(ldm), dict(config))


def text_encoder_to_diffusers(ldm: Mapping[str, Tensor], prefix: str, hidden_size: int,
                              flat: bool) -> dict[str, Tensor]:
    """One text encoder's weights; `flat`: the transformers model has no `text_model.` level
    (CLIPTextModel since transformers 5.6)."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_open_clip_checkpoint,
    )

    if prefix in (SD1_CLIP, SDXL_CLIP_L):
        converted = convert_ldm_clip_checkpoint(dict(ldm), prefix)
    else:  # OpenCLIP; the converter reads only config.hidden_size from the model it is given
        stub = SimpleNamespace(config=SimpleNamespace(hidden_size=hidden_size))
        converted = convert_open_clip_checkpoint(stub, dict(ldm), prefix=prefix)
    # position_ids is a buffer that transformers rebuilds itself; old checkpoints still store it
    converted = {k: v for k, v in converted.items() if not k.endswith("position_ids")}
    if flat:
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    return converted


# ---------------------------------------------------------------- diffusers -> original

_RESNET_TO_ORIGINAL = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
                       "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                       "conv_shortcut": "skip_connection"}
_VAE_ATTENTION_TO_ORIGINAL = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                              "to_out.0": "proj_out"}


def _unet_top_level() -> dict[str, str]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    tables = DIFFUSERS_TO_LDM_MAPPING["unet"]
    return {**tables["layers"], **tables["addition_embed_type"]}


def _rename_first(rest: str, table: Mapping[str, str]) -> str:
    """Rename the leading part of `rest` ('norm1.weight' -> 'in_layers.0.weight')."""
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def _unet_key_to_original(key: str, config: Mapping[str, Any], top: Mapping[str, str]) -> str:
    # The original UNet numbers its blocks flat: input_blocks.0 is conv_in, then each down
    # level has `layers_per_block` (resnet[, attention]) blocks plus one downsampler block.
    per_level = config["layers_per_block"] + 1
    if key in top:
        return top[key]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = 1 + level * per_level + j
        if kind == "resnets":
            return f"input_blocks.{block}.0.{_rename_first(rest, _RESNET_TO_ORIGINAL)}"
        return f"input_blocks.{block}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per_level}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_rename_first(m[2], _RESNET_TO_ORIGINAL)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        level, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        block = level * per_level + j
        if kind == "resnets":
            return f"output_blocks.{block}.0.{_rename_first(rest, _RESNET_TO_ORIGINAL)}"
        return f"output_blocks.{block}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        level = int(m[1])
        # the upsampler follows the last resnet (and its attention, in cross-attention levels)
        slot = 2 if "CrossAttn" in config["up_block_types"][level] else 1
        return f"output_blocks.{level * per_level + per_level - 1}.{slot}.conv.{m[2]}"
    raise CheckpointError(f"Can't export UNet weight '{key}': it has no place in the original "
                          "Stable Diffusion layout (only SD-style UNets can be exported).")


def unet_to_original(sd: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    top = _unet_top_level()
    return {UNET + _unet_key_to_original(k, config, top): v for k, v in sd.items()}


def _vae_key_to_original(key: str, num_levels: int, top: Mapping[str, str]) -> str:
    if key in top:
        return top[key]
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_rename_first(m[3], {'conv_shortcut': 'nin_shortcut'})}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    # the original decoder numbers its levels from the bottom up, diffusers from the top down
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        level = num_levels - 1 - int(m[1])
        return f"decoder.up.{level}.block.{m[2]}.{_rename_first(m[3], {'conv_shortcut': 'nin_shortcut'})}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_rename_first(m[3], {'conv_shortcut': 'nin_shortcut'})}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return f"{m[1]}.mid.attn_1.{_rename_first(m[2], _VAE_ATTENTION_TO_ORIGINAL)}"
    raise CheckpointError(f"Can't export VAE weight '{key}': it has no place in the original "
                          "Stable Diffusion layout (only AutoencoderKL VAEs can be exported).")


def vae_to_original(sd: Mapping[str, Tensor], config: Mapping[str, Any]) -> dict[str, Tensor]:
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["vae"]
    num_levels = len(config["up_block_types"])
    out = {}
    for key, value in sd.items():
        name = _vae_key_to_original(key, num_levels, top)
        if ".mid.attn_1." in name and name.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # the original attention projections are 1x1 convs
        out[VAE + name] = value
    return out


def clip_to_original(sd: Mapping[str, Tensor], prefix: str = SD1_CLIP) -> dict[str, Tensor]:
    """A transformers CLIPTextModel (nested or flat keys) in the original CLIP-L layout."""
    return {prefix + ("" if k.startswith("text_model.") else "text_model.") + k: v
            for k, v in sd.items()}


# ---------------------------------------------------------------- export


def _config_dict(config: Any) -> dict:
    """A diffusers FrozenDict or a transformers config as plain JSON-able data."""
    if hasattr(config, "to_json_string"):
        data = json.loads(config.to_json_string(use_diff=False))
    else:
        data = json.loads(json.dumps(dict(config), default=str))
    data.pop("_name_or_path", None)  # a local path: nothing to ship inside a model file
    return data


def export_single_file(model_dir: Path, out: Path, *, half: bool = False) -> None:
    """Write a diffusers folder as ONE .safetensors in SD's original key layout.

    The diffusers configs ride along in the metadata ("sfumato.configs") so that sfumato can load
    non-standard sizes back; other tools ignore metadata. SD1-style models only (one CLIP-L-style
    CLIPTextModel).
    """
    from safetensors.torch import save_file

    from sfumato.checkpoints import META_CONFIGS, META_FAMILY, load_folder_components

    model_dir, out = Path(model_dir), Path(out)
    parts = load_folder_components(model_dir)
    if parts["family"] != "sd1":
        raise CheckpointError(f"Export supports SD1-style models (one CLIPTextModel with "
                              f"quick_gelu); {model_dir} is {parts['family']}.")
    unet, vae, (encoder,) = parts["unet"], parts["vae"], parts["text_encoders"]
    tensors = {**unet_to_original(unet.state_dict(), unet.config),
               **vae_to_original(vae.state_dict(), vae.config),
               **clip_to_original(encoder.state_dict())}
    dtype = torch.float16 if half else torch.float32
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in tensors.items()}
    configs = {"unet": _config_dict(unet.config), "vae": _config_dict(vae.config),
               "text_encoder": _config_dict(encoder.config), "scheduler": parts["scheduler"]}
    metadata = {"format": "pt", META_FAMILY: "sd1", META_CONFIGS: json.dumps(configs)}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
