"""PNG metadata that other tools read: A1111's `parameters` text chunk, plus our own JSON.

The infotext format (what A1111, ComfyUI importers, Civitai and png-info readers parse):

    a red star above a blue circle
    Negative prompt: green
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 128x128, ...
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image, PngImagePlugin

from sfumato import __version__
from sfumato.errors import SfumatoError
from sfumato.files import atomic_path
from sfumato.params import GenerationParams

JSON_CHUNK = "sfumato"
LEVERS_KEY = "Sfumato levers"  # the lossy speed levers an image was made with
# One "Key: value" pair of the last infotext line; values may be quoted (A1111's own regex idea).
PAIR = re.compile(r'\s*([\w][\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def infotext(params: GenerationParams, *, seed: int, width: int, height: int,
             model_name: str, model_hash: str, extra: dict | None = None) -> str:
    """The A1111 `parameters` text for one image."""
    pairs = {
        "Steps": params.steps,
        "Sampler": params.sampler,
        "Schedule type": params.scheduler.capitalize(),
        "CFG scale": _number(params.cfg_scale),
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model hash": model_hash,
        "Model": model_name,
    }
    if params.clip_skip > 1:
        pairs["Clip skip"] = params.clip_skip
    if params.token_merging_ratio:
        pairs["Token merging ratio"] = _number(params.token_merging_ratio)
    pairs.update(extra or {})
    pairs["Version"] = f"sfumato {__version__}"
    line = ", ".join(f"{k}: {_quote(v)}" for k, v in pairs.items() if v not in (None, ""))
    text = params.prompt
    if params.negative_prompt:
        text += f"\nNegative prompt: {params.negative_prompt}"
    return f"{text}\n{line}"


def parse_infotext(text: str) -> dict:
    """Split A1111 infotext into {"prompt", "negative_prompt", <Key>: value...}."""
    lines = text.strip().split("\n")
    last = lines[-1] if lines and len(PAIR.findall(lines[-1])) >= 3 else ""
    body = lines[:-1] if last else lines
    prompt, negative, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    result: dict = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative)}
    for key, value in PAIR.findall(last):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            value = json.loads(value)
        result[key.strip()] = value
    return result


def params_from_infotext(text: str) -> GenerationParams:
    """Re-create generation parameters from any A1111-style infotext (ours or A1111's own)."""
    info = parse_infotext(text)
    sampler = info.get("Sampler", "Euler a")
    schedule = info.get("Schedule type", "")
    if sampler.endswith(" Karras"):  # A1111 before 1.9 folded the schedule into the name
        sampler, schedule = sampler[: -len(" Karras")], "karras"
    width, height = (int(v) for v in info.get("Size", "0x0").split("x"))
    try:
        params = GenerationParams(
            prompt=info["prompt"],
            negative_prompt=info["negative_prompt"],
            steps=int(info.get("Steps", 20)),
            sampler=sampler,
            scheduler=(schedule or "normal").lower(),
            cfg_scale=float(info.get("CFG scale", 7.0)),
            seed=int(info.get("Seed", -1)),
            width=width,
            height=height,
            clip_skip=int(info.get("Clip skip", 1)),
            denoising_strength=float(info.get("Denoising strength", 0.75)),
            # absent: the image says nothing of it (A1111 writes the key only when merging)
            token_merging_ratio=float(info["Token merging ratio"]) if "Token merging ratio" in info else None,
        )
    except ValueError as error:
        raise SfumatoError(f"could not read generation parameters from the image: {error}") from None
    return params.validated()


def save_png(image: Image.Image, path: str | Path, *, infotext: str, params: dict) -> Path:
    """Write a PNG with both metadata chunks, atomically: a reader never sees half a file."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext)
    info.add_text(JSON_CHUNK, json.dumps(params, sort_keys=True))
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return Path(path)


def read_png_text(path: str | Path) -> dict[str, str]:
    """The text chunks of a PNG (A1111 writes `parameters`; we add `sfumato`)."""
    try:
        with Image.open(path) as image:
            image.load()
            return {k: v for k, v in image.info.items() if isinstance(v, str)}
    except (OSError, SyntaxError) as error:
        raise SfumatoError(f"{path}: not a readable PNG image ({error})") from None


def params_from_png(path: str | Path) -> GenerationParams:
    """Generation parameters recorded in a PNG: ours (JSON) first, else A1111's infotext."""
    chunks = read_png_text(path)
    if JSON_CHUNK in chunks:
        data = json.loads(chunks[JSON_CHUNK])
        known = GenerationParams.__dataclass_fields__
        return GenerationParams.from_dict({k: v for k, v in data.items() if k in known}).validated()
    if "parameters" in chunks:
        return params_from_infotext(chunks["parameters"])
    raise SfumatoError(f"{path}: no generation parameters in this PNG (no 'parameters' chunk)")


def levers_from_png(path: str | Path) -> list[str]:
    """The lossy speed levers a PNG was made with ("Sfumato levers" in its infotext), if any:
    `generate --from` applies them again, since the same seed gives another picture without them."""
    text = read_png_text(path).get("parameters", "")
    value = parse_infotext(text).get(LEVERS_KEY, "") if text else ""
    return [name.strip() for name in str(value).split(",") if name.strip()]


def _number(x: float) -> str:
    return f"{x:g}"


def _quote(value: object) -> str:
    text = str(value)
    return json.dumps(text) if ("," in text or ":" in text or '"' in text) else text
