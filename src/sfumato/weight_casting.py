"""The fp16_weights lever: Linear and Conv2d weights rest in fp16 and are cast to fp32 while their
layer runs, so a model takes half the memory and still computes in fp32 (see sfumato.accel).

diffusers' layerwise casting does this, but after each forward it casts the fp32 weights back to
fp16: the same values it started from, at the cost of a second pass over every weight per call.
This hook keeps the fp16 tensors aside and puts them back instead. It subclasses diffusers' hook
and registers under its name, so a diffusers model's .dtype still reports the compute dtype.

The resting weights are never rewritten, not even into another memory format: the cast itself
writes conv weights in NHWC under the channels_last lever. So weights loaded as views of a
checkpoint's memory map stay file-backed pages, which the OS can drop while they rest
(sfumato.accel.page_out)."""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry
from diffusers.hooks.layerwise_casting import LayerwiseCastingHook

HOOK_NAME = "layerwise_casting"  # the name diffusers' ModelMixin.dtype looks for


class CastWhileRunning(LayerwiseCastingHook):
    def __init__(self, storage_dtype: torch.dtype, compute_dtype: torch.dtype,
                 memory_format: torch.memory_format = torch.preserve_format):
        super().__init__(storage_dtype, compute_dtype, non_blocking=False)
        self.memory_format = memory_format  # of the 4-d (conv) weights while they run
        self.resting: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        self.resting = [(p, p.data) for p in module.parameters(recurse=False)]
        for parameter, data in self.resting:
            layout = self.memory_format if data.dim() == 4 else torch.preserve_format
            parameter.data = data.to(self.compute_dtype, memory_format=layout)
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output):
        for parameter, data in self.resting:
            parameter.data = data
        self.resting = []
        return output


def compute_layers_in(module: torch.nn.Module, compute_dtype: torch.dtype,
                      memory_format: torch.memory_format = torch.preserve_format) -> None:
    """Keep the weights of the Linear and Conv2d layers (nearly all of them) in the dtype they were
    loaded in, cast to `compute_dtype` (conv weights into `memory_format`) only while each runs.
    The rest (norms, embeddings) moves to `compute_dtype` now: a CLIP text model reports its token
    embedding's dtype as its own, and diffusers pipelines cast the prompt embeddings to it."""
    for layer in module.modules():
        if isinstance(layer, torch.nn.Linear | torch.nn.Conv2d):
            storage = layer.weight.dtype
            if storage != compute_dtype:
                registry = HookRegistry.check_if_exists_or_initialize(layer)
                registry.register_hook(CastWhileRunning(storage, compute_dtype, memory_format), HOOK_NAME)
            continue
        cast_tensors(layer, compute_dtype, recurse=False)


def cast_tensors(module: torch.nn.Module, dtype: torch.dtype, recurse: bool = True) -> None:
    """Every floating-point parameter and buffer to `dtype`, in place. Not module.to(dtype): on a
    diffusers model that warns about modules to keep in fp32, which these models have none of."""
    for tensor in [*module.parameters(recurse=recurse), *module.buffers(recurse=recurse)]:
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(dtype)
