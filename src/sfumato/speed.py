"""`sfumato bench speed`: sfumato's Pipeline against stock diffusers, same model and settings.

Each run loads and generates in a fresh subprocess per side, so peak RSS and load time are that
side's alone; sides alternate (s, d, s, d, ...) so that load from other users of a shared machine
hits both alike: compare the ratios, not the absolute times. Run 1 of each side loads with the
weights evicted from the page cache ("cold"); later runs find them cached ("warm").

The diffusers side is the reference: StableDiffusionPipeline loaded the stock way
(from_pretrained / from_single_file), EulerDiscreteScheduler with Karras sigmas and "linspace"
spacing (what sfumato's "Euler" + "karras" computes), the same seeded noise, steps, size, CFG.
It runs fp32 eager on the CPU and fp16 on CUDA (what each user of diffusers runs there). On CUDA
each side makes one untimed image first: a GPU's first image pays for kernel selection.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import click

CACHE = Path.home() / ".cache" / "sfumato" / "bench"
PROMPT = "a red star above a blue circle under a night sky"
NEGATIVE = "blurry"


@dataclass(frozen=True)
class Setup:
    model: str               # a checkpoint file or diffusers folder
    size: int = 512
    steps: int = 20
    cfg: float = 7.0
    sampler: str = "Euler"
    device: str = "cpu"
    seed: int = 1
    levers: tuple[str, ...] = ()   # sfumato's opt-in levers ("int8", "compile", ...)

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")


# ---------------------------------------------------------------- the models it measures


def sd15_random(cache: Path = CACHE) -> Path:
    """The SD1.5 architecture at random weights, as one original-layout checkpoint, built once.
    Speed doesn't depend on weight values."""
    out = cache / "sd15-random.safetensors"
    if not out.exists():
        from sfumato.checkpoints import CONFIGS, export_single_file

        _write_random_folder(cache, out, CONFIGS / "sd15", export_single_file)
    return out


def builtin_standin(cache: Path = CACHE) -> Path:
    """The shipped built-in model, or while it is still being trained a folder with its
    architecture (from the training recipes) at random weights."""
    from sfumato.checkpoints import BUILTIN_MODEL

    if BUILTIN_MODEL.exists():
        return BUILTIN_MODEL
    out = cache / "builtin-random"
    if not out.exists():
        _write_random_folder(cache, out, None, None)
    return out


def _write_random_folder(cache: Path, out: Path, configs: Path | None, export) -> None:
    """Random components saved as a diffusers folder (then exported to one file if `export`)."""
    import torch

    torch.manual_seed(0)
    unet, vae, text, scheduler = _sd15_components(configs) if configs else _builtin_components()
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        folder = Path(tmp) / "model"
        for name, part in (("unet", unet), ("vae", vae), ("text_encoder", text)):
            part.save_pretrained(folder / name)
        (folder / "scheduler").mkdir()
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
        index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                 "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                 "tokenizer": ["transformers", "CLIPTokenizer"],
                 "scheduler": ["diffusers", scheduler.get("_class_name", "DDPMScheduler")]}
        (folder / "model_index.json").write_text(json.dumps(index))  # as save_pretrained writes it
        if export:
            export(folder, out)  # writes atomically itself
        else:
            os.replace(folder, out)  # atomic: a folder appears whole or not at all


def _sd15_components(configs: Path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    read = lambda name: json.loads((configs / name).read_text())  # noqa: E731
    return (UNet2DConditionModel.from_config(read("unet/config.json")),
            AutoencoderKL.from_config(read("vae/config.json")),
            CLIPTextModel(CLIPTextConfig.from_dict(read("text_encoder/config.json"))),
            read("scheduler/scheduler_config.json"))


def _builtin_components():
    from sfumato.train.clip import build_clip, text_encoder_of
    from sfumato.train.common import load_recipe
    from sfumato.train.unet import build_scheduler, build_unet
    from sfumato.train.vae import build_vae

    vae_model = load_recipe("vae", gpu=False)["model"]
    clip_model = load_recipe("clip", gpu=False)["model"]
    factor = 2 ** (len(vae_model["block_out_channels"]) - 1)
    unet = build_unet(load_recipe("unet", gpu=False)["model"], clip_model["text"]["width"],
                      vae_model["sample_size"] // factor)
    text = text_encoder_of(build_clip(clip_model, vae_model["sample_size"]))
    return unet, build_vae(vae_model), text, dict(build_scheduler("epsilon").config)


def resolve_model(name: str) -> Path:
    if name == "sd15":
        return sd15_random()
    if name == "builtin":
        return builtin_standin()
    return Path(name)


# ---------------------------------------------------------------- one side, in its own process


def evict_from_page_cache(path: Path) -> None:
    """Drop this model's files, and the fp16 copy sfumato keeps of it, from the OS page cache
    (only these files: harmless to others)."""
    import torch

    from sfumato.checkpoints import converted_path

    files = [path, converted_path(path, torch.float16)] if path.is_file() else list(path.rglob("*"))
    for file in [f for f in files if f.is_file()]:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class ModuleTimer:
    """Wall time spent inside a module's forward, summed over calls. `sync` waits for queued GPU
    work (CUDA runs asynchronously: without it a forward would seem to take no time)."""

    def __init__(self, module, sync=lambda: None):
        self.calls, self.seconds, self._start, self._sync = 0, 0.0, 0.0, sync
        module.register_forward_pre_hook(lambda *_: self._begin())
        module.register_forward_hook(lambda *_: self._end())

    def _begin(self) -> None:
        self._sync()
        self._start = time.perf_counter()

    def _end(self) -> None:
        self._sync()
        self.calls += 1
        self.seconds += time.perf_counter() - self._start


def run_side(side: str, setup: Setup, image_out: Path, cold: bool) -> dict:
    """Load, generate one image, report timings (the body of the subprocess)."""
    import numpy as np
    import torch

    cuda = setup.on_cuda
    sync = torch.cuda.synchronize if cuda else lambda: None
    path = Path(setup.model)
    if cold:
        evict_from_page_cache(path)
    start = time.perf_counter()
    load, generate = (_sfumato_side if side == "sfumato" else _diffusers_side)(setup)
    imported = time.perf_counter()
    pipe, unet, vae = load(path)
    loaded = time.perf_counter()
    first_image_s = None
    # An untimed first image where set-up happens once per process: CUDA's kernel selection and
    # cuBLAS/cuDNN, or compiling (the compile lever). Its time is reported on its own.
    if cuda or (side == "sfumato" and "compile" in setup.levers):
        generate(pipe)
        sync()
        first_image_s = time.perf_counter() - loaded
    unet_timer, vae_timer = ModuleTimer(unet, sync), ModuleTimer(vae.decoder, sync)
    begun = time.perf_counter()
    image = generate(pipe)  # (H, W, 3) uint8
    sync()
    done = time.perf_counter()
    np.save(image_out, image)
    return {"import_s": imported - start, "load_s": loaded - imported, "image_s": done - begun,
            "first_image_s": first_image_s,
            # None when the UNet's forward never ran as such (the deepcache lever runs its blocks itself)
            "unet_step_s": unet_timer.seconds / unet_timer.calls if unet_timer.calls else None,
            "unet_calls": unet_timer.calls,
            "vae_decode_s": vae_timer.seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}


def _sfumato_side(setup: Setup):
    import_engine()  # now, not lazily while loading: both sides' load times count loading alone
    from sfumato.accel import Levers
    from sfumato.pipeline import Pipeline

    def load(path: Path):
        pipe = Pipeline.load(str(path), device=setup.device, levers=Levers.parse(setup.levers))
        return pipe, pipe.unet.unet, pipe.model.vae  # the UNet as sampling calls it (maybe traced)

    def generate(pipe):
        import numpy as np

        [result] = pipe.generate(prompt=PROMPT, negative_prompt=NEGATIVE, seed=setup.seed,
                                 steps=setup.steps, cfg_scale=setup.cfg, width=setup.size,
                                 height=setup.size, sampler=setup.sampler, scheduler="karras")
        return np.asarray(result.image)

    return load, generate


def _diffusers_side(setup: Setup):
    import numpy as np
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from sfumato.checkpoints import CONFIGS
    from sfumato.text import load_clip_tokenizer

    stock = {"tokenizer": load_clip_tokenizer(), "safety_checker": None, "feature_extractor": None,
             "requires_safety_checker": False, "local_files_only": True,
             "torch_dtype": torch.float16 if setup.on_cuda else torch.float32}

    def load(path: Path):
        if path.is_dir():
            pipe = StableDiffusionPipeline.from_pretrained(path, **stock)
        else:
            pipe = StableDiffusionPipeline.from_single_file(path, config=str(CONFIGS / "sd15"), **stock)
        pipe.scheduler = EulerDiscreteScheduler.from_config(
            pipe.scheduler.config, use_karras_sigmas=True, timestep_spacing="linspace")
        pipe.set_progress_bar_config(disable=True)
        pipe.to(setup.device)
        return pipe, pipe.unet, pipe.vae

    def generate(pipe):
        factor = pipe.vae_scale_factor
        noise = torch.randn((1, pipe.unet.config.in_channels, setup.size // factor, setup.size // factor),
                            generator=torch.Generator("cpu").manual_seed(setup.seed))
        image = pipe(PROMPT, negative_prompt=NEGATIVE, latents=noise.to(setup.device, pipe.unet.dtype),
                     num_inference_steps=setup.steps, guidance_scale=setup.cfg, height=setup.size,
                     width=setup.size, output_type="np").images[0]
        return (image * 255).round().astype(np.uint8)

    return load, generate


def spawn(request: dict, env: dict | None = None) -> dict:
    """run_side or startup_phases in a fresh interpreter; its last stdout line is the JSON result."""
    done = subprocess.run([sys.executable, "-m", "sfumato.speed", json.dumps(request)], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    if done.returncode != 0:
        raise click.ClickException(f"the {request['side']} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def spawn_side(side: str, setup: Setup, image_out: Path, cold: bool) -> dict:
    return spawn({"side": side, "setup": asdict(setup), "image": str(image_out), "cold": cold})


# ---------------------------------------------------------------- start-up: the whole command

PHASES = [("python_s", "python start"), ("import_s", "imports"), ("load_s", "model load"),
          ("sample_s", "text+sampling"), ("decode_s", "VAE decode"), ("save_s", "PNG save")]


def import_engine() -> None:
    """What loading a full model imports: the pipeline, and the library classes that loading a
    model imports lazily."""
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
    from tqdm import tqdm  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    import sfumato.pipeline  # noqa: F401


def startup_phases(model: Path, out: Path, spawned: float) -> dict:
    """The work of `sfumato generate --seed 1`, phase by phase, in this fresh process: from the
    model's bundle of traces where the cache has one (sfumato.frozen), else from the full model.
    spawned: the parent's time.monotonic() as it started this process."""
    phases = {"python_s": time.monotonic() - spawned}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        phases[name], clock = time.perf_counter() - clock, time.perf_counter()

    from tqdm import tqdm  # noqa: F401

    import sfumato.commands  # noqa: F401
    from sfumato import frozen
    from sfumato.accel import Levers
    from sfumato.metadata import save_png
    from sfumato.pipeline import Pipeline

    lap("import_s")  # what the command imports before it reads a model
    folder = frozen.bundle_folder(model, Levers())  # None for an SD-sized model: it has none
    if folder is not None and (folder / frozen.META).exists():
        pipe = frozen.bundle_pipeline(folder, model)
    else:
        pipe = Pipeline.load(str(model))  # imports diffusers and transformers
    lap("load_s")
    decode, decode_s = pipe.decode, []

    def timed_decode(latents):
        begun = time.perf_counter()
        try:
            return decode(latents)
        finally:
            decode_s.append(time.perf_counter() - begun)

    pipe.decode = timed_decode
    [result] = pipe.generate(prompt=PROMPT, seed=1)
    lap("sample_s")
    save_png(result.image, out / "phases.png", infotext=result.infotext, params=result.params.to_dict())
    lap("save_s")
    phases["decode_s"] = sum(decode_s)
    phases["sample_s"] -= phases["decode_s"]
    return {**phases, "size": result.params.width, "steps": result.params.steps,
            "bundle": pipe.model.frozen}


def time_startup(model: Path, runs: int, out: Path) -> dict:
    """`sfumato generate` start to finish as a user runs it, imports included (wall and CPU
    time), alternating with a fresh process that times its phases. All in a cache of their own:
    the first run is a new user's first (it writes the model's traces), the later ones each
    later command's."""
    command = [sys.executable, "-m", "sfumato.cli", "generate", PROMPT, "--model", str(model),
               "--seed", "1", "--out", str(out)]
    found: dict = {"wall_s": [], "cpu_s": [], "phases": [], "loadavg": os.getloadavg()[0]}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SFUMATO_CACHE": str(out / "cache")}
    for run in range(runs + 1):
        before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise click.ClickException(f"`sfumato generate` failed:\n{done.stderr[-3000:]}")
        if not run:
            found["first_wall_s"] = wall
            continue
        found["wall_s"].append(wall)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        found["cpu_s"].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        found["phases"].append(spawn({"side": "startup", "model": str(model), "out": str(out),
                                      "spawned": time.monotonic()}, env))
    found["server_wall_s"] = time_server_generate(model, runs, out)
    return found


def time_server_generate(model: Path, runs: int, out: Path) -> list[float]:
    """`sfumato generate --server` wall times against a `sfumato serve` of the same model, after one
    untimed job (the server loads its model on the first)."""
    from sfumato.server.loadbench import free_port, start_server, wait_healthy

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    server = start_server(out / "server", str(model), port)
    command = [sys.executable, "-m", "sfumato.cli", "generate", PROMPT, "--server", url, "--seed", "1",
               "--out", str(out)]
    try:
        wait_healthy(url, server)
        walls = []
        for run in range(runs + 1):
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise click.ClickException(f"`sfumato generate --server` failed:\n{done.stderr[-3000:]}")
            if run:  # the first job loads the server's model
                walls.append(time.perf_counter() - start)
        return walls
    finally:
        server.terminate()
        server.wait(30)


def format_startup(found: dict) -> str:
    walls, first = found["wall_s"], found["phases"][0]
    phases = ", ".join(f"{label} {statistics.median(p[key] for p in found['phases']):.2f}"
                       for key, label in PHASES)
    served = "from the model's traces" if first["bundle"] else "from the full model"
    return "\n".join([
        f"`sfumato generate` wall, imports included ({first['size']}x{first['size']}, {first['steps']} steps): "
        f"first run (a fresh cache: it traces the networks) {found['first_wall_s']:.2f} s; later runs "
        f"({served}) median {statistics.median(walls):.2f} s of {len(walls)} "
        f"({', '.join(f'{t:.2f}' for t in walls)}), CPU (user+sys) median {statistics.median(found['cpu_s']):.2f} s",
        f"  its phases (s), median of {len(walls)} fresh processes: {phases}",
        f"`sfumato generate --server` wall, against a running `sfumato serve` of the model: median "
        f"{statistics.median(found['server_wall_s']):.2f} s ({', '.join(f'{t:.2f}' for t in found['server_wall_s'])})",
        f"  machine: load average {found['loadavg']:.1f} on {os.cpu_count()} CPUs at the start"])


# ---------------------------------------------------------------- the report


def fidelity(ours, reference) -> dict:
    """PSNR (dB) and max |difference| of two uint8 images, on the [0, 1] scale."""
    import numpy as np

    diff = ours.astype(np.float64) / 255 - reference.astype(np.float64) / 255
    mse = float((diff**2).mean())
    return {"psnr_db": float("inf") if mse == 0 else 10 * np.log10(1 / mse),
            "max_abs_diff": float(np.abs(diff).max())}


FIELDS = [("image_s", "wall time per image (s)"), ("unet_step_s", "UNet step, cond+uncond (s)"),
          ("vae_decode_s", "VAE decode (s)"), ("peak_rss_mb", "peak RSS (MB)"),
          ("peak_gpu_mb", "peak GPU memory (MB)"),
          ("import_s", "library imports (s)"), ("load_cold_s", "model load, cold cache (s)"),
          ("load_warm_s", "model load, warm cache (s)"), ("first_image_s", "first image, untimed (s)")]


def _median_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict[str, float | None]]:
    """Medians per side; cold load = run 1, warm load = the median of the later runs."""
    table: dict[str, dict[str, float | None]] = {}
    for side, results in runs.items():
        row = {key: _median_or_none([r.get(key) for r in results])
               for key in ("image_s", "unet_step_s", "vae_decode_s", "peak_rss_mb", "peak_gpu_mb", "import_s",
                           "first_image_s")}
        row["load_cold_s"] = results[0]["load_s"]
        row["load_warm_s"] = statistics.median(r["load_s"] for r in results[1:]) if len(results) > 1 else None
        table[side] = row
    return table


def format_report(setup: Setup, table: dict, quality: dict) -> str:
    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}" if value < 100 else f"{value:.0f}"

    lines = [f"model {setup.model}  {setup.size}x{setup.size}  steps {setup.steps}  cfg {setup.cfg:g}  "
             f"sampler {setup.sampler}+karras  device {setup.device}  levers "
             f"{','.join(setup.levers) or 'default'}",
             f"{'median of runs':<30}{'sfumato':>10}{'diffusers':>11}{'ratio':>8}"]
    for key, label in FIELDS:
        if key == "peak_gpu_mb" and not setup.on_cuda:
            continue
        ours, theirs = table["sfumato"][key], table["diffusers"][key]
        ratio = f"{ours / theirs:.2f}" if ours is not None and theirs else "-"
        lines.append(f"{label:<30}{cell(ours):>10}{cell(theirs):>11}{ratio:>8}")
    reference = "fp16 diffusers" if setup.on_cuda else "fp32 eager diffusers"
    lines.append(f"fidelity vs {reference}: PSNR {quality['psnr_db']:.1f} dB, "
                 f"max abs diff {quality['max_abs_diff']:.4f} (of 1)")
    return "\n".join(lines)


@click.command("speed")
@click.option("--model", default="sd15", show_default=True,
              help="sd15 (SD1.5 at random weights, cached) | builtin | PATH")
@click.option("--size", type=int, default=512, show_default=True)
@click.option("--steps", type=int, default=20, show_default=True)
@click.option("--cfg", type=float, default=7.0, show_default=True)
@click.option("--runs", type=int, default=3, show_default=True)
@click.option("--sampler", default="Euler", show_default=True)
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--lever", "levers", multiple=True,
              help="sfumato lever (deepcache, tome, int8, compile, bf16; no-fp16_weights, no-channels_last, "
                   "no-page_out, no-fp16_copy turn a default off), repeatable.")
@click.option("--cli-runs", type=int, default=3, show_default=True,
              help="Times to run the whole `sfumato generate` command, and its phases (0 = skip).")
@click.option("--cli-model", default="builtin", show_default=True, help="The model it generates with.")
@click.option("--startup-only", is_flag=True,
              help="Only time `sfumato generate` start to finish; skip the comparison with diffusers.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON as well.")
def speed_command(model, size, steps, cfg, runs, sampler, device, levers, cli_runs, cli_model,
                  startup_only, as_json) -> None:
    """sfumato vs stock diffusers: time per image and UNet step, VAE decode, RSS, load, fidelity;
    and the wall time of the whole `sfumato generate` command."""
    if sampler != "Euler":  # the one sampler both sides compute identically
        raise click.UsageError("the diffusers reference runs Euler only: use --sampler Euler")
    figures: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        if not startup_only:  # resolving "sd15" writes a 4 GB model the first time: only when used
            setup = Setup(str(resolve_model(model)), size, steps, cfg, sampler, device, levers=tuple(levers))
            figures = {"setup": asdict(setup), **compare_with_diffusers(setup, runs, Path(tmp))}
            click.echo(format_report(replace(setup, model=model), figures["medians"], figures["fidelity"]))
        if cli_runs or startup_only:
            figures["startup"] = time_startup(resolve_model(cli_model), max(cli_runs, 1), Path(tmp) / "cli")
            click.echo(format_startup(figures["startup"]))
    if as_json:
        click.echo(json.dumps(figures))


def compare_with_diffusers(setup: Setup, runs: int, folder: Path) -> dict:
    results: dict[str, list[dict]] = {"sfumato": [], "diffusers": []}
    images = {side: folder / f"{side}.npy" for side in results}
    for run in range(runs):
        for side in results:  # alternate, so machine noise hits both sides alike
            results[side].append(spawn_side(side, setup, images[side], cold=run == 0))
            click.echo(f"run {run + 1}/{runs} {side}: {results[side][-1]['image_s']:.2f} s/image", err=True)
    import numpy as np

    quality = fidelity(np.load(images["sfumato"]), np.load(images["diffusers"]))
    return {"medians": summarize(results), "fidelity": quality}


if __name__ == "__main__":  # the subprocess of spawn
    request = json.loads(sys.argv[1])
    if request["side"] == "startup":
        result = startup_phases(Path(request["model"]), Path(request["out"]), request["spawned"])
    else:
        result = run_side(request["side"], Setup(**{**request["setup"], "levers": tuple(request["setup"]["levers"])}),
                          Path(request["image"]), request["cold"])
    print(json.dumps(result))
