"""What `sfumato train lora` writes: kohya-format files with the ss_* metadata A1111 and
ComfyUI show, written atomically."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor

from sfumato.files import write_bytes_atomic

if TYPE_CHECKING:
    from sfumato.train.lora import TrainConfig
    from sfumato.train.lora_data import Example

BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2"}  # kohya's ss_base_model_version values


def save_lora(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """A kohya-format .safetensors with its ss_* metadata and sshs_model_hash (as kohya writes)."""
    import hashlib

    from safetensors.torch import save

    data = save(tensors, metadata)
    header = int.from_bytes(data[:8], "little")
    # The hash covers the tensor bytes only, which adding it to the header does not change.
    metadata = {**metadata, "sshs_model_hash": hashlib.sha256(data[8 + header:]).hexdigest()}
    write_bytes_atomic(path, save(tensors, metadata))


def tag_frequency(examples: list[Example], folder: Path, repeats: int) -> str:
    tags = Counter(t.strip() for e in examples for t in e.caption.split(",") if t.strip())
    return json.dumps({f"{repeats}_{folder.name}": dict(tags)})


def kohya_metadata(cfg: TrainConfig, model, examples: list[Example], *, step: int, epoch: int,
                   epochs: int, total: int, started: float, resolution: int) -> dict[str, str]:
    alpha = cfg.alpha if cfg.alpha is not None else cfg.rank
    subject = [e for e in examples if not e.prior]
    values = {
        "ss_network_module": "networks.lora", "ss_network_dim": cfg.rank, "ss_network_alpha": alpha,
        "ss_network_args": json.dumps({"targets": list(cfg.targets)}),
        "ss_num_train_images": len(subject) * cfg.repeats, "ss_num_reg_images": len(examples) - len(subject),
        "ss_prior_loss_weight": cfg.prior_loss_weight,
        "ss_num_batches_per_epoch": total // max(epochs, 1), "ss_num_epochs": epochs,
        "ss_epoch": epoch, "ss_steps": step, "ss_max_train_steps": total,
        "ss_learning_rate": cfg.lr, "ss_unet_lr": cfg.lr,
        "ss_text_encoder_lr": (cfg.te_lr or cfg.lr) if cfg.train_text_encoder else 0,
        "ss_network_train_unet_only": not cfg.train_text_encoder,
        "ss_batch_size_per_device": cfg.batch_size, "ss_optimizer": "torch.optim.adamw.AdamW",
        "ss_lr_scheduler": "constant", "ss_mixed_precision": "no",
        "ss_gradient_checkpointing": cfg.gradient_checkpointing, "ss_cache_latents": cfg.cache_latents,
        "ss_enable_bucket": cfg.buckets, "ss_resolution": f"({resolution}, {resolution})",
        "ss_noise_offset": cfg.noise_offset, "ss_min_snr_gamma": cfg.min_snr_gamma, "ss_seed": cfg.seed,
        "ss_training_started_at": started, "ss_training_finished_at": time.time(),
        "ss_output_name": cfg.out.stem, "ss_base_model_version": BASE_MODEL_VERSION[model.family],
        "ss_v2": model.family == "sd2", "ss_v_parameterization": model.prediction_type == "v_prediction",
        "ss_sd_model_name": model.name, "ss_sd_model_hash": model.hash,
        "ss_tag_frequency": tag_frequency(subject, cfg.images, cfg.repeats),
        "ss_caption_extension": ".txt" if cfg.caption is None else "",
    }
    return {k: str(v) for k, v in values.items()}
