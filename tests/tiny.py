"""Tiny random SD-shaped models for tests: the real classes and file layout, seconds to build."""

from __future__ import annotations

import json
from pathlib import Path

import torch

SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def tiny_components(seed: int = 0, prediction_type: str = "epsilon"):
    """(unet, vae, text_encoder) at random weights; 64x64 images -> 8x8x4 latents."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        sample_size=64,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    )
    text = CLIPTextModel(
        CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=77, projection_dim=32)
    )
    return unet.eval(), vae.eval(), text.eval()


def write_tiny_model(folder: Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """A diffusers-format folder like the ones `save_pretrained` writes for SD 1.x."""
    unet, vae, text = tiny_components(seed)
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    (folder / "scheduler").mkdir(exist_ok=True)
    config = {**SCHEDULER_CONFIG, "prediction_type": prediction_type}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder
