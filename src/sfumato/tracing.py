"""The `jit` lever: a small UNet run as a frozen TorchScript trace, one per input shape.

On the built-in model a UNet call is a few hundred small ops on 16x16 latents, and a third of its
time is Python: diffusers' module calls, attention-processor dispatch, argument checks. A trace
keeps the same aten ops in the same order, so its output is bit for bit the eager one, and runs
them without the Python (one guided call: 24 ms against 37 ms). torch.compile removes the Python
too and fuses more (`--lever compile`), but spends about a minute compiling in every process.

TorchScript is deprecated in favour of torch.compile/torch.export, which have no cheap way to do
this on a CPU; where torch can no longer trace or load, the lever falls back to the eager UNet.

Tracing costs about a second, so each trace is saved in the cache folder keyed by what it depends
on (the weights themselves, so a merged LoRA gets its own, the input shapes, torch and diffusers
versions), and a later process loads it in ~0.1 s. The files are TorchScript archives this
process wrote, read from the user's own cache, as Inductor's kernel cache is.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from sfumato.files import write_bytes_atomic

log = logging.getLogger(__name__)

KEEP_TRACES = 16  # files kept in the cache folder (~17 MB each for the built-in UNet), newest first


class TracedUNet(torch.nn.Module):
    """Called like the diffusers UNet it wraps; the plain keyword call runs a trace of it.

    Calls with extra conditioning (SDXL's added_cond_kwargs) and calls while `enabled` is False
    (a token-merging patch, which changes the module's code) run the eager UNet. A Module, so that
    hooks (the speed benchmark's timer) see its calls as they saw the UNet's."""

    def __init__(self, unet: torch.nn.Module, cache_dir: Path):
        super().__init__()
        self.unet = unet
        self.dtype = unet.dtype
        self.cache_dir = Path(cache_dir)
        self.enabled = True
        self._traces: dict[tuple, Callable | None] = {}  # None: this shape could not be traced
        self._weights_digest: str | None = None

    def weights_changed(self) -> None:
        """Forget the traces: their weights are constants, stale once a LoRA is merged or removed."""
        self._traces.clear()
        self._weights_digest = None

    def forward(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor,
                 return_dict: bool = False, **extra) -> tuple[Tensor]:
        inputs = (sample, timestep, encoder_hidden_states)
        trace = self.trace_for(inputs) if self.enabled and not (extra or return_dict) else None
        if trace is None:
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                             return_dict=return_dict, **extra)
        # Without the profiling executor's first runs, which re-optimize the graph (~0.15 s each)
        # and then run it no faster: the trace is already just the ops.
        with torch.jit.optimized_execution(False):
            return (trace(*inputs),)

    def trace_for(self, inputs: tuple[Tensor, ...]) -> Callable | None:
        """The trace for inputs of this signature (loaded or made on first use); None: untraceable."""
        shape = input_signature(inputs)
        if shape not in self._traces:
            self._traces[shape] = self._load_or_trace(inputs, shape)
        return self._traces[shape]

    def _load_or_trace(self, inputs: tuple[Tensor, ...], shape: tuple) -> Callable | None:
        path = self.cache_dir / f"{self._cache_key(shape)}.pt"
        if path.exists():
            try:
                return load_trace(path, inputs[0].device)
            except (RuntimeError, OSError) as error:  # a damaged file, or another torch: trace again
                log.warning("ignoring the cached UNet trace %s (%s)", path.name, error)
        try:
            trace = trace_unet(self.unet, inputs)
        except Exception as error:  # noqa: BLE001  (any failure of the tracer means "run eagerly")
            log.warning("the jit lever could not trace this UNet (%s); running it eagerly", error)
            return None
        try:
            save_trace(path, trace)
            prune(self.cache_dir, KEEP_TRACES)
        except OSError as error:  # a read-only or full cache: this process still has the trace
            log.warning("could not save the UNet trace in %s (%s)", self.cache_dir, error)
        return trace

    def _cache_key(self, shape: tuple) -> str:
        if self._weights_digest is None:
            self._weights_digest = weights_digest(self.unet)
        import diffusers

        what = [self._weights_digest, repr(shape), json.dumps(dict(self.unet.config), sort_keys=True,
                                                              default=str),
                sorted(type(p).__name__ for p in self.unet.attn_processors.values()),
                torch.__version__, diffusers.__version__]
        return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:32]


def input_signature(inputs: tuple[Tensor, ...]) -> tuple:
    """What a trace is specialised on: shapes, strides (memory format), dtypes, device."""
    return tuple((tuple(t.shape), t.stride(), str(t.dtype), str(t.device)) for t in inputs)


def trace_unet(unet: torch.nn.Module, inputs: tuple[Tensor, ...]) -> torch.jit.ScriptModule:
    """A frozen trace of unet(sample, timestep, encoder_hidden_states) -> sample."""

    class PlainCall(torch.nn.Module):
        def __init__(self, unet: torch.nn.Module):
            super().__init__()
            self.unet = unet

        def forward(self, sample: Tensor, timestep: Tensor, context: Tensor) -> Tensor:
            return self.unet(sample, timestep, encoder_hidden_states=context, return_dict=False)[0]

    return freeze_trace(PlainCall(unet), inputs)


def freeze_trace(module: torch.nn.Module, inputs: tuple[Tensor, ...], *,
                 optimize_numerics: bool = True) -> torch.jit.ScriptModule:
    """A frozen trace of module(*inputs), for inputs of these shapes. optimize_numerics=False keeps
    convs unfolded with the adds and muls after them, which would change the last bits."""
    # Inputs made under inference_mode cannot be traced through; plain copies can.
    with torch.inference_mode(False), torch.no_grad(), quiet_torchscript():
        examples = tuple(t.clone() for t in inputs)
        modes = {m: m.training for m in module.modules()}  # a wrapper's mode is not its network's
        try:
            trace = torch.jit.trace(module.eval(), examples, check_trace=False)
            return torch.jit.freeze(trace, optimize_numerics=optimize_numerics)
        finally:
            for m, training in modes.items():
                m.training = training


def load_trace(path: Path, device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    """A saved trace; marked most recently used, so that pruning its folder keeps it."""
    with quiet_torchscript():
        trace = torch.jit.load(str(path), map_location=device)
    with contextlib.suppress(OSError):
        path.touch()
    return trace


def save_trace(path: Path, trace: torch.jit.ScriptModule) -> None:
    buffer = io.BytesIO()
    with quiet_torchscript():
        torch.jit.save(trace, buffer)
    write_bytes_atomic(path, buffer.getvalue())


@contextlib.contextmanager
def quiet_torchscript() -> Iterator[None]:
    """Without the tracer's warning at each Python branch on a shape (a trace is per shape),
    TorchScript's deprecation notices (see the module's docstring), and the warnings transformers gives
    when a model's loss function or deprecated properties are read, which the tracer provokes by
    reading every attribute of a model: nothing a user can act on."""
    transformers_log = logging.getLogger("transformers.modeling_utils")
    level = transformers_log.level
    transformers_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecated properties, read too
            yield
    finally:
        transformers_log.setLevel(level)


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer, names and values (~20 ms for the built-in UNet)."""
    digest = hashlib.sha256()
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def prune(folder: Path, keep: int, pattern: str = "*.pt") -> None:
    """Delete all but the `keep` most recently used traces."""
    files = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in files[keep:]:
        old.unlink(missing_ok=True)
