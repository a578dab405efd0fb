"""Helpers for the server tests: a fake engine, and a real server process on a free port.

`python tests/server_helpers.py OUTPUTS [--fake-step-seconds S] [--model DIR]` runs a server
(uvicorn) the way `sfumato serve` does, with either the fake engine or a real tiny model; the
persistence and webuiapi tests start it as a subprocess and kill it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class FakeModel:
    name: str = "fake"
    hash: str = "0123456789"


class FakeEngine:
    """Pipeline.generate's contract without a network: a flat colour per seed, `steps`
    callbacks of `step_seconds` each. Records every call (for assertions). Without `latents`
    the callbacks carry None, so that a fake server process never imports torch (seconds)."""

    def __init__(self, model: Path | None = None, step_seconds: float = 0.0, latents: bool = True):
        self.model = FakeModel(name=model.name if model else "builtin")
        self.step_seconds, self.latents = step_seconds, latents
        self.calls: list[dict] = []

    def generate(self, params=None, *, callback=None, init_image=None, **kwargs):
        self.calls.append({**kwargs, "init_image": init_image})
        width, height = kwargs.get("width") or 64, kwargs.get("height") or 64
        for step in range(1, kwargs["steps"] + 1):
            time.sleep(self.step_seconds)
            if callback:
                callback(step, kwargs["steps"], self._latents(kwargs["batch_size"], height, width))
        images = []
        for i in range(kwargs["batch_size"]):
            seed = kwargs["seed"] + i
            colour = (seed % 256, (seed // 256) % 256, 128)
            infotext = (f"{kwargs['prompt']}\nSteps: {kwargs['steps']}, Sampler: {kwargs['sampler']}, "
                        f"Seed: {seed}, Size: {width}x{height}, Model: {self.model.name}")
            images.append(SimpleNamespace(image=Image.new("RGB", (width, height), colour), seed=seed,
                                          infotext=infotext, params=None))
        return images

    def _latents(self, batch: int, height: int, width: int):
        if not self.latents:
            return None
        import torch

        return torch.randn(batch, 4, height // 8, width // 8)


def fake_factory(step_seconds: float = 0.0, engines: list | None = None, latents: bool = True):
    """An engine factory for ServerConfig; appends each engine it makes to `engines`."""
    def factory(model, vae, lora_dir):
        engine = FakeEngine(model, step_seconds, latents)
        if engines is not None:
            engines.append(engine)
        return engine
    return factory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A real server in a subprocess (uvicorn on a free loopback port)."""

    def __init__(self, outputs: Path, *args: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, str(ROOT / "tests" / "server_helpers.py"), str(outputs),
                   "--port", str(self.port), *args]
        self.process = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.wait_ready()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.process.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise TimeoutError("server did not start")

    def kill(self) -> None:
        """SIGKILL: no shutdown handlers run, like a power cut or the OOM killer."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def main() -> None:
    import argparse

    import uvicorn

    sys.path.insert(0, str(ROOT / "src"))
    from sfumato.server.app import ServerConfig, create_app
    from sfumato.server.auth import ApiKey, AuthConfig

    parser = argparse.ArgumentParser()
    parser.add_argument("outputs", type=Path)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fake-step-seconds", type=float, default=None)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--models-dir", type=Path)
    parser.add_argument("--api-key")
    args = parser.parse_args()
    auth = AuthConfig(keys=(ApiKey("test", args.api_key),)) if args.api_key else AuthConfig()
    config = ServerConfig(outputs=args.outputs, model=args.model, models_dir=args.models_dir, auth=auth)
    if args.fake_step_seconds is not None:
        config.engine_factory = fake_factory(args.fake_step_seconds, latents=False)
    uvicorn.run(create_app(config), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()


def png_b64(size: int = 64, colour=(200, 30, 30), noise: bool = False) -> str:
    """A base64 PNG: flat colour, or random pixels (which do not compress)."""
    import base64
    import io

    out = io.BytesIO()
    image = Image.frombytes("RGB", (size, size), os.urandom(size * size * 3)) if noise \
        else Image.new("RGB", (size, size), colour)
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def wait_for(predicate, timeout: float = 20.0, every: float = 0.02):
    """Poll until predicate() is truthy; return its value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError("condition not met in time")


def fake_model_folder(root: Path, *names: str) -> Path:
    """A models folder whose entries the catalog lists (the fake engine never reads them)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name.endswith(".safetensors"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(b"not read by the fake engine")
        else:
            (root / name).mkdir(parents=True, exist_ok=True)
            (root / name / "model_index.json").write_text("{}")
    return root
