"""`sfumato generate --server URL`: the job sent to a running sfumato server, through its A1111 API.

The server keeps its model loaded (and compiled, under `sfumato serve --lever compile`), so the
command skips what dominates a one-off run on a CPU: seconds of importing torch, diffusers and
transformers, then loading the weights. This module imports the standard library only, for the
same reason (urllib rather than httpx). Any A1111-compatible server works.
"""

from __future__ import annotations

import base64
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
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
    settings = {"CLIP_stop_at_last_layers": params.clip_skip, "sd_model_checkpoint": model, "sd_vae": vae,
                "token_merging_ratio": params.token_merging_ratio}
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
                    on_progress: Callable[[int, int], None] | None = None,
                    timeout: float | None = None) -> list[RemoteImage]:
    """Run one job on the server at `url` and return its images (blocking until they are made).

    on_progress(step, steps) is called from another thread with the server's sampling progress,
    polled from /sdapi/v1/progress (A1111's: the server's current job, which is ours unless other
    clients' jobs are queued before it). No timeout by default: an SD job on a CPU may take an hour."""
    if not url.startswith(("http://", "https://")):
        raise SfumatoError(f"--server {url!r}: give the server's http:// or https:// URL, "
                           "e.g. http://127.0.0.1:7860")
    url = url.rstrip("/")
    path, body = a1111_request(params, init_png=init_png, model=model, vae=vae)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                     headers={**headers, "Content-Type": "application/json"})
    done = threading.Event()
    if on_progress is not None:
        threading.Thread(target=_poll_progress, args=(url, headers, done, on_progress), daemon=True).start()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            reply = json.load(response)
    except urllib.error.HTTPError as error:
        raise SfumatoError(f"the server at {url} refused the job (HTTP {error.code}): {_detail(error)}") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise SfumatoError(f"no server answers at {url} ({reason}): start one with `sfumato serve`, "
                           "or leave out --server to generate in this process") from None
    finally:
        done.set()
    try:
        seeds = json.loads(reply["info"])["all_seeds"]
        return [RemoteImage(int(seed), base64.b64decode(image))
                for seed, image in zip(seeds, reply["images"], strict=True)]
    except (KeyError, TypeError, ValueError) as error:
        raise SfumatoError(f"the server at {url} answered, but not as an A1111 API does ({error!r})") from None


def _poll_progress(url: str, headers: dict[str, str], done: threading.Event,
                   on_progress: Callable[[int, int], None], every: float = 0.5) -> None:
    request = urllib.request.Request(url + "/sdapi/v1/progress?skip_current_image=true", headers=headers)
    while not done.wait(every):
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                state = json.load(response)["state"]
            step, steps = int(state["sampling_step"]), int(state["sampling_steps"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # progress is a nicety: the job's own request reports what went wrong
        if steps and not done.is_set():
            on_progress(step, steps)


def _detail(error: urllib.error.HTTPError) -> str:
    """The server's own words: FastAPI's {"detail": ...}, else the start of the body."""
    text = error.read().decode(errors="replace")
    try:
        detail = json.loads(text).get("detail", text)
    except (ValueError, AttributeError):
        detail = text
    return str(detail)[:500]
