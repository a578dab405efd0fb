"""`create_app(config)`: the FastAPI application — jobs API, A1111 API, web page.

    config = ServerConfig(outputs=Path("outputs"), engine_factory=load_pipeline)
    app = create_app(config)          # uvicorn.run(app); tests inject a fake engine_factory
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import io
import json
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, ConfigDict, create_model
from starlette.datastructures import Headers

import sfumato
from sfumato.errors import SfumatoError
from sfumato.params import GenerationParams
from sfumato.server.auth import AuthConfig, Principal
from sfumato.server.jobs import FINAL, Job, JobStore, QuotaExceeded, next_month_start
from sfumato.server.worker import Catalog, EngineFactory, Hub, Worker, load_pipeline, preview_png

WEB_DIR = Path(sfumato.__file__).parent / "web"
DB_NAME = "sfumato-jobs.sqlite3"


@dataclass(frozen=True)
class Caps:
    """Laptop-safe limits per request; each has a `sfumato serve` flag of the same name."""
    max_pixels: int = 1024 * 1024  # width * height
    max_steps: int = 100
    max_images: int = 8  # batch_size * n_iter
    max_prompt_chars: int = 4000
    max_upload_bytes: int = 8 * 2**20  # a decoded init image
    max_queue: int = 256  # jobs queued or running


@dataclass
class ServerConfig:
    outputs: Path = Path("outputs")
    model: Path | None = None  # None: the built-in model
    models_dir: Path | None = None
    vae_dir: Path | None = None
    lora_dir: Path | None = None
    auth: AuthConfig = field(default_factory=AuthConfig)
    cors_origins: tuple[str, ...] = ()
    caps: Caps = field(default_factory=Caps)
    engine_factory: EngineFactory = load_pipeline


class QueueFull(Exception):
    pass


class BodyTooLarge(Exception):
    pass


class Server:
    """Everything a request handler needs; one per app (on `app.state.server`)."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.outputs = config.outputs
        self.store = JobStore(config.outputs / DB_NAME)
        self.catalog = Catalog(config.models_dir, config.vae_dir or config.models_dir,
                               config.lora_dir, config.model)
        self.hub = Hub()
        self.worker = Worker(self.store, self.catalog, config.engine_factory, config.outputs, self.hub)

    def start(self) -> None:
        self.store.requeue_running()
        for litter in self.outputs.glob("*/.*.tmp"):  # half-written images of a killed server
            litter.unlink(missing_ok=True)
        self.worker.start(preload=self.default_model())

    def stop(self) -> None:
        self.worker.stop()
        self.store.close()

    def default_model(self) -> str:
        return self.store.setting("sd_model_checkpoint") or self.catalog.list("model")[0].title

    def submit(self, principal: Principal, kind: str, params: dict,
               init_image: bytes | None = None) -> Job:
        """Check a request against the caps, names and quota, and queue it."""
        params = self.checked(params)
        if self.store.pending_count() >= self.config.caps.max_queue:
            raise QueueFull(f"the queue is full ({self.config.caps.max_queue} jobs, --max-queue); "
                            "try again later")
        job = self.store.submit(kind, params, owner=principal.name, init_image=init_image,
                                quota=principal.monthly_images)
        self.worker.wake.set()
        return job

    def checked(self, params: dict) -> dict:
        from sfumato.prompt import extract_lora_tags

        check_caps(params, self.config.caps)
        names = {f.name for f in dataclasses.fields(GenerationParams)}
        generation = GenerationParams(**{k: v for k, v in params.items() if k in names})
        generation = generation.validated().with_seed()
        for text in (generation.prompt, generation.negative_prompt):
            for tag in extract_lora_tags(text)[1]:
                self.catalog.resolve("lora", tag.name)
        model = self.catalog.resolve("model", params.get("model") or self.default_model()).title
        vae = params.get("vae")
        vae = self.catalog.resolve("vae", vae).title if vae else None
        return {**dataclasses.asdict(generation), "n_iter": params.get("n_iter", 1),
                "model": model, "vae": vae}

    async def wait(self, job_id: str) -> Job:
        """Until the job is final, without blocking the event loop."""
        subscriber = self.hub.subscribe()
        try:
            while True:
                job = self.store.get(job_id)
                if job is None or job.status in FINAL:
                    return job
                try:  # a status event wakes us; the timeout re-checks the store regardless
                    while True:
                        event = await asyncio.wait_for(subscriber[1].get(), timeout=2.0)
                        if event["type"] == "status" and event["job"] == job_id:
                            break
                except TimeoutError:
                    pass
        finally:
            self.hub.unsubscribe(subscriber)

    def visible_job(self, principal: Principal, job_id: str) -> Job:
        job = self.store.get(job_id)
        if job is None or (principal.name is not None and job.owner != principal.name):
            raise HTTPException(404, f"no job {job_id!r}")
        return job

    def read_image(self, job: Job, index: int) -> bytes:
        for image in job.images:
            if image["index"] == index:
                return (self.outputs / image["path"]).read_bytes()
        raise HTTPException(404, f"job {job.id} has no image {index}")


def check_caps(params: dict, caps: Caps) -> None:
    """422 naming the cap (and its flag) that a request goes over."""
    def over(what: str, value: int, cap: str) -> None:
        limit = getattr(caps, cap)
        if value > limit:
            flag = "--" + cap.replace("_", "-")
            raise SfumatoError(f"{what} = {value} is over the server cap {cap} = {limit} ({flag})")

    over("width*height", int(params.get("width") or 0) * int(params.get("height") or 0), "max_pixels")
    over("steps", int(params.get("steps", 0)), "max_steps")
    over("batch_size*n_iter", int(params.get("batch_size", 1)) * int(params.get("n_iter", 1)),
         "max_images")
    for name in ("prompt", "negative_prompt"):
        over(f"len({name})", len(params.get(name) or ""), "max_prompt_chars")


def decode_image(data: str, caps: Caps) -> bytes:
    """A base64 (or data: URL) image, checked; never fetched from a URL."""
    data = data.strip()
    if data.split(":", 1)[0].lower() in ("http", "https", "ftp", "file"):
        raise SfumatoError("images are accepted only as base64 data; the server never loads URLs")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data)
    except (binascii.Error, ValueError):
        raise SfumatoError("image: not valid base64") from None
    if len(raw) > caps.max_upload_bytes:
        raise SfumatoError(f"image of {len(raw)} bytes is over the server cap max_upload_bytes = "
                           f"{caps.max_upload_bytes} (--max-upload-bytes)")
    try:
        with Image.open(io.BytesIO(raw)) as image:  # reads the header only: no decompression bomb
            pixels = image.width * image.height
    except (OSError, Image.DecompressionBombError):
        raise SfumatoError("image: not a readable PNG/JPEG/WebP image") from None
    if pixels > 4 * caps.max_pixels:
        raise SfumatoError(f"image of {pixels} pixels is over 4 * max_pixels = {4 * caps.max_pixels}")
    return raw


# --- the jobs API ---

class LoraChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    weight: float = 1.0


def _job_request_model() -> type[BaseModel]:
    """GenerationParams' fields (same names and defaults) plus what the server adds."""
    hints = typing.get_type_hints(GenerationParams)
    fields = {f.name: (hints[f.name], f.default) for f in dataclasses.fields(GenerationParams)
              if f.name not in ("prompt", "loras")}
    return create_model(
        "JobRequest", __config__=ConfigDict(extra="forbid"), prompt=(str, ...),
        n_iter=(int, 1), model=(str | None, None), vae=(str | None, None),
        loras=(list[LoraChoice], []), init_image=(str | None, None), **fields)


JobRequest = _job_request_model()


def principal_of(request: Request) -> Principal:
    return getattr(request.state, "principal", Principal(None))


def add_job_routes(app: FastAPI, server: Server) -> None:
    @app.post("/api/jobs", status_code=202, tags=["jobs"])
    def submit_job(body: JobRequest, request: Request) -> dict:
        params = body.model_dump(exclude={"init_image", "loras"})
        params["loras"] = [(str(server.catalog.resolve("lora", c.name).path), c.weight, c.weight)
                           for c in body.loras]
        init = decode_image(body.init_image, server.config.caps) if body.init_image else None
        job = server.submit(principal_of(request), "img2img" if init else "txt2img", params, init)
        return {"id": job.id, "status": job.status, "position": server.store.queue_position(job.id)}

    @app.get("/api/jobs", tags=["jobs"])
    def list_jobs(request: Request, status: str | None = None, limit: int = 50,
                  before: float | None = None) -> list[dict]:
        principal = principal_of(request)
        jobs = server.store.list(owner=principal.name, any_owner=principal.name is None,
                                 status=status, limit=min(max(limit, 1), 500), before=before)
        return [job.public() for job in jobs]

    @app.get("/api/jobs/{job_id}", tags=["jobs"])
    def get_job(job_id: str, request: Request) -> dict:
        job = server.visible_job(principal_of(request), job_id)
        progress = server.worker.snapshot()
        return {**job.public(), "position": server.store.queue_position(job_id),
                "progress": progress.fraction if progress.job == job_id else
                (1.0 if job.status == "done" else 0.0)}

    @app.post("/api/jobs/{job_id}/cancel", tags=["jobs"])
    def cancel_job(job_id: str, request: Request) -> dict:
        job = server.visible_job(principal_of(request), job_id)
        if not server.store.cancel_queued(job_id) and job.status == "running":
            server.worker.request_stop("cancelled", job_id)
        return {"id": job_id, "status": server.store.get(job_id).status}

    @app.get("/api/jobs/{job_id}/images/{index}", tags=["jobs"])
    def job_image(job_id: str, index: int, request: Request):
        job = server.visible_job(principal_of(request), job_id)
        return StreamingResponse(io.BytesIO(server.read_image(job, index)), media_type="image/png",
                                 headers={"Content-Disposition": f'inline; filename="{job_id}-{index:02d}.png"'})

    @app.get("/api/jobs/{job_id}/events", tags=["jobs"])
    async def job_events(job_id: str, request: Request) -> StreamingResponse:
        """Server-sent events: `progress` (with a preview PNG as a data URL) and `status`."""
        server.visible_job(principal_of(request), job_id)
        return StreamingResponse(event_stream(server, job_id), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


async def event_stream(server: Server, job_id: str, preview_every: float = 0.5):
    subscriber = server.hub.subscribe()
    loop, queue = subscriber
    last_preview = 0.0
    try:
        job = server.store.get(job_id)
        yield sse("status", job.public())
        while job.status not in FINAL:
            try:
                event = await asyncio.wait_for(queue.get(), timeout=10.0)
            except TimeoutError:
                yield ": keep-alive\n\n"
                event = {"type": "status", "job": job_id}
            if event["job"] != job_id:
                continue
            if event["type"] == "progress":
                latents = server.worker.snapshot().latents
                if latents is not None and loop.time() - last_preview >= preview_every:
                    last_preview = loop.time()
                    png = await asyncio.to_thread(preview_png, latents)
                    event = {**event, "preview": "data:image/png;base64," + base64.b64encode(png).decode()}
                yield sse("progress", event)
            else:
                job = server.store.get(job_id)
                yield sse("status", job.public())
    finally:
        server.hub.unsubscribe(subscriber)


# --- the application ---

class Guard:
    """ASGI middleware: credentials on every route but /health, and a cap on request bodies."""

    def __init__(self, app, auth: AuthConfig, max_body: int):
        self.app, self.auth, self.max_body = app, auth, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        if scope["path"] != "/health":
            principal = self.auth.check(headers.get("authorization"))
            if principal is None:
                response = JSONResponse(
                    {"detail": "missing or wrong credentials: send Authorization: Bearer <key>"},
                    status_code=401, headers={"WWW-Authenticate": 'Basic realm="sfumato"'})
                return await response(scope, receive, send)
            scope.setdefault("state", {})["principal"] = principal
        if int(headers.get("content-length") or 0) > self.max_body:
            response = JSONResponse({"detail": f"request body over {self.max_body} bytes "
                                     "(max_upload_bytes, --max-upload-bytes)"}, status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def counted_receive():  # bodies sent without a Content-Length
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise BodyTooLarge(f"request body over {self.max_body} bytes (--max-upload-bytes)")
            return message

        await self.app(scope, counted_receive, send)


def create_app(config: ServerConfig) -> FastAPI:
    from contextlib import asynccontextmanager

    from sfumato.server.a1111 import add_a1111_routes

    server = Server(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.start()
        yield
        server.stop()

    app = FastAPI(title="sfumato", version=sfumato.__version__, lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(SfumatoError)
    async def user_error(request: Request, error: SfumatoError) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=422)

    @app.exception_handler(QuotaExceeded)
    async def over_quota(request: Request, error: QuotaExceeded) -> JSONResponse:
        resets = next_month_start()
        return JSONResponse(
            {"detail": f"{error}; it resets at {resets.isoformat()}", "resets": resets.isoformat()},
            status_code=429, headers={"Retry-After": str(int(resets.timestamp() - time.time()))})

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, error: QueueFull) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=503, headers={"Retry-After": "10"})

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request: Request, error: BodyTooLarge) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=413)

    @app.get("/health", tags=["server"])
    def health() -> dict:
        return {"status": "ok", "queued": server.store.pending_count(), "version": sfumato.__version__}

    add_job_routes(app, server)
    add_a1111_routes(app, server)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html")

    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
    # base64 makes an upload 4/3 larger; allow some room for the rest of the JSON
    app.add_middleware(Guard, auth=config.auth, max_body=config.caps.max_upload_bytes * 4 // 3 + 2**20)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins),
                           allow_methods=["*"], allow_headers=["Authorization", "Content-Type"])
    return app

