"""The one thread that owns the model and runs queued jobs in order.

HTTP handlers never touch the model: they insert a job in the store, wake this thread and wait
for its events (`Hub`) on the event loop. The worker publishes step progress and keeps the
latest latents so that /progress can draw a cheap preview on demand.
"""

from __future__ import annotations

import asyncio
import gc
import io
import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from sfumato.errors import Interrupted, SfumatoError
from sfumato.server.jobs import Job, JobStore

log = logging.getLogger("sfumato.server")

BUILTIN_TITLE = "builtin"


class Engine(Protocol):
    """What the worker needs of a loaded pipeline (sfumato.pipeline.Pipeline, or a test fake)."""
    model: Any  # .name, .hash

    def generate(self, params=None, *, callback=None, init_image=None, **kwargs) -> list: ...


# (model path or None for the built-in one, VAE path or None, LoRA folder or None) -> Engine
EngineFactory = Callable[[Path | None, Path | None, Path | None], Engine]


def load_pipeline(model: Path | None, vae: Path | None, lora_dir: Path | None,
                  levers: tuple[str, ...] = ()) -> Engine:
    """levers: opt-in speed levers by name (sfumato.accel), as `sfumato serve --lever` gives them."""
    from sfumato.accel import Levers
    from sfumato.pipeline import Pipeline

    # Prompts come from the network: a <lora:name> never names a file outside lora_dir.
    return Pipeline.load(model, vae=vae, lora_dir=lora_dir, allow_lora_paths=False,
                         levers=Levers.parse(levers))


# --- what may be loaded: names resolve only to entries listed inside the configured folders ---

@dataclass(frozen=True)
class Entry:
    title: str  # path relative to its folder, as the API shows it
    path: Path | None  # None: the built-in model


def _listing(folder: Path | None, *, folders_too: bool) -> list[Entry]:
    """*.safetensors files (pickles are never loaded by the server) and diffusers folders."""
    if folder is None or not folder.is_dir():
        return []
    diffusers = {p.parent for p in folder.rglob("model_index.json")}
    found = [p for p in folder.rglob("*.safetensors") if not diffusers.intersection(p.parents)]
    if folders_too:
        found += diffusers
    return [Entry(p.relative_to(folder).as_posix(), p) for p in sorted(found)]


class Catalog:
    def __init__(self, models_dir: Path | None, vae_dir: Path | None, lora_dir: Path | None,
                 default_model: Path | None = None):
        self.dirs = {"model": models_dir, "vae": vae_dir, "lora": lora_dir}
        self.default_model = default_model  # from the command line: trusted, may be anywhere

    def list(self, kind: str) -> list[Entry]:
        entries = _listing(self.dirs[kind], folders_too=kind == "model")
        if kind == "model":
            extra = Entry(self.default_model.name, self.default_model) if self.default_model \
                else Entry(BUILTIN_TITLE, None)
            entries = [extra] + [e for e in entries if e.path != extra.path]
        return entries

    def resolve(self, kind: str, name: str) -> Entry:
        """An entry by title, title without suffix, or A1111's 'title [hash]'."""
        name = name.strip()
        if name.endswith("]") and " [" in name:
            name = name[: name.rindex(" [")]
        if Path(name).is_absolute() or ".." in Path(name).parts or "\\" in name:
            raise SfumatoError(f"{kind} {name!r}: only names inside the {kind} folder are allowed, "
                               "not paths")
        entries = self.list(kind)
        for entry in entries:
            if name in (entry.title, entry.title.removesuffix(".safetensors")):
                return entry
        allowed = ", ".join(e.title for e in entries) or f"none (the {kind} folder is empty)"
        raise SfumatoError(f"unknown {kind} {name!r}; allowed: {allowed}")


# --- events from the worker thread to coroutines waiting on the event loop ---

class Hub:
    """Fan-out of worker events to asyncio queues; `publish` may be called from any thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.subscribers: set[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = set()

    def subscribe(self) -> tuple[asyncio.AbstractEventLoop, asyncio.Queue]:
        subscriber = (asyncio.get_running_loop(), asyncio.Queue())
        with self.lock:
            self.subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber) -> None:
        with self.lock:
            self.subscribers.discard(subscriber)

    def publish(self, event: dict) -> None:
        with self.lock:
            subscribers = list(self.subscribers)
        for loop, queue in subscribers:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # that loop has closed
                self.unsubscribe((loop, queue))


@dataclass
class Progress:
    """What the running job is doing (A1111's `state`)."""
    job: str | None = None
    job_no: int = 0  # batch (n_iter) index
    job_count: int = 0
    step: int = 0
    steps: int = 0
    started: float = 0.0
    latents: Any = None  # the latest denoised latents, for previews
    interrupted: bool = False
    skipped: bool = False

    @property
    def fraction(self) -> float:
        if not self.job or not self.job_count:
            return 0.0
        done = self.job_no + (self.step / self.steps if self.steps else 0.0)
        return min(1.0, done / self.job_count)


# Linear map from SD 1.x/2.x latents to RGB (the "approx cheap" preview: no VAE pass).
def preview_png(latents) -> bytes:
    """A small PNG of the first image of a latent batch (a cheap linear map, no VAE decode)."""
    from sfumato.latents import preview

    rgb = preview(latents[:1].detach().float().cpu())[0]  # (3, h, w) in [0, 1]
    array = (rgb * 255).byte().permute(1, 2, 0).numpy()
    image = Image.fromarray(array).resize((rgb.shape[2] * 8, rgb.shape[1] * 8), Image.Resampling.NEAREST)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def image_path(job: Job, index: int) -> Path:
    """Relative to the outputs folder; fixed per (job, index) so a re-run cannot duplicate."""
    day = datetime.fromtimestamp(job.created).strftime("%Y-%m-%d")
    return Path(day) / f"{job.id}-{index:02d}.png"


def generation_kwargs(params: dict, seed: int) -> dict:
    """The GenerationParams fields of a stored job (which also holds n_iter, model, vae)."""
    from sfumato.params import GenerationParams

    names = {f.name for f in fields(GenerationParams)}
    kwargs = {k: v for k, v in params.items() if k in names}
    kwargs["loras"] = tuple(tuple(lora) for lora in kwargs.get("loras", ()))
    return {**kwargs, "seed": seed}


class Worker:
    def __init__(self, store: JobStore, catalog: Catalog, factory: EngineFactory,
                 outputs: Path, hub: Hub):
        self.store, self.catalog, self.factory = store, catalog, factory
        self.outputs, self.hub = outputs, hub
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.progress = Progress()
        self.stop_requests: dict[str, str] = {}  # job id -> "cancelled" | "interrupted" | "skip"
        self.engine: Engine | None = None
        self.engine_key: tuple | None = None
        self.thread = threading.Thread(target=self.run_forever, name="sfumato-worker", daemon=True)

    def start(self, preload: str | None = None) -> None:
        """Start the thread; it first loads model `preload`, so the first job does not wait."""
        self.preload = preload
        self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        self.wake.set()
        with self.lock:
            if self.progress.job:
                self.stop_requests[self.progress.job] = "shutdown"
        self.thread.join(timeout)

    def snapshot(self) -> Progress:
        with self.lock:
            return replace(self.progress)

    def request_stop(self, how: str, job_id: str | None = None) -> str | None:
        """Stop job `job_id` (default: the running one) at its next step; returns its id.
        `how`: "cancelled", "interrupted" (A1111) or "skip" (only the current batch)."""
        with self.lock:
            target = job_id or self.progress.job
            if target:
                self.stop_requests[target] = how
            return target

    def run_forever(self) -> None:
        if self.preload:
            try:
                self.engine_for({"model": self.preload})
            except Exception:  # a job naming this model will report the error
                log.error("could not load %s:\n%s", self.preload, traceback.format_exc())
        while not self.stopping.is_set():
            job = self.store.claim_next()
            if job is None:
                self.wake.wait(timeout=1.0)
                self.wake.clear()
                continue
            self.run(job)

    def run(self, job: Job) -> None:
        self.hub.publish({"type": "status", "job": job.id, "status": "running"})
        status, error, user_error, info = "done", None, False, None
        try:
            status, info = self.generate(job)
        except SfumatoError as e:
            status, error, user_error = "failed", str(e), True
        except Exception as e:  # the worker must outlive any one job
            log.error("job %s failed:\n%s", job.id, traceback.format_exc())
            status, error = "failed", f"{type(e).__name__}: {e}"
        with self.lock:
            self.progress = Progress()
            requested = self.stop_requests.pop(job.id, None)
        if requested == "shutdown":
            return  # left `running`: the next start requeues it
        if requested == "cancelled" and status == "interrupted":
            status = "cancelled"
        self.store.finish(job.id, status, error=error, user_error=user_error, info=info)
        self.hub.publish({"type": "status", "job": job.id, "status": status})

    def engine_for(self, params: dict) -> Engine:
        model = self.catalog.resolve("model", params.get("model") or self.catalog.list("model")[0].title)
        vae = self.catalog.resolve("vae", params["vae"]) if params.get("vae") else None
        key = (model, vae)
        if self.engine_key != key:
            self.engine = self.engine_key = None
            gc.collect()  # free the old model before loading the next
            self.engine = self.factory(model.path, vae and vae.path, self.catalog.dirs["lora"])
            self.engine_key = key
        return self.engine

    def generate(self, job: Job) -> tuple[str, dict]:
        params = job.params
        engine = self.engine_for(params)
        init_image = Image.open(io.BytesIO(job.init_image)).convert("RGB") if job.init_image else None
        batch, n_iter = int(params.get("batch_size", 1)), int(params.get("n_iter", 1))
        images = [i for i in job.images if (self.outputs / i["path"]).exists()]  # a resumed job
        status = "done"
        with self.lock:
            self.progress = Progress(job=job.id, job_count=n_iter, steps=int(params["steps"]),
                                     started=time.time())
        for k in range(n_iter):
            indices = list(range(k * batch, (k + 1) * batch))
            if {i["index"] for i in images} >= set(indices):
                continue
            if self._stop_requested(job.id, k):
                status = "interrupted"
                break
            try:
                results = engine.generate(
                    callback=self._callback(job.id),
                    init_image=init_image, **generation_kwargs(params, params["seed"] + k * batch))
            except Interrupted:
                if self.stop_requests.get(job.id) == "skip":
                    self.stop_requests.pop(job.id, None)
                    continue
                status = "interrupted"
                break
            images = [i for i in images if i["index"] not in indices]
            images += [self._save(job, index, result) for index, result in zip(indices, results, strict=True)]
            self.store.record_images(job.id, images)
        info = {"sd_model_name": engine.model.name, "sd_model_hash": engine.model.hash}
        return status, info

    def _stop_requested(self, job_id: str, job_no: int) -> bool:
        with self.lock:
            self.progress.job_no, self.progress.step = job_no, 0
            return self.stop_requests.get(job_id) in ("cancelled", "interrupted", "shutdown")

    def _callback(self, job_id: str) -> Callable:
        def on_step(step: int, total: int, latents) -> None:
            with self.lock:
                self.progress.step, self.progress.steps = step, total
                if latents is not None:  # an engine may have none to show
                    self.progress.latents = latents.detach().clone()
                snapshot = replace(self.progress, latents=None)
                stop = self.stop_requests.get(job_id)
            self.hub.publish({"type": "progress", "job": job_id, "step": step, "steps": total,
                              "job_no": snapshot.job_no, "job_count": snapshot.job_count,
                              "progress": snapshot.fraction})
            if stop:
                with self.lock:
                    self.progress.interrupted = stop != "skip"
                    self.progress.skipped = stop == "skip"
                raise Interrupted(stop)
        return on_step

    def _save(self, job: Job, index: int, result) -> dict:
        from sfumato.metadata import save_png

        relative = image_path(job, index)
        record = {"job": job.id, "index": index, **generation_kwargs(job.params, result.seed)}
        save_png(result.image, self.outputs / relative, infotext=result.infotext, params=record)
        return {"index": index, "path": relative.as_posix(), "seed": result.seed,
                "infotext": result.infotext}
