"""`sfumato generate --server URL`: the job sent to a running sfumato server, through its A1111 API.

The server keeps its model loaded (and compiled, under `sfumato serve --lever compile`), so the
command skips what dominates a one-off run on a CPU: seconds of importing torch, diffusers and
transformers, then loading the weights. This module imports the standard library only, for the
same reason (urllib rather than httpx). Any A1111-compatible server works.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from sfumato.errors import SfumatoError
from sfumato.params import GenerationParams


@dataclass(frozen=True)
class RemoteImage:
    seed: int
    png: bytes  # as the server saved it, with its `parameters` text chunk


def a1111_request(params: GenerationParams, *, init_png: bytes | None = None, model: str | None = None,
                  vae: str | None = None) -> tuple[str, dict[str, Any]]:
    """The endpoint and JSON body of an A1111 txt2img (or, with an init image, img2img) request."""
    settings = {"CLIP_stop_at_last_layers": params.clip_skip, "sd_model_checkpoint": model, "sd_vae": vae}
    body = {
        "prompt": params.prompt, "negative_prompt": params.negative_prompt, "seed": params.seed,
        "steps": params.steps, "cfg_scale": params.cfg_scale, "width": params.width, "height": params.height,
        "sampler_name": params.sampler, "scheduler": params.scheduler, "batch_size": params.batch_size,
        "override_settings": {k: v for k, v in settings.items() if v is not None},
    }
    if init_png is None:
        return "/sdapi/v1/txt2img", body
    return "/sdapi/v1/img2img", {**body, "init_images": [base64.b64encode(init_png).decode()],
                                 "denoising_strength": params.denoising_strength}


def generate_remote(url: str, params: GenerationParams, *, init_png: bytes | None = None,
                    model: str | None = None, vae: str | None = None, api_key: str | None = None,
                    timeout: float = 3600.0) -> list[RemoteImage]:
    """Run one job on the server at `url` and return its images (blocking until they are made)."""
    path, body = a1111_request(params, init_png=init_png, model=model, vae=vae)
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url.rstrip("/") + path, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            reply = json.load(response)
    except urllib.error.HTTPError as error:
        raise SfumatoError(f"the server at {url} refused the job (HTTP {error.code}): {_detail(error)}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise SfumatoError(f"no server answers at {url} ({reason}): start one with `sfumato serve`, "
                           "or leave out --server to generate in this process") from None
    try:
        seeds = json.loads(reply["info"])["all_seeds"]
        return [RemoteImage(int(seed), base64.b64decode(image))
                for seed, image in zip(seeds, reply["images"], strict=True)]
    except (KeyError, TypeError, ValueError) as error:
        raise SfumatoError(f"the server at {url} answered, but not as an A1111 API does ({error!r})") from None


def _detail(error: urllib.error.HTTPError) -> str:
    """The server's own words: FastAPI's {"detail": ...}, else the start of the body."""
    text = error.read().decode(errors="replace")
    try:
        detail = json.loads(text).get("detail", text)
    except (ValueError, AttributeError):
        detail = text
    return str(detail)[:500]
