"""DeepCache (Ma, Fang & Wang, 2023): reuse the UNet's deep features across adjacent steps.

From one sampling step to the next the deep, low-resolution features of a UNet barely change; the
shallow ones carry the detail. So every `interval`-th call runs the whole UNet and keeps what
enters its last up block; the calls in between run only conv_in, the first down block and the last
up block on that kept feature. A lossy, opt-in speed lever (`--lever deepcache`): with interval 3,
two calls in three cost a fraction of a full pass.

Written as its own forward pass because diffusers has no switch for it; the pass is
UNet2DConditionModel.forward reduced to what SD 1.x/2.x/XL use (no ControlNet, adapters or GLIGEN),
calling the UNet's own embedding helpers so that it stays in step with diffusers.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _run_down(block, h: Tensor, emb: Tensor, context: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=h, temb=emb, encoder_hidden_states=context)
    return block(hidden_states=h, temb=emb)


def _run_up(block, h: Tensor, emb: Tensor, context: Tensor, skips: tuple[Tensor, ...],
            upsample_size: torch.Size | None) -> Tensor:
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=h, temb=emb, res_hidden_states_tuple=skips, encoder_hidden_states=context,
                     upsample_size=upsample_size)
    return block(hidden_states=h, temb=emb, res_hidden_states_tuple=skips, upsample_size=upsample_size)


class DeepCacheUNet:
    """Callable like the UNet it wraps (as UNetDenoiser calls it). Make one per sampling run.

    Several calls share a timestep when a batch goes through one image at a time, or cond and
    uncond run separately (prompts of different lengths): the n-th call at a timestep is the same
    image and pass at every step, so each (n, shapes) keeps its own deep feature and call count."""

    def __init__(self, unet, interval: int = 3):
        if interval < 1:
            raise ValueError(f"DeepCache interval must be at least 1, got {interval}")
        self.unet, self.interval = unet, interval
        self.calls: dict[tuple, int] = {}
        self.deep: dict[tuple, Tensor] = {}
        self.timestep: Tensor | None = None
        self.position = 0  # calls so far at self.timestep

    def _key(self, sample: Tensor, timestep: Tensor, context: Tensor) -> tuple:
        if self.timestep is not None and torch.equal(timestep, self.timestep):
            self.position += 1
        else:
            self.timestep, self.position = timestep.clone(), 0
        return (self.position, tuple(sample.shape), tuple(context.shape))

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def embeddings(self, sample: Tensor, timestep: Tensor, context: Tensor, added_cond_kwargs: dict | None
                   ) -> tuple[Tensor, Tensor]:
        unet = self.unet
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        extra = unet.get_aug_embed(emb=emb, encoder_hidden_states=context, added_cond_kwargs=added_cond_kwargs or {})
        emb = emb + extra if extra is not None else emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        context = unet.process_encoder_hidden_states(encoder_hidden_states=context,
                                                     added_cond_kwargs=added_cond_kwargs or {})
        return emb, context

    @torch.no_grad()
    def __call__(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor,
                 return_dict: bool = False, added_cond_kwargs: dict | None = None) -> tuple[Tensor]:
        unet = self.unet
        key = self._key(sample, torch.as_tensor(timestep), encoder_hidden_states)
        count = self.calls.get(key, 0)
        self.calls[key] = count + 1
        full = count % self.interval == 0 or key not in self.deep

        emb, context = self.embeddings(sample, timestep, encoder_hidden_states, added_cond_kwargs)
        h = unet.conv_in(sample)
        skips: tuple[Tensor, ...] = (h,)
        for block in unet.down_blocks if full else unet.down_blocks[:1]:
            h, res = _run_down(block, h, emb, context)
            skips += res

        last = unet.up_blocks[-1]
        if full:
            if getattr(unet.mid_block, "has_cross_attention", False):
                h = unet.mid_block(h, emb, encoder_hidden_states=context)
            else:
                h = unet.mid_block(h, emb)
            odd_size = any(d % 2**unet.num_upsamplers for d in sample.shape[-2:])
            for block in unet.up_blocks[:-1]:
                n = len(block.resnets)
                skips, block_skips = skips[:-n], skips[-n:]
                h = _run_up(block, h, emb, context, block_skips, skips[-1].shape[2:] if odd_size else None)
            self.deep[key] = h
        else:
            h = self.deep[key]
        h = _run_up(last, h, emb, context, skips[: len(last.resnets)], None)

        if unet.conv_norm_out is not None:
            h = unet.conv_act(unet.conv_norm_out(h))
        return (unet.conv_out(h),)
