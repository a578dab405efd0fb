"""AUTOMATIC1111's web API (/sdapi/v1): its field names, defaults and response shapes, so that
A1111 clients (webuiapi, Krita/Photoshop plug-ins, bots) work unchanged.

The request models list A1111's fields with A1111's defaults (modules/processing.py and
modules/api/models.py); unknown fields are ignored as A1111 does. A1111 features this engine
lacks (hires fix, inpainting masks, scripts) are refused with 422 rather than silently dropped.
Every A1111 request becomes a job in the same queue as /api/jobs and waits for it.
"""

from __future__ import annotations

import base64
import io
import json
import time
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

import sfumato
from sfumato.errors import SfumatoError
from sfumato.params import SAMPLER_NAMES, SCHEDULE_NAMES, tome_ratio
from sfumato.server.jobs import Job

# override_settings / options keys we honour -> job parameter
OPTION_KEYS = {"sd_model_checkpoint": "model", "sd_vae": "vae", "CLIP_stop_at_last_layers": "clip_skip",
               "token_merging_ratio": "token_merging_ratio"}


class A1111Request(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str = "Euler"  # A1111: sampler = sampler_name or sampler_index
    scheduler: str | None = None  # None: "automatic"
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    script_name: str | None = None
    script_args: list = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict = Field(default_factory=dict)
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2ImgRequest(A1111Request):
    enable_hr: bool = False
    denoising_strength: float | None = None  # used by hires fix only


class Img2ImgRequest(A1111Request):
    init_images: list[str] | None = None
    resize_mode: int = 0
    denoising_strength: float = 0.75
    mask: str | None = None
    include_init_images: bool = False


class ImagesResponse(BaseModel):
    images: list[str] | None = None  # base64 PNGs with the `parameters` text chunk
    parameters: dict
    info: str  # a JSON document, as a string (A1111 does this)


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: dict
    current_image: str | None = None
    textinfo: str | None = None


class PNGInfoRequest(BaseModel):
    image: str


class PNGInfoResponse(BaseModel):
    info: str
    items: dict
    parameters: dict


def unsupported(req: A1111Request) -> str | None:
    if getattr(req, "enable_hr", False):
        return "enable_hr (hires fix) is not supported"
    if getattr(req, "mask", None):
        return "mask (inpainting) is not supported"
    if req.script_name:
        return f"script_name {req.script_name!r}: scripts are not supported"
    if req.alwayson_scripts:
        return f"alwayson_scripts {sorted(req.alwayson_scripts)}: scripts are not supported"
    return None


def job_params(req: A1111Request, options: dict) -> dict:
    """An A1111 request (plus the server's current options) as job parameters."""
    settings = {**options, **(req.override_settings or {})}
    vae = settings.get("sd_vae")
    params = {
        "prompt": req.prompt, "negative_prompt": req.negative_prompt, "seed": req.seed,
        "steps": req.steps, "cfg_scale": req.cfg_scale, "width": req.width, "height": req.height,
        "sampler": req.sampler_name or req.sampler_index, "scheduler": req.scheduler or "automatic",
        "batch_size": req.batch_size, "n_iter": req.n_iter,
        "clip_skip": int(settings.get("CLIP_stop_at_last_layers") or 1),
        "model": settings.get("sd_model_checkpoint"),
        "vae": None if vae in (None, "", "Automatic", "None") else vae,
        # None: the server's own `--lever tome` decides
        "token_merging_ratio": settings.get("token_merging_ratio"),
    }
    if isinstance(req, Img2ImgRequest):
        params["denoising_strength"] = req.denoising_strength
    return params


def info_json(job: Job) -> str:
    """A1111's `Processed.js()`: the info string of a txt2img/img2img response."""
    p, info = job.params, job.info or {}
    seeds = [image["seed"] for image in job.images]
    count = len(job.images)
    return json.dumps({
        "prompt": p["prompt"], "all_prompts": [p["prompt"]] * count,
        "negative_prompt": p["negative_prompt"], "all_negative_prompts": [p["negative_prompt"]] * count,
        "seed": seeds[0] if seeds else p["seed"], "all_seeds": seeds,
        "subseed": -1, "all_subseeds": [-1] * count, "subseed_strength": 0,
        "width": p["width"], "height": p["height"], "sampler_name": p["sampler"],
        "cfg_scale": p["cfg_scale"], "steps": p["steps"], "batch_size": p["batch_size"],
        "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": info.get("sd_model_name"), "sd_model_hash": info.get("sd_model_hash"),
        "sd_vae_name": p.get("vae"), "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": p["denoising_strength"] if job.kind == "img2img" else 0,
        "extra_generation_params": {"Schedule type": p["scheduler"].capitalize()},
        "index_of_first_image": 0, "infotexts": [image["infotext"] for image in job.images],
        "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
        "clip_skip": p["clip_skip"], "is_using_inpainting_conditioning": False,
        "version": f"sfumato {sfumato.__version__}",
    })


def add_a1111_routes(app: FastAPI, server) -> None:
    from sfumato.server.app import decode_image, principal_of

    def options() -> dict:
        ratio = server.store.setting("token_merging_ratio", None)  # None: never set by a client
        return {"sd_model_checkpoint": server.default_model(),
                "sd_vae": server.store.setting("sd_vae", "Automatic"),
                "CLIP_stop_at_last_layers": int(server.store.setting("CLIP_stop_at_last_layers", "1")),
                **({} if ratio is None else {"token_merging_ratio": float(ratio)})}

    async def run(req: A1111Request, request: Request, kind: str, init: bytes | None) -> ImagesResponse:
        problem = unsupported(req)
        if problem:
            raise SfumatoError(problem)
        job = server.submit(principal_of(request), kind, job_params(req, options()), init)
        job = await server.wait(job.id)
        if job.status == "failed":
            if job.user_error:
                raise SfumatoError(job.error)
            raise HTTPException(500, job.error)
        images = [base64.b64encode(server.read_image(job, i["index"])).decode() for i in job.images]
        parameters = req.model_dump()
        if isinstance(req, Img2ImgRequest) and not req.include_init_images:
            parameters["init_images"] = None
        return ImagesResponse(images=images if req.send_images else [], parameters=parameters,
                              info=info_json(job))

    @app.post("/sdapi/v1/txt2img", response_model=ImagesResponse, tags=["a1111"])
    async def txt2img(req: Txt2ImgRequest, request: Request) -> ImagesResponse:
        return await run(req, request, "txt2img", None)

    @app.post("/sdapi/v1/img2img", response_model=ImagesResponse, tags=["a1111"])
    async def img2img(req: Img2ImgRequest, request: Request) -> ImagesResponse:
        if not req.init_images:
            raise SfumatoError("init_images: img2img needs at least one base64 image")
        init = decode_image(req.init_images[0], server.config.caps)
        return await run(req, request, "img2img", init)

    @app.get("/sdapi/v1/progress", response_model=ProgressResponse, tags=["a1111"])
    def progress(skip_current_image: bool = False) -> ProgressResponse:
        snap = server.worker.snapshot()
        state = {"skipped": snap.skipped, "interrupted": snap.interrupted, "job": snap.job or "",
                 "job_count": snap.job_count, "job_timestamp": time.strftime(
                     "%Y%m%d%H%M%S", time.localtime(snap.started or time.time())),
                 "job_no": snap.job_no, "sampling_step": snap.step, "sampling_steps": snap.steps}
        if not snap.job:
            return ProgressResponse(progress=0, eta_relative=0, state=state)
        fraction = max(snap.fraction, 0.01)
        elapsed = time.time() - snap.started
        image = None
        if snap.latents is not None and not skip_current_image:
            from sfumato.server.worker import preview_png

            image = base64.b64encode(preview_png(snap.latents)).decode()
        queued = server.store.pending_count() - 1
        return ProgressResponse(
            progress=fraction, eta_relative=max(0.0, elapsed / fraction - elapsed), state=state,
            current_image=image,
            textinfo=f"step {snap.step}/{snap.steps}, batch {snap.job_no + 1}/{snap.job_count}; "
                     f"{queued} more job(s) queued")

    @app.post("/sdapi/v1/interrupt", tags=["a1111"])
    def interrupt() -> dict:
        server.worker.request_stop("interrupted")
        return {}

    @app.post("/sdapi/v1/skip", tags=["a1111"])
    def skip() -> dict:
        server.worker.request_stop("skip")
        return {}

    @app.get("/sdapi/v1/options", tags=["a1111"])
    def get_options() -> dict:
        return {**options(), "samples_format": "png", "outdir_samples": str(server.outputs)}

    @app.post("/sdapi/v1/options", tags=["a1111"])
    def set_options(req: dict[str, Any]) -> None:
        for key in OPTION_KEYS:
            if key not in req or req[key] is None:
                continue
            value = req[key]
            if key == "sd_model_checkpoint":
                value = server.catalog.resolve("model", str(value)).title
            elif key == "sd_vae" and value not in ("Automatic", "None"):
                value = server.catalog.resolve("vae", str(value)).title
            elif key == "CLIP_stop_at_last_layers" and not (isinstance(value, int) and 1 <= value <= 12):
                raise SfumatoError("CLIP_stop_at_last_layers must be an integer from 1 to 12")
            elif key == "token_merging_ratio":
                tome_ratio(value)
            server.store.set_setting(key, str(value))

    @app.get("/sdapi/v1/sd-models", tags=["a1111"])
    def sd_models() -> list[dict]:
        engine, key = server.worker.engine, server.worker.engine_key
        loaded = key[0].title if key else None
        return [{"title": e.title, "model_name": e.title.rsplit("/", 1)[-1].removesuffix(".safetensors"),
                 "hash": engine.model.hash if engine and e.title == loaded else None,
                 "sha256": None, "filename": e.title, "config": None}
                for e in server.catalog.list("model")]

    @app.get("/sdapi/v1/sd-vae", tags=["a1111"])
    def sd_vae() -> list[dict]:
        return [{"model_name": e.title, "filename": e.title} for e in server.catalog.list("vae")]

    @app.get("/sdapi/v1/loras", tags=["a1111"])
    def loras() -> list[dict]:
        def name(title: str) -> str:
            return title.rsplit("/", 1)[-1].removesuffix(".safetensors")
        return [{"name": name(e.title), "alias": name(e.title), "path": e.title, "metadata": {}}
                for e in server.catalog.list("lora")]

    @app.get("/sdapi/v1/samplers", tags=["a1111"])
    def samplers() -> list[dict]:
        return [{"name": name, "aliases": [name.lower()], "options": {}} for name in SAMPLER_NAMES]

    @app.get("/sdapi/v1/schedulers", tags=["a1111"])
    def schedulers() -> list[dict]:
        return [{"name": name, "label": name.capitalize(), "aliases": None,
                 "default_rho": 7.0 if name == "karras" else -1, "need_inner_model": False}
                for name in ("automatic", *SCHEDULE_NAMES)]

    @app.get("/sdapi/v1/scripts", tags=["a1111"])
    def scripts() -> dict:
        return {"txt2img": [], "img2img": []}

    @app.post("/sdapi/v1/refresh-checkpoints", tags=["a1111"])
    def refresh_checkpoints() -> None:
        """A no-op: the model folder is listed afresh on every request."""

    @app.post("/sdapi/v1/png-info", response_model=PNGInfoResponse, tags=["a1111"])
    def png_info(req: PNGInfoRequest) -> PNGInfoResponse:
        from sfumato.metadata import parse_infotext

        raw = decode_image(req.image, server.config.caps)
        with Image.open(io.BytesIO(raw)) as image:
            chunks = {k: v for k, v in image.info.items() if isinstance(v, str)}
        text = chunks.pop("parameters", "")
        return PNGInfoResponse(info=text, items=chunks, parameters=parse_infotext(text) if text else {})
