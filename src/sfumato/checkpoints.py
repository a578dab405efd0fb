"""Checkpoints: a Stable Diffusion file or diffusers folder -> Model; and a folder -> one file.

Sources:
  * one .safetensors in SD's original layout (what people download for SD1, SD2, SDXL);
    the diffusers configs come from src/sfumato/data/configs (no hub access ever), or from the
    file's own "sfumato.configs" metadata when sfumato exported it (non-standard sizes);
  * a diffusers folder (model_index.json, unet/, vae/, text_encoder/[, text_encoder_2/]).
Pickles (.ckpt/.pt/.pth/.bin) can run code when loaded: refused unless allow_pickle=True.

Prediction type (epsilon or v), first rule that applies:
  1. the `prediction_type=` argument;  2. a diffusers scheduler config (folder, sfumato metadata);
  3. a "v_pred" key in the file (the marker ComfyUI and Forge read for v-prediction models);
  4. SD2: ComfyUI's test, v when the std of output_blocks.11.1's first norm1.bias > 0.09, as
     in the 768-v models (and v when that tensor is absent, like diffusers' SD2 default);
  5. epsilon.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sfumato import convert
from sfumato.convert import detect_family, detect_prediction_type, export_single_file  # noqa: F401
from sfumato.errors import CheckpointError
from sfumato.files import atomic_path, write_bytes_atomic

log = logging.getLogger(__name__)

BUILTIN_MODEL = Path(__file__).parent / "models" / "builtin"
CONFIGS = Path(__file__).parent / "data" / "configs"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
TEXT_ENCODER_CLASSES = {"text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"}
PAD_TOKENS = {"sd1": ["<|endoftext|>"], "sd2": ["!"], "sdxl": ["<|endoftext|>", "!"]}
META_CONFIGS, META_FAMILY = "sfumato.configs", "sfumato.family"
CONVERTED_KEPT = 3  # converted copies kept in the cache, most recently used first (SD1.5: 2.1 GB each)


@dataclass
class Model:
    family: str               # "sd1" | "sd2" | "sdxl"
    unet: Any                 # diffusers UNet2DConditionModel
    vae: Any                  # diffusers AutoencoderKL
    text_encoders: list       # CLIPTextModel / CLIPTextModelWithProjection
    tokenizers: list          # CLIPTokenizer, one per encoder
    prediction_type: str      # "epsilon" | "v_prediction"
    alphas_cumprod: Tensor    # (1000,) float64
    default_size: int         # 512 / 768 / 1024 / 128
    name: str
    hash: str                 # A1111 "Model hash": sha256[:10] of the file (folders: unet weights)
    path: Path
    frozen: bool = False      # the networks are traces standing in for them (sfumato.frozen)


# ---------------------------------------------------------------- reading files


class Weights:
    """Tensor names, on-demand tensor reads and metadata of one checkpoint file."""

    def __init__(self, handle: Any, metadata: dict[str, str], copies: CopyingReader | None = None):
        self._handle = handle      # a safetensors safe_open handle, or a plain dict (pickle)
        self._copies = copies      # reads tensors into memory of their own, converted (see below)
        self.metadata = metadata
        self.keys = list(handle.keys())

    def get(self, key: str) -> Tensor:
        if isinstance(self._handle, dict):
            return self._handle[key]
        if self._copies is not None:
            return self._copies.get(key)
        return self._handle.get_tensor(key)

    def shape_and_dtype(self, key: str) -> tuple[list[int], str]:
        if isinstance(self._handle, dict):
            t = self._handle[key]
            return list(t.shape), str(t.dtype).removeprefix("torch.")
        part = self._handle.get_slice(key)
        return part.get_shape(), part.get_dtype()

    def take(self, prefixes: Iterable[str]) -> dict[str, Tensor]:
        """Every tensor under these prefixes (one component), read now."""
        prefixes = tuple(prefixes)
        return {k: self.get(k) for k in self.keys if k.startswith(prefixes)}


def _require_exists(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"Model path not found: {path}")


# safetensors' dtype names (its format spec) -> torch dtypes
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


class CopyingReader:
    """Tensors of a .safetensors file read with plain file reads, each into memory of its own and
    converted to `dtype` (floating-point ones) as it arrives.

    Written by hand because safetensors has no such read: its tensors are views of one memory
    map, and every page a conversion touches stays in the process's resident memory until the
    whole file is unmapped. Converting SD1.5's 4.3 GB fp32 file to fp16 that way peaks at 6.4 GB;
    read like this it peaks at the 2.1 GB it keeps plus one tensor."""

    CHUNK_BYTES = 8 << 20  # one reused read buffer: no per-tensor temporaries to fragment the heap

    def __init__(self, path: Path, dtype: torch.dtype):
        self._file = open(path, "rb")  # noqa: SIM115 (closed by close())
        size = int.from_bytes(self._file.read(8), "little")
        header = json.loads(self._file.read(size))
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.entries: dict[str, dict] = header
        self._data_start = 8 + size
        self._buffer = torch.empty(0, dtype=torch.uint8)
        self.dtype = dtype

    def dtypes(self, key: str) -> tuple[torch.dtype, torch.dtype]:
        """The dtype a tensor is stored in, and the one it is read as."""
        entry = self.entries[key]
        stored = SAFETENSORS_DTYPES.get(entry["dtype"])
        if stored is None:
            raise CheckpointError(f"{key} is stored as {entry['dtype']}, a dtype sfumato can't read; "
                                  f"it reads {', '.join(SAFETENSORS_DTYPES)}.")
        return stored, self.dtype if stored.is_floating_point else stored

    def nbytes(self, key: str) -> int:
        """The size of a tensor as read."""
        return math.prod(self.entries[key]["shape"]) * self.dtypes(key)[1].itemsize

    def get(self, key: str) -> Tensor:
        entry = self.entries[key]
        stored, wanted = self.dtypes(key)
        out = torch.empty(entry["shape"], dtype=wanted)
        begin, end = entry["data_offsets"]
        self._file.seek(self._data_start + begin)
        if wanted == stored:
            self._file.readinto(memoryview(out.view(-1).view(torch.uint8).numpy()))
            return out
        if not len(self._buffer):
            self._buffer = torch.empty(self.CHUNK_BYTES, dtype=torch.uint8)
        flat, done, item = out.view(-1), 0, stored.itemsize
        for start in range(0, end - begin, self.CHUNK_BYTES):
            n = min(self.CHUNK_BYTES, end - begin - start)
            self._file.readinto(memoryview(self._buffer[:n].numpy()))
            flat[done:done + n // item].copy_(self._buffer[:n].view(stored))
            done += n // item
        return out

    def converts_any(self) -> bool:
        """Whether any floating-point tensor of the file is stored in another dtype than `dtype`."""
        stored = {SAFETENSORS_DTYPES.get(e["dtype"]) for e in self.entries.values()}
        return any(d is not None and d.is_floating_point and d != self.dtype for d in stored)

    def close(self) -> None:
        self._file.close()


def write_converted(reader: CopyingReader, out: Path) -> None:
    """The reader's file again, its floating-point tensors in the reader's dtype, written atomically
    with one tensor in memory at a time. By hand: safetensors' writer takes every tensor at once."""
    header: dict[str, Any] = {}
    offset = 0
    for key, entry in reader.entries.items():
        size = reader.nbytes(key)
        header[key] = {"dtype": SAFETENSORS_NAMES[reader.dtypes(key)[1]], "shape": entry["shape"],
                       "data_offsets": [offset, offset + size]}
        offset += size
    if reader.metadata:
        header["__metadata__"] = reader.metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the format's 8-byte alignment of the tensor data
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for key in reader.entries:  # in the order of the offsets above
            f.write(memoryview(reader.get(key).reshape(-1).view(torch.uint8).numpy()))


def converted_path(path: Path, dtype: torch.dtype) -> Path:
    """Where the cache keeps `path` converted to `dtype`, named by the source's sha256."""
    name = f"{sha256_file(path)[:32]}-{str(dtype).removeprefix('torch.')}.safetensors"
    return cache_folder() / "converted" / name


def converted_copy(reader: CopyingReader, path: Path) -> Path | None:
    """The checkpoint at `path` converted to the reader's dtype, as a file in the cache: written on
    its first load, memory-mapped on every later one. Its tensors are then clean pages of a file
    that the OS can drop while they rest (accel.page_out), where converted on each load they would
    be memory of the process's own; and a load skips the conversion (SD1.5 fp32: ~16 s -> 3.4 s).
    The CONVERTED_KEPT most recently used copies are kept. None where the cache can't hold one."""
    out = converted_path(path, reader.dtype)
    try:
        if out.exists():
            with contextlib.suppress(OSError):  # a read-only cache still serves its copies
                os.utime(out)  # most recently used
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        needed = sum(reader.nbytes(key) for key in reader.entries)
        if shutil.disk_usage(out.parent).free < needed + (1 << 30):  # never fill the disk to the brim
            log.info("not enough free disk for a converted copy of %s in %s", path.name, out.parent)
            return None
        write_converted(reader, out)
    except OSError as e:  # a read-only or full cache: convert on each load, as before
        log.warning("can't keep a converted copy of %s in %s (%s)", path.name, out.parent, e)
        return None
    copies = sorted(out.parent.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in copies[CONVERTED_KEPT:]:
        old.unlink(missing_ok=True)  # a process that has it mapped keeps reading it
    return out


@contextlib.contextmanager
def open_weights(path: Path, *, allow_pickle: bool = False, dtype: torch.dtype | None = None,
                 keep_converted: bool = False) -> Iterator[Weights]:
    """Open a .safetensors file (or a pickle, only when allowed). Tensors are views of a memory
    map, so unused ones cost nothing; when `dtype` is given and the file holds another one, they
    are read as converted copies instead (CopyingReader: the map would hold both at the peak), or
    with `keep_converted` from a converted copy of the file kept in the cache (converted_copy)."""
    from safetensors import safe_open

    path = Path(path)
    _require_exists(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        yield Weights(_load_pickle(path, allow_pickle), {})
        return
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        metadata = handle.metadata() or {}
    except Exception as e:  # safetensors raises its own error type for every kind of bad file
        raise CheckpointError(
            f"{path} is not a readable .safetensors file ({e}). It may be truncated (an "
            "interrupted download) or another kind of file; re-download or re-export it.") from None
    copies = CopyingReader(path, dtype) if dtype is not None else None
    if copies is not None and not copies.converts_any():
        copies.close()
        copies = None
    if copies is not None and keep_converted and (converted := converted_copy(copies, path)) is not None:
        try:
            handle = safe_open(str(converted), framework="pt", device="cpu")
            copies.close()
            copies = None
        except Exception as e:  # damaged on disk since: read the checkpoint itself, write it anew next time
            log.warning("the converted copy %s is unreadable (%s); removed", converted, e)
            converted.unlink(missing_ok=True)
    try:
        with handle:
            yield Weights(handle, metadata, copies)
    finally:
        if copies is not None:
            copies.close()


def _load_pickle(path: Path, allow_pickle: bool) -> dict[str, Tensor]:
    if not allow_pickle:
        raise CheckpointError(
            f"{path.name} is a pickle checkpoint ({path.suffix}); loading a pickle can run "
            "arbitrary code. Convert it to .safetensors, or pass --allow-pickle "
            "(allow_pickle=True) if you trust where it came from.")
    try:  # weights_only refuses anything but tensors and plain containers
        obj = _torch_load(path)
    except Exception as e:
        raise CheckpointError(f"Can't read pickle checkpoint {path}: {e}") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no state dict of tensors.")
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def _torch_load(path: Path) -> Any:
    try:  # memory-mapped when the file is in torch's zip format (every torch.save since 1.6)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "zip" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """The file's sha256, cached on disk by (path, size, mtime) as A1111 does: hashing a 4 GB
    checkpoint takes seconds, more than loading it from a warm page cache."""
    path = Path(path).resolve()
    stat = path.stat()
    key, stamp = str(path), [stat.st_size, stat.st_mtime_ns]
    cache = _read_hash_cache()
    if cache.get(key, {}).get("stamp") == stamp:
        return cache[key]["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    cache[key] = {"stamp": stamp, "sha256": digest.hexdigest()}
    with contextlib.suppress(OSError):  # a read-only home is no reason to fail a load
        write_bytes_atomic(hash_cache_path(), json.dumps(cache).encode())
    return cache[key]["sha256"]


def cache_folder() -> Path:
    """sfumato's cache: $SFUMATO_CACHE, else $XDG_CACHE_HOME/sfumato, else ~/.cache/sfumato."""
    base = os.environ.get("SFUMATO_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sfumato"
    return Path(base)


def hash_cache_path() -> Path:
    return cache_folder() / "hashes.json"


def _read_hash_cache() -> dict:
    try:
        data = json.loads(hash_cache_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------- recognizing a checkpoint


def _check_prediction_type(value: str) -> str:
    if value not in ("epsilon", "v_prediction"):
        raise CheckpointError(f"prediction_type must be 'epsilon' or 'v_prediction', not {value!r}.")
    return value


def _shipped_configs(family: str, prediction_type: str) -> dict[str, dict]:
    name = {"sd1": "sd15", "sdxl": "sdxl"}.get(family, "sd2-v" if prediction_type == "v_prediction" else "sd2")
    folder = CONFIGS / name
    configs = {"unet": _read_json(folder / "unet" / "config.json"),
               "vae": _read_json(folder / "vae" / "config.json"),
               "scheduler": _read_json(folder / "scheduler" / "scheduler_config.json"),
               "text_encoder": _read_json(folder / "text_encoder" / "config.json")}
    if (folder / "text_encoder_2").is_dir():
        configs["text_encoder_2"] = _read_json(folder / "text_encoder_2" / "config.json")
    return configs


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"Can't read config {path}: {e}") from None


def _metadata_configs(metadata: dict[str, str]) -> dict | None:
    if META_CONFIGS not in metadata:
        return None
    try:
        return json.loads(metadata[META_CONFIGS])
    except ValueError:
        raise CheckpointError(f"The file's '{META_CONFIGS}' metadata is not valid JSON.") from None


# ---------------------------------------------------------------- building components


def _fill(module: torch.nn.Module, state: dict[str, Tensor], what: str, device, dtype) -> Any:
    """Put `state` into a module built on the meta device; every weight must match."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"The {what} weights don't fit the architecture: {len(missing)} missing "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}.")
    wrong = [k for k, v in state.items() if v.shape != expected[k].shape]
    if wrong:
        raise CheckpointError(f"The {what} weights have the wrong shapes for its architecture, "
                              f"e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)} instead of "
                              f"{tuple(expected[wrong[0]].shape)}.")
    module.load_state_dict(state, strict=True, assign=True)
    # plain nn.Module.to: diffusers' override warns about fp32-only modules even when it has none
    return torch.nn.Module.to(module, device=device, dtype=dtype).eval()


def _empty(factory: Any) -> Any:
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on "meta": no memory until the weights arrive
        return factory()


def _text_encoder_class(config: dict) -> Any:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    arch = (config.get("architectures") or ["CLIPTextModel"])[0]
    return CLIPTextModelWithProjection if arch == "CLIPTextModelWithProjection" else CLIPTextModel


def _build_text_encoder(config: dict, weights: Weights, prefix: str, device, dtype) -> Any:
    from transformers import CLIPTextConfig

    clip_config = CLIPTextConfig.from_dict(config)
    model = _empty(lambda: _text_encoder_class(config)(clip_config))
    state = convert.text_encoder_to_diffusers(weights.take([prefix]), prefix,
                                              clip_config.hidden_size, not hasattr(model, "text_model"))
    return _fill(model, state, f"text encoder ({prefix}*)", device, dtype)


def _build_vae(config: dict, ldm: dict[str, Tensor], device, dtype) -> Any:
    from diffusers import AutoencoderKL

    if not ldm:
        raise CheckpointError("The checkpoint has no VAE weights (first_stage_model.*); pass one with --vae.")
    state = convert.vae_to_diffusers(ldm, config)
    return _fill(_empty(lambda: AutoencoderKL.from_config(config)), state, "VAE", device, dtype)


def _load_vae_override(path: Path, config: dict, device, dtype, allow_pickle: bool) -> Any:
    path = Path(path)
    _require_exists(path)
    if path.is_dir():
        return _from_pretrained("AutoencoderKL", path, device, dtype, allow_pickle)
    with open_weights(path, allow_pickle=allow_pickle, dtype=dtype) as weights:
        return _build_vae(config, weights.take([""]), device, dtype)


def build_components(weights: Weights, *, device="cpu", dtype: torch.dtype = torch.float32,
                     prediction_type: str | None = None, vae: Path | None = None,
                     allow_pickle: bool = False) -> dict[str, Any]:
    """UNet, VAE and text encoders from original-layout weights, one component at a time."""
    from diffusers import UNet2DConditionModel

    meta_configs = _metadata_configs(weights.metadata)
    family = weights.metadata.get(META_FAMILY) or detect_family(weights.keys)
    if family not in PAD_TOKENS:
        raise CheckpointError(f"Unknown model family {family!r} in the file's metadata.")
    prediction = prediction_type or detect_prediction_type(family, weights, meta_configs)
    configs = meta_configs or _shipped_configs(family, prediction)
    unet_state = convert.unet_to_diffusers(weights.take([convert.UNET]), configs["unet"])
    unet = _fill(_empty(lambda: UNet2DConditionModel.from_config(configs["unet"])),
                 unet_state, "UNet", device, dtype)
    del unet_state
    if vae is None:
        vae_model = _build_vae(configs["vae"], weights.take([convert.VAE]), device, dtype)
    else:
        vae_model = _load_vae_override(vae, configs["vae"], device, dtype, allow_pickle)
    encoders = [_build_text_encoder(configs[name], weights, prefix, device, dtype)
                for name, prefix in convert.TEXT_ENCODER_PREFIXES[family].items()]
    return {"family": family, "unet": unet, "vae": vae_model, "text_encoders": encoders,
            "scheduler": configs["scheduler"], "prediction_type": prediction,
            "pad_tokens": PAD_TOKENS[family]}


def _load_single_file(path: Path, device, dtype, allow_pickle: bool, prediction_type: str | None,
                      vae: Path | None, keep_converted: bool = False) -> dict[str, Any]:
    with open_weights(path, allow_pickle=allow_pickle, dtype=dtype, keep_converted=keep_converted) as weights:
        parts = build_components(weights, device=device, dtype=dtype, prediction_type=prediction_type,
                                 vae=vae, allow_pickle=allow_pickle)
    return {**parts, "hash": sha256_file(path)[:10]}


# ---------------------------------------------------------------- diffusers folders


def folder_family(folder: Path) -> str:
    if (folder / "text_encoder_2").is_dir():
        return "sdxl"
    act = _read_json(folder / "text_encoder" / "config.json").get("hidden_act")
    return "sd2" if act == "gelu" else "sd1"  # OpenCLIP-H uses gelu, OpenAI CLIP-L quick_gelu


def _weight_files(sub: Path) -> list[Path]:
    return sorted(p for p in sub.glob("*") if p.suffix in (".safetensors", ".bin"))


def _from_pretrained(kind: str, sub: Path, device, dtype, allow_pickle: bool) -> Any:
    import diffusers
    import transformers

    files = _weight_files(sub)
    if not files:
        raise CheckpointError(f"No weights (.safetensors) in {sub}.")
    safetensors = any(p.suffix == ".safetensors" for p in files)
    if not safetensors:
        _load_pickle(files[0], allow_pickle)  # refuses with the pickle message unless allowed
    if kind.startswith("CLIP") and (model := _saved_text_encoder(kind, sub, device, dtype)) is not None:
        return model
    try:
        if kind.startswith("CLIP"):
            model = getattr(transformers, kind).from_pretrained(
                sub, dtype=dtype, local_files_only=True, use_safetensors=safetensors)
        else:
            model = getattr(diffusers, kind).from_pretrained(
                sub, torch_dtype=dtype, local_files_only=True, use_safetensors=safetensors)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"Can't load {kind} from {sub}: {e}") from None
    return model.to(device).eval()


def _saved_text_encoder(kind: str, sub: Path, device, dtype) -> Any | None:
    """A text encoder saved as config.json + model.safetensors, built the way the single-file
    path builds one. Not from_pretrained, for start-up time alone: on its first call in a
    process, transformers 5 compiles the key-renaming rules of every architecture it knows
    (~0.3 s of the built-in model's ~1.5 s load on a busy 2-core CPU); the weights are the same.
    None for any other layout (shards, older key names): from_pretrained handles those."""
    import transformers

    file = sub / "model.safetensors"
    if not file.is_file():
        return None
    config = transformers.CLIPTextConfig.from_dict(_read_json(sub / "config.json"))
    model = _empty(lambda: getattr(transformers, kind)(config))
    # transformers 4 (and sfumato's trainer, to stay loadable there) keep CLIPTextModel's weights
    # under "text_model."; transformers 5 flattened that module away.
    prefix = "" if hasattr(model, "text_model") else "text_model."
    with open_weights(file, dtype=dtype) as weights:
        state = {key.removeprefix(prefix): weights.get(key) for key in weights.keys}
    if state.keys() != model.state_dict().keys():
        return None
    return _fill(model, state, f"text encoder ({sub})", device, dtype)


def _folder_pad_tokens(folder: Path, family: str) -> list[str]:
    """Pad tokens from the folder's tokenizer configs when present, else the family's."""
    pads = list(PAD_TOKENS[family])
    for i, name in enumerate(["tokenizer", "tokenizer_2"][: len(pads)]):
        special = folder / name / "special_tokens_map.json"
        if special.is_file():
            pad = _read_json(special).get("pad_token")
            pads[i] = pad.get("content", pads[i]) if isinstance(pad, dict) else pad or pads[i]
    return pads


def _unet_weights_file(folder: Path) -> Path:
    files = _weight_files(folder / "unet")
    plain = [p for p in files if p.stem == "diffusion_pytorch_model"]
    return (plain or files)[0]


def load_folder_components(folder: Path, device="cpu", dtype=torch.float32,
                           allow_pickle: bool = False) -> dict[str, Any]:
    if not (folder / "unet").is_dir() or not (folder / "text_encoder").is_dir():
        raise CheckpointError(f"{folder} is not a diffusers model folder (expected model_index.json, "
                              "unet/, vae/, text_encoder/ and scheduler/).")
    family = folder_family(folder)
    return {
        "family": family,
        "unet": _from_pretrained("UNet2DConditionModel", folder / "unet", device, dtype, allow_pickle),
        "vae": _from_pretrained("AutoencoderKL", folder / "vae", device, dtype, allow_pickle),
        "text_encoders": [_from_pretrained(kind, folder / name, device, dtype, allow_pickle)
                          for name, kind in TEXT_ENCODER_CLASSES.items()
                          if name in convert.TEXT_ENCODER_PREFIXES[family]],
        "scheduler": _read_json(folder / "scheduler" / "scheduler_config.json"),
    }


def _load_folder(folder: Path, device, dtype, allow_pickle: bool, prediction_type: str | None,
                 vae: Path | None, keep_converted: bool = False) -> dict[str, Any]:
    parts = load_folder_components(folder, device, dtype, allow_pickle)
    if vae is not None:
        parts["vae"] = _load_vae_override(vae, dict(parts["vae"].config), device, dtype, allow_pickle)
    parts["prediction_type"] = prediction_type or parts["scheduler"].get("prediction_type", "epsilon")
    parts["pad_tokens"] = _folder_pad_tokens(folder, parts["family"])
    parts["hash"] = sha256_file(_unet_weights_file(folder))[:10]
    return parts


# ---------------------------------------------------------------- the public loader


def alphas_cumprod(scheduler: dict) -> Tensor:
    """The training noise schedule in float64 (diffusers' schedulers compute it in float32)."""
    n = scheduler.get("num_train_timesteps", 1000)
    start, end = scheduler.get("beta_start", 0.00085), scheduler.get("beta_end", 0.012)
    schedule = scheduler.get("beta_schedule", "scaled_linear")
    if scheduler.get("trained_betas"):
        betas = torch.tensor(scheduler["trained_betas"], dtype=torch.float64)
    elif schedule == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    elif schedule == "linear":
        betas = torch.linspace(start, end, n, dtype=torch.float64)
    else:
        raise CheckpointError(f"Unsupported beta_schedule {schedule!r}; sfumato knows "
                              "'scaled_linear' and 'linear'.")
    if scheduler.get("rescale_betas_zero_snr"):
        return zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, dim=0)


# What A1111 puts in place of a zero-SNR schedule's last alpha_bar = 0: sigma_max ~ 4500 instead of
# infinity, so that sigma-space samplers can start there (x = noise * sigma_max).
ZERO_SNR_LAST_ALPHA_BAR = 4.8973451890853435e-08


def zero_terminal_snr(betas: Tensor) -> Tensor:
    """alphas_cumprod rescaled to end at zero SNR (Lin et al. 2024, arXiv:2305.08891; diffusers'
    `rescale_betas_zero_snr`): the last step is pure noise, so the start of sampling carries none
    of an image's signal. Needs a v-prediction model (at zero SNR epsilon says nothing of x0)."""
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    alphas_cumprod = torch.cumprod(1.0 - rescale_zero_terminal_snr(betas), dim=0)
    alphas_cumprod[-1] = ZERO_SNR_LAST_ALPHA_BAR
    return alphas_cumprod


def _tokenizers(pad_tokens: list[str]) -> list:
    from sfumato.text import load_clip_tokenizer

    return [load_clip_tokenizer(pad_token=pad) for pad in pad_tokens]


def load_model(path: str | Path, *, vae: str | Path | None = None, device="cpu",
               dtype: torch.dtype = torch.float32, allow_pickle: bool = False,
               prediction_type: str | None = None, keep_converted: bool = False) -> Model:
    """Load a single-file SD checkpoint or a diffusers folder, fully offline.

    keep_converted: a single file stored in another dtype than `dtype` is read from a converted
    copy kept in the cache (converted_copy), written on its first load."""
    path = Path(path)
    _require_exists(path)
    if prediction_type is not None:
        _check_prediction_type(prediction_type)
    load = _load_folder if path.is_dir() else _load_single_file
    parts = load(path, device, dtype, allow_pickle, prediction_type, None if vae is None else Path(vae),
                 keep_converted)
    unet, vae_model = parts["unet"], parts["vae"]
    scale = 2 ** (len(vae_model.config.block_out_channels) - 1)
    return Model(family=parts["family"], unet=unet, vae=vae_model,
                 text_encoders=parts["text_encoders"], tokenizers=_tokenizers(parts["pad_tokens"]),
                 prediction_type=_check_prediction_type(parts["prediction_type"]),
                 alphas_cumprod=alphas_cumprod(parts["scheduler"]),
                 default_size=int(unet.config.sample_size) * scale,
                 name=path.stem if path.is_file() else path.name, hash=parts["hash"], path=path)


# ---------------------------------------------------------------- sfumato info


def _component_prefixes(family: str) -> dict[str, tuple[str, ...]]:
    return {"unet": (convert.UNET,), "vae": (convert.VAE,),
            **{n: (p,) for n, p in convert.TEXT_ENCODER_PREFIXES[family].items()}}


def _summarize(weights: Weights, prefixes: dict[str, tuple[str, ...]]) -> tuple[dict, set]:
    """Parameter count per component (from the headers alone) and the dtypes seen."""
    counts: dict[str, int] = dict.fromkeys(prefixes, 0)
    dtypes: set[str] = set()
    for key in weights.keys:
        shape, dtype = weights.shape_and_dtype(key)
        dtypes.add(dtype)
        name = next((n for n, p in prefixes.items() if key.startswith(p)), "other")
        counts[name] = counts.get(name, 0) + int(torch.Size(shape).numel())
    return counts, dtypes


def describe(path: str | Path, *, allow_pickle: bool = False) -> dict[str, Any]:
    """Facts for `sfumato info`: family, prediction type, components, dtypes, size, hashes."""
    path = Path(path)
    _require_exists(path)
    if path.is_dir():
        family = folder_family(path)
        components, dtypes = {}, set()
        for name in ["unet", "vae", "text_encoder", "text_encoder_2"]:
            files = [p for p in _weight_files(path / name) if p.suffix == ".safetensors"]
            for file in files[:1]:
                with open_weights(file) as weights:
                    counts, seen = _summarize(weights, {name: ("",)})
                components[name], dtypes = counts[name], dtypes | seen
        scheduler = _read_json(path / "scheduler" / "scheduler_config.json")
        hashed, metadata = _unet_weights_file(path), {}
        facts = {"format": "diffusers folder",
                 "prediction_type": scheduler.get("prediction_type", "epsilon")}
    else:
        with open_weights(path, allow_pickle=allow_pickle) as weights:
            metadata = weights.metadata
            family = metadata.get(META_FAMILY) or detect_family(weights.keys)
            prediction = detect_prediction_type(family, weights, _metadata_configs(metadata))
            components, dtypes = _summarize(weights, _component_prefixes(family))
        hashed, scheduler = path, (_metadata_configs(metadata) or {}).get("scheduler", {})
        facts = {"format": "single file (" + path.suffix.lstrip(".") + ")",
                 "prediction_type": prediction}
    if scheduler.get("rescale_betas_zero_snr"):  # other tools need telling (A1111: a setting)
        facts["noise_schedule"] = "zero terminal SNR (rescale_betas_zero_snr)"
    sha256 = sha256_file(hashed)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    sfumato_meta = {k: (json.loads(v) if k == META_CONFIGS else v)
                    for k, v in metadata.items() if k.startswith("sfumato.")}
    return {"path": str(path), "family": family, **facts,
            "components": {k: f"{v:,} params" for k, v in components.items()},
            "dtypes": ", ".join(sorted(dtypes)), "size_bytes": size, "sha256": sha256,
            "model_hash": sha256[:10], **({"sfumato": sfumato_meta} if sfumato_meta else {})}
