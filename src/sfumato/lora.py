"""LoRAs on a loaded model: find the file, read it, merge it into the weights, take it out again.

Mechanism: deltas are merged into the weights (W += s * up @ down, computed in fp32), and the
original weight of every touched layer is kept as a bit-exact copy. Removing a LoRA copies the
original back, so the base model is restored bit for bit, whatever the dtype. We chose merging
over forward hooks / peft adapters because generation then costs nothing extra per UNet step
(A1111 merges for the same reason); the price is one saved copy of each touched weight, kept on
the CPU so it does not take accelerator memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from sfumato.errors import LoraError
from sfumato.lora_formats import (
    TOKEN_EMBEDDING,
    BundledEmbedding,
    ModuleIndex,
    ParsedLora,
    name_tokens,
    parse_lora,
)

if TYPE_CHECKING:
    from sfumato.checkpoints import Model

log = logging.getLogger(__name__)

LoraSpec = tuple[str, float, float]  # (name or path, text-encoder weight, UNet weight)
SHORT_HASH_LENGTH = 12  # A1111's LoRA "shorthash"


@dataclass
class LoraReport:
    """How well one LoRA file fits the model it was applied to."""

    name: str
    path: Path
    matched_keys: int
    skipped_keys: list[str]
    layers: int
    embeddings: list[str] = field(default_factory=list)  # names of the embeddings it bundles


@dataclass
class LoadedLora:
    path: Path
    stamp: tuple[int, int]  # (mtime_ns, size): reload when the file changes
    short_hash: str
    parsed: ParsedLora


def model_components(model: Model) -> dict[str, nn.Module]:
    """The model's LoRA-targetable parts, named as diffusers (and peft keys) name them."""
    names = ["text_encoder", "text_encoder_2"]
    return {"unet": model.unet, **dict(zip(names, model.text_encoders, strict=False))}


def addnet_hash(path: Path) -> str:
    """sha256 of a safetensors file's tensor data, skipping the header (kohya's "addnet" hash).

    A1111 shows this hash for .safetensors LoRAs (unless the file's metadata carries
    sshs_model_hash, which kohya sets to the same value), so metadata stays independent of
    ss_* header edits."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        header_length = int.from_bytes(f.read(8), "little")
        f.seek(8 + header_length)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    if path.suffix.lower() != ".safetensors":
        raise LoraError(f"{path.name}: only .safetensors LoRA files are read "
                        "(.pt/.ckpt files are pickles, which can run code when loaded)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraError(f"cannot read LoRA file {path}: {e}") from None


def peft_default_alpha(path: Path) -> float | None:
    """peft keeps lora_alpha beside the weights, in adapter_config.json."""
    config = path.parent / "adapter_config.json"
    if not config.is_file():
        return None
    try:
        return float(json.loads(config.read_text())["lora_alpha"])
    except (ValueError, KeyError, TypeError):
        return None


def resolve_lora_path(name: str, lora_dir: Path | None, allow_paths: bool = True) -> Path:
    """The file a LoRA name means: an existing file path as given, else a file inside lora_dir.

    A name never escapes lora_dir: no absolute names, no `..`, no symlinks pointing outside."""
    given = Path(name).expanduser()
    if allow_paths and given.is_file():
        return given.resolve()
    if lora_dir is None:
        raise LoraError(f"LoRA {name!r} is not a file, and no LoRA folder is set (lora_dir)")
    folder = Path(lora_dir).resolve()
    if given.is_absolute() or ".." in given.parts:
        raise LoraError(f"LoRA name {name!r} must be a file name inside the LoRA folder {folder}")
    candidates = [folder / name, folder / f"{name}.safetensors"]
    if len(given.parts) == 1:  # a bare name may live in a subfolder, as in A1111
        candidates += sorted(folder.rglob(f"{name}.safetensors"))
    for candidate in candidates:
        if candidate.is_file():
            real = candidate.resolve()
            if not real.is_relative_to(folder):
                raise LoraError(f"LoRA {name!r} links outside the LoRA folder {folder}")
            return real
    available = sorted(p.stem for p in folder.rglob("*.safetensors"))[:20]
    raise LoraError(f"LoRA {name!r} not found in {folder}; available: {', '.join(available) or 'none'}")


def display_name(name: str) -> str:
    """The name shown in `Lora hashes:` (A1111 strips the characters that delimit that list)."""
    stem = Path(name).stem if name.endswith(".safetensors") or "/" in name else name
    return stem.replace(":", "").replace(",", "")


class LoraStack:
    """The set of LoRAs merged into one model. Only this object may change the model's weights
    while it holds LoRAs (it puts back the weights it set aside)."""

    def __init__(self, model: Model, lora_dir: str | Path | None = None, *, allow_paths: bool = True):
        self.components = model_components(model)
        self.tokenizers = dict(zip(["text_encoder", "text_encoder_2"], model.tokenizers, strict=False))
        self.index = ModuleIndex(self.components)
        self.lora_dir = Path(lora_dir) if lora_dir else None
        self.allow_paths = allow_paths  # False for untrusted prompts (a server): names only
        self.reports: dict[str, LoraReport] = {}
        self._originals: dict[tuple[str, str], Tensor] = {}  # the weights as loaded, on the CPU
        self._files: dict[Path, LoadedLora] = {}
        self._active: tuple = ()
        self._hashes: dict[str, str] = {}

    def activate(self, specs: list[LoraSpec]) -> dict[str, str]:
        """Apply exactly these LoRAs (removing any others); returns {name: A1111 short hash}.

        Every file is read and checked before the model is touched, so a bad file leaves the
        model as it was. Activating the set already applied does nothing."""
        loaded = [(display_name(n), self._load(n), te, unet) for n, te, unet in specs]
        key = tuple((lora.path, lora.stamp, te, unet) for _, lora, te, unet in loaded)
        if key == self._active:
            return dict(self._hashes)
        self._merge(self._factors([(lora.parsed, te, unet) for _, lora, te, unet in loaded]))
        self._active = key
        self._hashes = {name: lora.short_hash for name, lora, _, _ in loaded}
        self.reports = {name: LoraReport(name, lora.path, lora.parsed.matched_keys,
                                         lora.parsed.skipped_keys, len(lora.parsed.layers),
                                         [e.name for e in lora.parsed.embeddings])
                        for name, lora, _, _ in loaded}
        return dict(self._hashes)

    def set_aside(self) -> list[Tensor]:
        """The weights as loaded of the layers LoRAs are merged into now (read only by merges)."""
        return list(self._originals.values())

    @property
    def active(self) -> tuple:
        """What is applied now: (path, file stamp, te weight, unet weight) per LoRA."""
        return self._active

    def remove_all(self) -> None:
        self.activate([])

    def _load(self, name: str) -> LoadedLora:
        path = resolve_lora_path(name, self.lora_dir, self.allow_paths)
        stat = path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        cached = self._files.get(path)
        if cached is not None and cached.stamp == stamp:
            return cached
        tensors, metadata = read_safetensors(path)
        parsed = parse_lora(tensors, self.index, path.name, peft_default_alpha(path))
        if not parsed.layers and not parsed.embeddings:
            raise LoraError(f"{path.name}: none of its {len(tensors)} keys match a layer of this "
                            f"model (a LoRA for another model family?); e.g. {next(iter(tensors), '')}")
        if parsed.skipped_keys:
            log.warning("%s: %d keys matched, %d skipped (no such layer or other shape): %s",
                        path.name, parsed.matched_keys, len(parsed.skipped_keys),
                        ", ".join(parsed.skipped_keys[:5]))
        short_hash = (metadata.get("sshs_model_hash") or addnet_hash(path))[:SHORT_HASH_LENGTH]
        self._files[path] = LoadedLora(path, stamp, short_hash, parsed)
        return self._files[path]

    def _weight(self, target: tuple[str, str]) -> nn.Parameter:
        return self.index.layers[target[0]][target[1]].weight

    def _factors(self, loras: list[tuple[ParsedLora, float, float]]
                 ) -> dict[tuple[str, str], tuple[Tensor, Tensor]]:
        """Per touched layer, every LoRA's (scaled up, down) concatenated along the rank, so that
        one matmul gives the sum of all their deltas."""
        parts: dict[tuple[str, str], list[tuple[Tensor, Tensor]]] = {}
        for parsed, te_weight, unet_weight in loras:
            for layer in parsed.layers:
                multiplier = unet_weight if layer.component == "unet" else te_weight
                if multiplier != 0:
                    target = (layer.component, layer.module)
                    device = self._weight(target).device
                    parts.setdefault(target, []).append(layer.factors(device, multiplier))
        claimed: dict[tuple[str, int], BundledEmbedding] = {}
        for parsed, _, _ in loras:  # A1111 uses a bundled embedding whatever the LoRA's weights
            for embedding in parsed.embeddings:
                target = (embedding.component, TOKEN_EMBEDDING)
                parts.setdefault(target, []).append(self._embedding_factors(embedding, claimed))
        return {t: (torch.cat([u for u, _ in p], dim=1), torch.cat([d for _, d in p]))
                for t, p in parts.items()}

    def _embedding_factors(self, embedding: BundledEmbedding, claimed: dict) -> tuple[Tensor, Tensor]:
        """A bundled embedding as a low-rank update of the token embedding: the rows of its name's
        tokens set to its vectors (up: one-hot columns, down: vectors minus the rows as loaded).

        A1111 swaps the name's tokens for the vectors in the prompt, whatever their number; setting
        the rows does the same where the numbers agree, and costs nothing per prompt."""
        tokens = name_tokens(self.tokenizers[embedding.component], embedding.name)
        where = f"{embedding.filename}: bundled embedding {embedding.name!r}"
        if len(tokens) != len(embedding.vectors):
            raise LoraError(f"{where} has {len(embedding.vectors)} vectors but its name reads as {len(tokens)} "
                            "tokens; sfumato applies bundled embeddings whose vectors match their name's tokens")
        for token in tokens:
            other = claimed.setdefault((embedding.component, token), embedding)
            if other is not embedding:
                raise LoraError(f"{where} and {other.filename}: bundled embedding {other.name!r} set the same token; "
                                "use one of them")
        target = (embedding.component, TOKEN_EMBEDDING)
        weight = self._weight(target)
        original = self._originals.get(target, weight.detach())[tokens].to(weight.device, torch.float32)
        up = torch.zeros(weight.shape[0], len(tokens), device=weight.device)
        up[tokens, torch.arange(len(tokens))] = 1.0
        return up, embedding.vectors.to(weight.device, torch.float32) - original

    @torch.no_grad()
    def _merge(self, factors: dict[tuple[str, str], tuple[Tensor, Tensor]]) -> None:
        """Set every touched weight to original + up @ down and every other one back to original.

        A layer's first merge gives it memory of its own (later merges write there), and removing
        its LoRAs puts the original tensor back: the weights as loaded are never written into, so
        views of the checkpoint's memory map stay clean pages of the file, which accel.page_out
        can drop while they rest."""
        for target in list(self._originals):
            if target not in factors:
                weight = self._weight(target)
                weight.data = self._originals.pop(target).to(weight.device)
        for target, (up, down) in factors.items():
            weight = self._weight(target)
            if target not in self._originals:
                # on the CPU the tensor itself (nothing writes into it); a GPU's weight is copied out
                self._originals[target] = (weight.detach() if weight.device.type == "cpu"
                                           else weight.detach().to("cpu", copy=True))
                weight.data = torch.empty_like(weight)  # the weight's dtype and memory format
            original = self._originals[target].to(weight.device, torch.float32).flatten(1)
            if weight.dtype == torch.float32 and weight.is_contiguous():
                torch.addmm(original, up, down, out=weight.view(original.shape))  # one fused pass
            else:
                weight.copy_(torch.addmm(original, up, down).view(weight.shape))


def switch_timing(stack: LoraStack, sets: list[list[LoraSpec]], rounds: int = 3) -> list[float]:
    """Milliseconds per activate() call, cycling through the given LoRA sets (files cached)."""
    times = []
    for _ in range(rounds):
        for specs in sets:
            start = time.perf_counter()
            stack.activate(specs)
            times.append((time.perf_counter() - start) * 1000)
    return times
