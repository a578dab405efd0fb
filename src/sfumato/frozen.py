"""A one-off `sfumato generate` without importing diffusers or transformers.

With the built-in model, a `sfumato generate` process spent 7 of its 10 s importing diffusers and
transformers (torch._dynamo, peft, quantizer registries...) to build networks that then ran for
0.4 s. So, as the jit lever keeps the UNet's traces (sfumato.tracing), a first run of a small model
on the CPU keeps a *bundle* in the cache: TorchScript traces of the text encoder, the UNet and the
VAE decoder for the input shapes that run used, the tokenizer as the `tokenizers` library's JSON,
and the few config values the pipeline reads. A later run of the same model files with the same
levers loads the bundle and goes through the same Pipeline with these stand-ins for the networks.
A trace runs the same aten ops as the network it was made from, so the image is the same, byte for
byte (tests/test_frozen.py).

Whatever a bundle cannot serve (a size it has no trace for, a LoRA, img2img, a lever) raises
FrozenMiss, and the run falls back to the full model, whose shapes then join the bundle.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

import sfumato
from sfumato import accel
from sfumato.checkpoints import BUILTIN_MODEL, Model, cache_folder, sha256_file
from sfumato.files import write_bytes_atomic
from sfumato.prompt import extract_lora_tags
from sfumato.tracing import (
    TracedUNet,
    freeze_trace,
    input_signature,
    load_trace,
    prune,
    save_trace,
    trace_unet,
)

log = logging.getLogger(__name__)

BUNDLE_FORMAT = 1
KEEP_BUNDLES = 4         # models whose bundles stay in the cache, most recently used first
KEEP_TRACES = 24         # trace files per bundle (the UNet's ~17 MB each for the built-in model)
META = "model.json"      # written last: a bundle without it is incomplete and unused


class FrozenMiss(Exception):
    """The bundle has no trace for this call (or cannot do what was asked): use the full model."""


# ---------------------------------------------------------------- which runs a bundle serves


def bundle_folder(model: str | Path | None, levers: accel.Levers, allow_pickle: bool = False) -> Path | None:
    """Where the bundle of these model files under these levers lives. Keyed by the files' contents
    (sha256, cached by size and mtime) and the library versions of the traces. None: no such model
    (the full load says what is wrong), or one too big to be small (no bundle: its imports are a
    small part of its time, and hashing all its files the first time would not be)."""
    path = Path(model or BUILTIN_MODEL).resolve()
    if not path.exists():
        return None
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if sum(p.stat().st_size for p in files) > 4 * accel.FP16_WEIGHTS_MIN_PARAMS:  # fp32 bytes
        return None
    what = {
        "format": BUNDLE_FORMAT,
        "files": [[str(p.relative_to(path)) if path.is_dir() else p.name, sha256_file(p)] for p in files],
        "levers": repr(levers),  # the default ones: serves() takes no others, yet their defaults may change
        "allow_pickle": allow_pickle,  # a .ckpt loaded once with the flag is not served without it
        "versions": [sfumato.__version__, torch.__version__,
                     *(importlib.metadata.version(name) for name in ("diffusers", "transformers", "tokenizers"))],
        "code": _code_digest(),
    }
    key = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]
    return cache_folder() / "frozen" / key


# sfumato's modules that decide what the networks compute: a change to them (without a new version
# number, as in development) makes new traces, never a stale picture.
NETWORK_CODE = ("accel.py", "checkpoints.py", "convert.py", "weight_casting.py", "tracing.py", "frozen.py",
                "text.py", "data/tokenizer/bpe_simple_vocab_16e6.txt.gz")


def _code_digest() -> str:
    digest = hashlib.sha256()
    for name in NETWORK_CODE:
        digest.update((Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()


def serves(params: Any, *, vae: str | None, device: str | None, levers: accel.Levers,
           init_image: Any) -> bool:
    """Whether a bundle may serve this request at all: the default levers on the CPU, the model's
    own VAE, no img2img, no LoRA, no token merging (each changes the networks or their code)."""
    from sfumato.pipeline import pick_device

    prompt_tags = extract_lora_tags(params.prompt)[1] + extract_lora_tags(params.negative_prompt)[1]
    return (vae is None and init_image is None and not params.loras and not prompt_tags
            and not params.token_merging_ratio and levers == accel.Levers()
            and pick_device(device).type == "cpu")


# ---------------------------------------------------------------- the stand-ins


@dataclass
class Traces:
    """One network's traces in a bundle, by input signature, each loaded on its first call."""

    folder: Path
    kind: str  # "text", "unet", "vae": the file name's prefix
    loaded: dict[tuple, Callable] = field(default_factory=dict)

    def __call__(self, *inputs: Tensor) -> Any:
        signature = input_signature(inputs)
        if signature not in self.loaded:
            try:
                self.loaded[signature] = load_trace(self.folder / trace_name(self.kind, signature))
            except (RuntimeError, OSError, ValueError) as error:  # absent, damaged, or another torch's
                raise FrozenMiss(f"no usable {self.kind} trace for {signature} ({error})") from None
        # As TracedUNet runs them: without the profiling executor's re-optimizing first runs.
        try:
            with torch.jit.optimized_execution(False):
                return self.loaded[signature](*inputs)
        except RuntimeError as error:  # a trace this torch loads but cannot run
            raise FrozenMiss(f"the {self.kind} trace for {signature} failed ({error})") from None


def trace_name(kind: str, signature: tuple) -> str:
    return f"trace-{kind}-{hashlib.sha256(repr(signature).encode()).hexdigest()[:16]}.pt"


class FrozenTextEncoder(torch.nn.Module):
    """What sfumato.text calls of a CLIPTextModel: every layer's hidden states, the final norm."""

    def __init__(self, traces: Traces, final_layer_norm: torch.nn.Module, num_hidden_layers: int):
        super().__init__()
        self.traces = traces
        self.final_layer_norm = final_layer_norm
        self.config = SimpleNamespace(num_hidden_layers=num_hidden_layers)
        self.device = torch.device("cpu")

    def forward(self, input_ids: Tensor, output_hidden_states: bool = True) -> SimpleNamespace:
        return SimpleNamespace(hidden_states=self.traces(input_ids))


class FrozenUNet(torch.nn.Module):
    """Called as UNetDenoiser calls a diffusers UNet: (sample, timestep, encoder_hidden_states)."""

    def __init__(self, traces: Traces, dtype: torch.dtype):
        super().__init__()
        self.traces = traces
        self.dtype = dtype

    def forward(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor,
                return_dict: bool = False, **extra: Any) -> tuple[Tensor]:
        if extra or return_dict:
            raise FrozenMiss("the UNet was called with extra conditioning")
        return (self.traces(sample, timestep, encoder_hidden_states),)


class FrozenVAE(torch.nn.Module):
    """The decoding half of what sfumato.latents uses of an AutoencoderKL."""

    encoder = None  # the pipeline names it to page it out; a bundle holds no encoder

    def __init__(self, traces: Traces, config: dict, dtype: torch.dtype):
        super().__init__()
        self.traces = traces
        self.config = SimpleNamespace(**config)
        self.dtype = dtype
        self.device = torch.device("cpu")

    def decode(self, z: Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=self.traces(z))

    def tiled_decode(self, z: Tensor) -> SimpleNamespace:
        raise FrozenMiss("tiled decoding")

    def encode(self, x: Tensor) -> Any:
        raise FrozenMiss("encoding an image")


class BundledTokenizer:
    """The part of transformers' CLIPTokenizer that sfumato.text uses, on the `tokenizers`
    library's tokenizer that CLIPTokenizer itself wraps (saved from it as JSON): no transformers."""

    def __init__(self, spec: str, bos_token_id: int, eos_token_id: int, pad_token_id: int):
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_str(spec)
        self.backend.no_truncation()
        self.backend.no_padding()
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_token_id, eos_token_id, pad_token_id

    def __call__(self, texts: list[str], add_special_tokens: bool = True, **_unused: Any) -> dict:
        # padding/truncation/verbose: sfumato.text asks for none of them, and chunks itself.
        encodings = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in encodings]}

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.backend.token_to_id(token)


def load_bundle(folder: Path, model: str | Path | None) -> Model:
    """The bundle in `folder`, of the model files at `model`, as a Model for the Pipeline
    (`frozen=True`); FrozenMiss where it is incomplete or damaged."""
    path = Path(model or BUILTIN_MODEL)
    try:
        meta = json.loads((folder / META).read_text())
        norms = [load_trace(folder / f"text-norm-{i}.pt") for i in range(len(meta["text_encoders"]))]
        specs = [(folder / f"tokenizer-{i}.json").read_text() for i in range(len(meta["tokenizers"]))]
        loaded = Model(
            family=meta["family"],
            unet=FrozenUNet(Traces(folder, "unet"), getattr(torch, meta["unet_dtype"])),
            vae=FrozenVAE(Traces(folder, "vae"), meta["vae_config"], getattr(torch, meta["vae_dtype"])),
            text_encoders=[FrozenTextEncoder(Traces(folder, f"text{i}"), norm, layers)
                           for i, (norm, layers) in enumerate(zip(norms, meta["text_encoders"], strict=True))],
            tokenizers=[BundledTokenizer(spec, **ids) for spec, ids in zip(specs, meta["tokenizers"], strict=True)],
            prediction_type=meta["prediction_type"],
            alphas_cumprod=torch.tensor(meta["alphas_cumprod"], dtype=torch.float64),
            default_size=meta["default_size"], hash=meta["hash"],
            # as load_model names it: two copies of the same files share a bundle, not a name
            name=path.stem if path.is_file() else path.name, path=path, frozen=True)
    except Exception as error:  # noqa: BLE001  (whatever is wrong with a cache file means "use the full model")
        raise FrozenMiss(f"no usable bundle in {folder} ({error})") from None
    with contextlib.suppress(OSError):
        (folder / META).touch()  # most recently used: kept when bundles are pruned
    return loaded


# ---------------------------------------------------------------- making a bundle


@dataclass
class Seen:
    """The inputs of each network's calls during one generation, one example per signature."""

    text: list[dict[tuple, Tensor]]
    unet: dict[tuple, tuple[Tensor, ...]] = field(default_factory=dict)
    vae: dict[tuple, Tensor] = field(default_factory=dict)
    unsupported: bool = False  # a call a trace cannot stand in for (SDXL's extra conditioning)


@contextlib.contextmanager
def recording(pipe: Any) -> Iterator[Seen]:
    """Note the inputs of the pipeline's network calls while the block runs."""
    model = pipe.model
    seen = Seen(text=[{} for _ in model.text_encoders])

    def note(store: dict, inputs: tuple[Tensor, ...]) -> None:
        store.setdefault(input_signature(inputs), tuple(t.detach().clone() for t in inputs))

    def on_unet(_module, args, kwargs):  # UNetDenoiser's call: (sample, timestep, encoder_hidden_states=)
        if len(args) != 2 or set(kwargs) - {"encoder_hidden_states", "return_dict"}:
            seen.unsupported = True
            return
        note(seen.unet, (*args, kwargs["encoder_hidden_states"]))

    def on_text(index: int) -> Callable:
        return lambda _module, _args, kwargs: note(seen.text[index], (kwargs["input_ids"],))

    hooks = [pipe.unet.unet.register_forward_pre_hook(on_unet, with_kwargs=True)]
    hooks += [encoder.register_forward_pre_hook(on_text(i), with_kwargs=True)
              for i, encoder in enumerate(model.text_encoders)]
    decode = model.vae.decode

    def decode_noting(z: Tensor, *args: Any, **kwargs: Any) -> Any:
        note(seen.vae, (z,))
        return decode(z, *args, **kwargs)

    model.vae.decode = decode_noting  # the decode is a method, not a module call: no hook sees it
    try:
        yield seen
    finally:
        del model.vae.decode
        for hook in hooks:
            hook.remove()


class _TextCall(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: Tensor) -> tuple[Tensor, ...]:
        return self.encoder(input_ids=input_ids, output_hidden_states=True).hidden_states


class _DecodeCall(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, z: Tensor) -> Tensor:
        return self.vae.decode(z, return_dict=False)[0]


def save_bundle(pipe: Any, seen: Seen, folder: Path) -> None:
    """Add the traces of what `seen` saw to the bundle in `folder` (created if new)."""
    model = pipe.model
    if seen.unsupported or model.family == "sdxl":
        return
    from sfumato.text import _final_layer_norm

    def save(kind: str, signature: tuple, make: Callable[[], torch.jit.ScriptModule]) -> None:
        path = folder / trace_name(kind, signature)
        if not path.exists():
            save_trace(path, make())

    def unet_trace(inputs: tuple[Tensor, ...]) -> torch.jit.ScriptModule:
        called = pipe.unet.unet  # the jit lever's TracedUNet has traced these shapes already
        if isinstance(called, TracedUNet):
            trace = called.trace_for(inputs)
            if trace is None:
                raise RuntimeError("the UNet could not be traced")
            return trace
        return trace_unet(model.unet, inputs)

    for signature, inputs in seen.unet.items():
        save("unet", signature, lambda inputs=inputs: unet_trace(inputs))
    for signature, (z,) in seen.vae.items():
        save("vae", signature, lambda z=z: freeze_trace(_DecodeCall(model.vae), (z,), optimize_numerics=False))
    for i, encoder in enumerate(model.text_encoders):
        for signature, inputs in seen.text[i].items():
            save(f"text{i}", signature, lambda e=encoder, inputs=inputs: freeze_trace(_TextCall(e), inputs, optimize_numerics=False))
        norm = folder / f"text-norm-{i}.pt"
        if not norm.exists():
            save_trace(norm, torch.jit.script(_final_layer_norm(encoder)))
    for i, tokenizer in enumerate(model.tokenizers):
        spec = folder / f"tokenizer-{i}.json"
        if not spec.exists():  # per model, like the norms: 1.6 MB not written again for each new shape
            write_bytes_atomic(spec, tokenizer.backend_tokenizer.to_str().encode())
    vae_config = {name: getattr(model.vae.config, name, None)
                  for name in ("block_out_channels", "latent_channels", "scaling_factor", "shift_factor")}
    meta = {
        "family": model.family, "prediction_type": model.prediction_type,
        "alphas_cumprod": model.alphas_cumprod.tolist(), "default_size": model.default_size,
        "hash": model.hash, "vae_config": vae_config,
        "unet_dtype": str(model.unet.dtype).removeprefix("torch."),
        "vae_dtype": str(model.vae.dtype).removeprefix("torch."),
        "text_encoders": [e.config.num_hidden_layers for e in model.text_encoders],
        "tokenizers": [{"bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id,
                        "pad_token_id": t.pad_token_id} for t in model.tokenizers],
    }
    write_bytes_atomic(folder / META, json.dumps(meta).encode())
    prune(folder, KEEP_TRACES, "trace-*.pt")  # one file per network and shape; the rest is per model
    _prune_bundles(folder.parent, KEEP_BUNDLES)


def _prune_bundles(parent: Path, keep: int) -> None:
    def last_used(folder: Path) -> float:  # a bundle still being written has no META yet
        meta = folder / META
        try:
            return (meta if meta.exists() else folder).stat().st_mtime
        except OSError:
            return 0.0

    bundles = sorted((p for p in parent.iterdir() if p.is_dir()), key=last_used, reverse=True)
    for old in bundles[keep:]:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- one generation, as the CLI runs it


def generate_once(model: str | None, params: Any, *, vae: str | None = None, device: str | None = None,
                  allow_pickle: bool = False, lora_dir: str | None = None,
                  levers: accel.Levers | None = None, init_image: Any = None,
                  callback: Callable | None = None) -> list:
    """Load, generate, and let the process end: from the model's bundle where it serves the request,
    else from the full model (then saving the bundle, for a small model on the CPU)."""
    from sfumato.pipeline import Pipeline

    levers = levers or accel.Levers()
    folder = None
    if serves(params, vae=vae, device=device, levers=levers, init_image=init_image):
        folder = bundle_folder(model, levers, allow_pickle)
        if folder is not None and (folder / META).exists():
            try:
                return _generate_from_bundle(folder, model, params, lora_dir, levers, callback)
            except FrozenMiss as miss:
                log.info("running the full model: %s", miss)
    pipe = Pipeline.load(model, vae=vae, device=device, allow_pickle=allow_pickle, lora_dir=lora_dir,
                         levers=levers)
    if folder is None or not accel.traces_unet(levers, pipe.model, pipe.device):
        return pipe.generate(params, callback=callback, init_image=init_image)
    with recording(pipe) as seen:
        images = pipe.generate(params, callback=callback, init_image=init_image)
    try:
        save_bundle(pipe, seen, folder)
    except Exception as error:  # noqa: BLE001  (a read-only or full cache, an untraceable network: the
        # images are made and must be saved; the next run is only slower)
        log.warning("could not save the model's traces in %s (%s)", folder, error)
    return images


def _generate_from_bundle(folder: Path, model: str | Path | None, params: Any, lora_dir: str | None,
                          levers: accel.Levers, callback: Callable | None) -> list:
    from sfumato.latents import TILE_ABOVE_PIXELS

    pipe = bundle_pipeline(folder, model, lora_dir, levers)
    size = pipe.model.default_size
    if (params.width or size) * (params.height or size) > TILE_ABOVE_PIXELS:
        raise FrozenMiss("an image decoded in tiles")  # before sampling, not after
    return pipe.generate(params, callback=callback)


def bundle_pipeline(folder: Path, model: str | Path | None, lora_dir: str | None = None,
                    levers: accel.Levers | None = None) -> Any:
    """A Pipeline on the bundle in `folder` (FrozenMiss where it is unusable)."""
    from sfumato.pipeline import Pipeline

    return Pipeline(load_bundle(folder, model), torch.device("cpu"), torch.float32, lora_dir, levers)
