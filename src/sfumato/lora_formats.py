"""Reading the LoRA files people trade: tensors -> one (down, up, alpha) triple per model layer.

Two key layouts are in circulation for Stable Diffusion:

* kohya / A1111: `lora_unet_<module path, dots as underscores>.lora_down.weight` (+ `.lora_up.weight`,
  `.alpha`), text encoders as `lora_te_` (SD1/SD2) or `lora_te1_` / `lora_te2_` (SDXL). The UNet path
  is either diffusers' (`down_blocks_1_attentions_0_...`, kohya's SD1/SD2 trainer) or the original
  LDM one (`input_blocks_4_1_...`, kohya's SDXL trainer).
* diffusers / peft: `unet.<module path>.lora_A.weight` / `.lora_B.weight` (older diffusers:
  `.lora.down.weight` / `.lora.up.weight`), `text_encoder.` / `text_encoder_2.` for the encoders,
  and bare peft names (`base_model.model.<path>` or just `<path>`).

A file may also bundle textual-inversion embeddings (A1111: `bundle_emb.<name>.string_to_param.*`, SDXL
`bundle_emb.<name>.clip_l` / `.clip_g`): vectors that stand for the name's tokens in a prompt.

Underscored kohya names are ambiguous to split back into a path (`to_q` vs `to.q`), so instead of
rewriting strings (as diffusers' private `_convert_non_diffusers_lora_to_diffusers` does) we index
every layer of the actual model under each name it can have in a file, and look names up.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from sfumato.errors import LoraError

# Component names as diffusers spells them; kohya prefixes for each.
KOHYA_PREFIXES = {
    "unet": ("lora_unet_",),
    "text_encoder": ("lora_te_", "lora_te1_"),
    "text_encoder_2": ("lora_te2_",),
}
KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
PEFT_PARTS = {
    ".lora_A.weight": "down", ".lora_B.weight": "up",
    ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
    ".alpha": "alpha",
}
PEFT_PREFIXES = ("base_model.model.",)
# Key fragments of network types that are not plain low-rank products; we refuse them by name
# rather than applying them wrongly.
UNSUPPORTED_FORMATS = {
    "hada_w": "LyCORIS LoHa (hada_*)",
    "lokr_w": "LyCORIS LoKr (lokr_*)",
    "lora_mid.": "LyCORIS LoCon with CP decomposition (lora_mid)",
    "dora_scale": "DoRA (dora_scale)",
    "lora_magnitude_vector": "DoRA (lora_magnitude_vector)",
    "oft_blocks": "OFT (oft_blocks)",
    ".on_input": "(IA)^3",
}
TOKEN_EMBEDDING = "text_model.embeddings.token_embedding"  # a CLIP text encoder's, as files name it
# bundle_emb.<name>.<ending>: which text encoder the vectors are for
BUNDLE_ENDINGS = {".string_to_param.*": "text_encoder", ".clip_l": "text_encoder", ".clip_g": "text_encoder_2"}
SUPPORTED = "plain LoRA (kohya lora_down/lora_up/alpha, diffusers/peft lora_A/lora_B)"

# Inside a UNet resnet the LDM and diffusers layer names differ too.
LDM_RESNET_LAYERS = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}


@dataclass
class LoraLayer:
    """One model layer's low-rank update: delta W = multiplier * (alpha / rank) * up @ down."""

    component: str  # "unet" | "text_encoder" | "text_encoder_2"
    module: str     # dotted module path inside the component
    down: Tensor    # (rank, in) or (rank, in, kh, kw)
    up: Tensor      # (out, rank) or (out, rank, 1, 1)
    alpha: float

    def factors(self, device: torch.device, multiplier: float) -> tuple[Tensor, Tensor]:
        """fp32 (up, down) as matrices, the scale folded into up: delta W = up @ down.

        Matrices cover linear layers, kxk convs (kxk down, 1x1 up) and linear LoRAs on 1x1
        convs or the reverse (SD2/SDXL proj_in/proj_out): reshape the product to the weight."""
        scale = multiplier * self.alpha / self.down.shape[0]
        up = self.up.to(device, torch.float32).flatten(1) * scale
        return up, self.down.to(device, torch.float32).flatten(1)


@dataclass
class BundledEmbedding:
    """An embedding inside a LoRA file: vectors that stand for its name's tokens in a prompt."""

    filename: str
    name: str
    component: str   # the text encoder it is for
    vectors: Tensor  # (tokens, width)


@dataclass
class ParsedLora:
    layers: list[LoraLayer]
    matched_keys: int
    skipped_keys: list[str] = field(default_factory=list)  # keys that fit no layer of the model
    embeddings: list[BundledEmbedding] = field(default_factory=list)


def name_tokens(tokenizer, name: str) -> list[int]:
    """The token ids a word reads as: the rows of the token embedding a bundled embedding named so
    stands for (A1111 finds one by its name's tokens in the prompt)."""
    return tokenizer(name, add_special_tokens=False).input_ids


def bundled_embedding(key: str, tensor: Tensor, index: ModuleIndex, filename: str) -> BundledEmbedding | None:
    """The embedding a bundle_emb.* key holds, if the model has its text encoder at its width."""
    for ending, component in BUNDLE_ENDINGS.items():
        if key.endswith(ending):
            name = key.removeprefix("bundle_emb.").removesuffix(ending)
            table = index.layers.get(component, {}).get(TOKEN_EMBEDDING)
            if table is not None and tensor.dim() == 2 and tensor.shape[1] == table.weight.shape[1]:
                return BundledEmbedding(filename, name, component, tensor)
    return None


def ldm_unet_names(unet: nn.Module) -> dict[str, str]:
    """diffusers UNet module prefix -> the original LDM (SD/SGM checkpoint) prefix.

    Walks the model's own blocks, so it holds for any layers_per_block and for blocks with or
    without attention (SDXL's first down / last up block), as diffusers' checkpoint converter
    numbers them: input block 0 is conv_in, then per down block one (resnet, attention) pair per
    layer and one downsampler; output blocks are (resnet, attention, upsampler) triples."""
    names = {
        "conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2",
    }
    index = 1
    for b, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            names[f"down_blocks.{b}.resnets.{j}"] = f"input_blocks.{index}.0"
            if attentions:
                names[f"down_blocks.{b}.attentions.{j}"] = f"input_blocks.{index}.1"
            index += 1
        if getattr(block, "downsamplers", None):
            names[f"down_blocks.{b}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1
    mid = getattr(unet, "mid_block", None)
    if mid is not None:
        names["mid_block.resnets.0"] = "middle_block.0"
        if getattr(mid, "attentions", None):
            names["mid_block.attentions.0"] = "middle_block.1"
            names["mid_block.resnets.1"] = "middle_block.2"
    index = 0
    for b, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None)
        for j in range(len(block.resnets)):
            names[f"up_blocks.{b}.resnets.{j}"] = f"output_blocks.{index}.0"
            if attentions:
                names[f"up_blocks.{b}.attentions.{j}"] = f"output_blocks.{index}.1"
            index += 1
        if getattr(block, "upsamplers", None):
            names[f"up_blocks.{b}.upsamplers.0"] = f"output_blocks.{index - 1}.{2 if attentions else 1}"
    return names


def to_ldm_name(path: str, prefixes: dict[str, str]) -> str | None:
    """A diffusers UNet module path in LDM spelling, or None outside the mapped blocks."""
    for prefix, ldm in prefixes.items():
        if path == prefix:
            return ldm
        if path.startswith(prefix + "."):
            rest = path[len(prefix) + 1:]
            if ".resnets." in prefix:
                first, _, tail = rest.partition(".")
                rest = LDM_RESNET_LAYERS.get(first, first) + ("." + tail if tail else "")
            return f"{ldm}.{rest}"
    return None


def canonical_path(component: str, path: str) -> str:
    """A module path as LoRA files spell it. transformers 5 dropped CLIPTextModel's `text_model.`
    level (CLIPTextModelWithProjection keeps it); files made with either keep `text_model.`."""
    if component == "unet" or path.startswith("text_model.") or path == "text_projection":
        return path
    return "text_model." + path


class ModuleIndex:
    """Every weight-bearing layer of a model under each name a LoRA file may give it."""

    def __init__(self, components: dict[str, nn.Module]):
        self.layers: dict[str, dict[str, nn.Module]] = {
            name: {canonical_path(name, path): m for path, m in root.named_modules()
                   if isinstance(getattr(m, "weight", None), Tensor) and m.weight.dim() in (2, 4)}
            for name, root in components.items()}
        self.kohya: dict[str, tuple[str, str]] = {}
        for component, layers in self.layers.items():
            ldm = ldm_unet_names(components[component]) if component == "unet" else {}
            for path in layers:
                spellings = [path] + ([to_ldm_name(path, ldm)] if ldm else [])
                for prefix in KOHYA_PREFIXES[component]:
                    for spelled in filter(None, spellings):
                        self.kohya[prefix + spelled.replace(".", "_")] = (component, path)

    def find_peft(self, path: str) -> tuple[str, str] | None:
        """(component, path) of a diffusers/peft module path, with or without component prefix."""
        for component in self.layers:
            if path.startswith(component + ".") and path[len(component) + 1:] in self.layers[component]:
                return component, path[len(component) + 1:]
        for prefix in PEFT_PREFIXES:
            path = path.removeprefix(prefix)
        owners = [c for c, layers in self.layers.items() if path in layers]
        return (owners[0], path) if len(owners) == 1 else None


def refuse_unsupported(keys: Iterable[str], filename: str) -> None:
    for key in keys:
        for fragment, fmt in UNSUPPORTED_FORMATS.items():
            if fragment in key:
                raise LoraError(f"{filename} is a {fmt} file, which sfumato does not apply; "
                                f"supported: {SUPPORTED}")


def split_key(key: str) -> tuple[str, str] | None:
    """(layer name as written in the file, part) for a kohya or peft key, else None."""
    if key.startswith("lora_"):
        name, _, part = key.partition(".")
        return (name, KOHYA_PARTS[part]) if part in KOHYA_PARTS else None
    for suffix, part in PEFT_PARTS.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def parse_lora(tensors: dict[str, Tensor], index: ModuleIndex, filename: str,
               default_alpha: float | None = None) -> ParsedLora:
    """Match a LoRA file's tensors to the model's layers.

    default_alpha: for files without `.alpha` keys (peft keeps it in adapter_config.json);
    None means alpha = rank, i.e. scale 1, as diffusers assumes."""
    refuse_unsupported(tensors, filename)
    groups: dict[str, dict[str, tuple[str, Tensor]]] = defaultdict(dict)
    skipped: list[str] = []
    embeddings = []
    for key, tensor in tensors.items():
        split = split_key(key)
        if key.startswith("bundle_emb."):
            embedding = bundled_embedding(key, tensor, index, filename)
            embeddings += [embedding] if embedding else []
            skipped += [] if embedding else [key]
        elif split is None:
            skipped.append(key)
        else:
            groups[split[0]][split[1]] = (key, tensor)

    layers, matched = [], 0
    for name, parts in groups.items():
        target = index.kohya.get(name) if name.startswith("lora_") else index.find_peft(name)
        keys = [key for key, _ in parts.values()]
        if target is None or "down" not in parts or "up" not in parts:
            skipped.extend(keys)
            continue
        down, up = parts["down"][1], parts["up"][1]
        weight = index.layers[target[0]][target[1]].weight
        if up.shape[0] * down[0].numel() != weight.numel() or up.flatten(1).shape[1] != down.shape[0]:
            skipped.extend(keys)  # same name, other shape: a LoRA made for another model
            continue
        alpha = float(parts["alpha"][1]) if "alpha" in parts else (default_alpha or down.shape[0])
        layers.append(LoraLayer(target[0], target[1], down, up, alpha))
        matched += len(keys)
    return ParsedLora(layers, matched + len(embeddings), sorted(skipped), embeddings)
