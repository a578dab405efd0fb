"""Pieces every trainer shares: recipes, seeding, accelerate, checkpoints, the loop (data: data.py).

Every random draw of a training step comes from a generator seeded by (seed, step, rank), never
from global state, so a run resumed from a checkpoint repeats the steps of an uninterrupted one
exactly. Only the main process writes files; every file is written atomically.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sfumato.errors import SfumatoError
from sfumato.files import atomic_folder, atomic_path
from sfumato.train.data import hash_seed, step_batches

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

CHECKPOINT = "checkpoint.pt"
EVAL_KEY = 2**40  # generator key of evaluation draws, beyond any step number
FINAL_SECONDS = 20.0  # kept free at the end of a --max-minutes budget for evaluation and saving
FINAL_FRACTION = 0.15  # ... but at most this share of a short budget


# ----------------------------------------------------------------------------- recipes

def recipe_path(name_or_path: str) -> Path:
    """A recipe file: a path to a .toml, or the name of one shipped in sfumato/configs/train."""
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.exists():
        return path
    shipped = resources.files("sfumato.configs").joinpath("train", f"{name_or_path}.toml")
    if shipped.is_file():
        return Path(str(shipped))
    names = sorted(p.stem for p in Path(str(resources.files("sfumato.configs") / "train")).glob("*.toml"))
    raise SfumatoError(f"no training recipe {name_or_path!r}: give a .toml path or one of {', '.join(names)}")


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


LR_SCHEDULES = ("constant", "cosine")  # after the warm-up; see learning_rate


def _read_recipe(name_or_path: str, seen: tuple[str, ...] = ()) -> dict:
    """A recipe file's tables; `base = "other"` starts from that recipe and overrides it key by key."""
    if name_or_path in seen:
        raise SfumatoError(f"training recipe {name_or_path!r} is its own base ({' -> '.join((*seen, name_or_path))})")
    with recipe_path(name_or_path).open("rb") as f:
        recipe = tomllib.load(f)
    base = recipe.pop("base", None)
    return recipe if base is None else _merge(_read_recipe(base, (*seen, name_or_path)), recipe)


def load_recipe(name_or_path: str, *, gpu: bool) -> dict:
    """The recipe as a dict; on a GPU its [gpu] table overrides the rest (bigger batches)."""
    recipe = _read_recipe(name_or_path)
    gpu_override = recipe.pop("gpu", {})
    recipe = _merge(recipe, gpu_override) if gpu else recipe
    if recipe.get("lr_schedule", "constant") not in LR_SCHEDULES:  # not minutes later, at the first step
        raise SfumatoError(f"recipe {name_or_path!r}: lr_schedule must be one of {', '.join(LR_SCHEDULES)}, "
                           f"not {recipe['lr_schedule']!r}")
    return recipe


# ----------------------------------------------------------------------------- run set-up

@dataclass
class Run:
    """One training command: recipe, output folder, accelerator, budget."""

    recipe: dict
    out: Path
    accelerator: Any
    started: float
    deadline: float  # time.time() at which training must stop to leave room for the finish
    resume: bool
    init_from: Path | None = None  # a model folder whose weights the stage starts from (--init-from)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def seed(self) -> int:
        return int(self.recipe["seed"])

    def generator(self, *keys: int) -> torch.Generator:
        """A generator on the run's device, seeded by (seed, rank, *keys)."""
        g = torch.Generator(self.device)
        g.manual_seed(hash_seed(self.seed, self.accelerator.process_index, *keys))
        return g

    def numpy_rng(self, *keys: int) -> np.random.Generator:
        """Shared by all processes (no rank): batch indices are drawn globally, then sharded."""
        return np.random.default_rng([self.seed, *keys])

    def shard(self, items: np.ndarray) -> np.ndarray:
        """This process's share of a global batch."""
        return items[self.accelerator.process_index :: self.accelerator.num_processes]


def start_run(config: str, out: str | Path, *, resume: bool, max_minutes: float | None,
              overrides: dict[str, Any], device: str | None, init_from: str | Path | None = None) -> Run:
    """Parse the shared options; make the accelerator (bf16 on CUDA, gradient sync across GPUs).

    `overrides` replace the recipe's top-level keys (steps, batch_size, lr); None leaves one as it is.
    """
    from accelerate import Accelerator

    started = time.time()
    if resume and init_from is not None:
        raise SfumatoError("--resume and --init-from exclude each other: --resume continues OUT/checkpoint.pt "
                           "(weights, optimizer, step); --init-from starts a fresh run from a model folder's weights")
    if init_from is not None and not Path(init_from).is_dir():
        raise SfumatoError(f"--init-from {init_from}: no such folder; give a folder `sfumato train assemble` wrote")
    if device == "cuda" and not torch.cuda.is_available():
        raise SfumatoError("--device cuda: no CUDA GPU is visible; use --device cpu")
    cpu = device == "cpu" or not torch.cuda.is_available()
    recipe = load_recipe(config, gpu=not cpu)
    recipe |= {key: value for key, value in overrides.items() if value is not None}
    accelerator = Accelerator(cpu=cpu, mixed_precision="no" if cpu else "bf16")
    if recipe["batch_size"] % accelerator.num_processes:
        raise SfumatoError(f"batch_size {recipe['batch_size']} must be a multiple of the "
                           f"{accelerator.num_processes} processes")
    out = Path(out)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    if resume and not (out / CHECKPOINT).exists():
        raise SfumatoError(f"--resume: no {CHECKPOINT} in {out}; start without --resume")
    budget = math.inf if max_minutes is None else max_minutes * 60
    deadline = started + budget - min(FINAL_SECONDS, FINAL_FRACTION * budget)
    torch.manual_seed(recipe["seed"])
    torch.backends.cudnn.benchmark = True  # fixed shapes every step: pick the fastest conv kernels once
    return Run(recipe, out, accelerator, started, deadline, resume, None if init_from is None else Path(init_from))


# ----------------------------------------------------------------------------- files

def stage_folder(path: Path, name: str) -> Path:
    """A stage's output folder or the model folder inside it (OUT or OUT/vae both work)."""
    if (path / name / "config.json").exists():
        return path / name
    if (path / "config.json").exists():
        return path
    raise SfumatoError(f"{path} holds no {name} model: give the folder a `sfumato train` stage "
                       "or `sfumato train assemble` wrote")


def atomic_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_pretrained_atomic(model: Any, path: Path, **kwargs: Any) -> None:
    """save_pretrained into a temp folder, then swap it in place of `path`."""
    with atomic_folder(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, **kwargs)


def save_grid(images: Tensor, path: Path, ncols: int = 8) -> None:
    """(b, 3, H, W) in [-1, 1] -> one PNG, ncols images a row."""
    from PIL import Image

    b, _, h, w = images.shape
    rows = math.ceil(b / ncols)
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    grid = np.zeros((rows * h, ncols * w, 3), np.uint8)
    for i, img in enumerate(pixels):
        grid[(i // ncols) * h : (i // ncols + 1) * h, (i % ncols) * w : (i % ncols + 1) * w] = img
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")


# ----------------------------------------------------------------------------- the loop

@contextmanager
def stop_on_signals() -> Iterator[dict]:
    """SIGINT/SIGTERM set a flag instead of killing: the loop saves a checkpoint, then stops."""
    flag = {"stop": False}
    handler = lambda signum, frame: flag.update(stop=True)  # noqa: E731
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@dataclass
class Trainable:
    """What the loop trains: module (as the loss calls it), its optimiser, an optional EMA."""

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    ema: Any = None  # diffusers.training_utils.EMAModel
    losses: list[float] = field(default_factory=list)
    step: int = 0
    train_seconds: float = 0.0  # time spent in training steps, for throughput figures
    setup_seconds: float = 0.0  # from the command's start to the first step: data, models


def make_trainable(run: Run, module: torch.nn.Module, lr_scales: dict[str, float] | None = None) -> Trainable:
    """AdamW (+ EMA of the weights when the recipe has ema_decay), prepared by accelerate.

    lr_scales: {child module name: its learning rate over the recipe's lr}, e.g. a text encoder
    tuned beside the UNet at a fifth of its rate; the other children follow the recipe's lr."""
    from diffusers.training_utils import EMAModel

    r = run.recipe
    scales = lr_scales or {}
    groups: dict[float, list] = {}
    for name, p in module.named_parameters():
        if p.requires_grad:  # e.g. a VAE's decoder alone
            groups.setdefault(scales.get(name.split(".")[0], 1.0), []).append(p)
    optimizer = torch.optim.AdamW([{"params": ps, "lr_scale": scale} for scale, ps in groups.items()], lr=r["lr"],
                                  weight_decay=r.get("weight_decay", 0.0), betas=(0.9, r.get("beta2", 0.999)))
    module, optimizer = run.accelerator.prepare(module, optimizer)
    ema = None
    if r.get("ema_decay"):
        ema = EMAModel(run.accelerator.unwrap_model(module).parameters(), decay=r["ema_decay"],
                       use_ema_warmup=True, power=r.get("ema_power", 2 / 3), foreach=True)
        ema.to(run.device)
    trainable = Trainable(module, optimizer, ema)
    if run.resume:
        load_checkpoint(run, trainable)
    return trainable


def checkpoint_state(run: Run, t: Trainable) -> dict:
    state = {"step": t.step, "model": run.accelerator.unwrap_model(t.module).state_dict(),
             "optimizer": t.optimizer.state_dict(), "losses": t.losses,
             "train_seconds": t.train_seconds,
             "rng": {"torch": torch.get_rng_state()}, "recipe": run.recipe}
    if torch.cuda.is_available():
        state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
    if t.ema is not None:
        state["ema"] = t.ema.state_dict()
    return state


def save_checkpoint(run: Run, t: Trainable) -> None:
    if run.is_main:
        atomic_save(checkpoint_state(run, t), run.out / CHECKPOINT)
    run.accelerator.wait_for_everyone()


def load_checkpoint(run: Run, t: Trainable) -> None:
    state = torch.load(run.out / CHECKPOINT, map_location="cpu", weights_only=True)
    run.accelerator.unwrap_model(t.module).load_state_dict(state["model"])
    t.optimizer.load_state_dict(state["optimizer"])
    if t.ema is not None:
        t.ema.load_state_dict(state["ema"])
        t.ema.to(run.device)
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    t.step, t.losses, t.train_seconds = state["step"], list(state["losses"]), state["train_seconds"]


def _agree(run: Run, *flags: bool) -> list[bool]:
    """Every process takes the same stop/save decision, or gradient sync would hang."""
    if run.accelerator.num_processes == 1:
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=run.device)
    return [bool(v) for v in run.accelerator.reduce(t, reduction="sum").gt(0).tolist()]


def learning_rate(recipe: dict, step: int) -> float:
    """A linear warm-up, then `lr_schedule`: "constant", or "cosine" down to lr x `lr_final` at
    `steps`. A function of the step alone, so a resumed run follows the same curve.

    Why cosine: a constant rate keeps the weights jittering around the optimum (the EMA only
    partly averages that out); decaying it at the end of a run is the usual cheap gain in loss.
    It needs `steps` to be where the run really ends, not a cap that --max-minutes cuts first."""
    lr, warmup, steps = recipe["lr"], max(1, recipe.get("warmup_steps", 0)), recipe["steps"]
    if step < warmup:
        return lr * (step + 1) / warmup
    if recipe.get("lr_schedule", "constant") == "constant":
        return lr
    final = lr * recipe.get("lr_final", 0.0)
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return final + (lr - final) * 0.5 * (1 + math.cos(math.pi * progress))


def train_loop(run: Run, t: Trainable, make_batch: Callable[[int], dict], loss_fn: Callable[[dict, int], Tensor],
               on_sample: Callable[[int], None] | None = None, desc: str = "train") -> Trainable:
    """Steps t.step..recipe.steps. make_batch(step) (CPU, in loader workers) and loss_fn(batch, step)
    draw everything random from `step`, so a resumed run repeats an uninterrupted one exactly.

    Stops early (saving) at the deadline or on SIGINT/SIGTERM; checkpoints every few minutes.
    """
    from tqdm.auto import tqdm

    r, acc = run.recipe, run.accelerator
    every = r.get("checkpoint_minutes", 5) * 60
    last_save = tick = time.time()
    pending: list[Tensor] = []  # losses still on the device: reading each one would stall the GPU

    def flush() -> None:
        if pending:
            t.losses.extend(torch.stack(pending).float().tolist())
            pending.clear()

    t.setup_seconds = tick - run.started
    bar = tqdm(total=r["steps"], initial=t.step, desc=desc, disable=not run.is_main, dynamic_ncols=True)
    with stop_on_signals() as signals:
        batches = step_batches(make_batch, t.step, r["steps"], workers=r["data"].get("loader_workers", 0),
                               device=run.device)
        for batch in batches:
            for group in t.optimizer.param_groups:
                group["lr"] = learning_rate(r, t.step) * group.get("lr_scale", 1.0)
            with acc.autocast():
                loss = loss_fn(batch, t.step)
            acc.backward(loss)
            if r.get("grad_clip"):
                acc.clip_grad_norm_(t.module.parameters(), r["grad_clip"])
            t.optimizer.step()
            t.optimizer.zero_grad(set_to_none=True)
            if t.ema is not None:
                t.ema.step(acc.unwrap_model(t.module).parameters())
            pending.append(acc.reduce(loss.detach(), reduction="mean"))
            t.step += 1
            bar.update(1)
            sample_now = on_sample and r.get("sample_every") and t.step % r["sample_every"] == 0
            if t.step % 20 == 0 or sample_now or t.step == r["steps"]:
                flush()
                now = time.time()
                t.train_seconds, tick = t.train_seconds + now - tick, now
                bar.set_postfix(loss=f"{np.mean(t.losses[-50:]):.4f}",
                                left=f"{max(0.0, run.deadline - now) / 60:.1f}m" if math.isfinite(run.deadline) else "-")
            if sample_now:
                on_sample(t.step)
                tick = time.time()  # sampling is not training time
            stop, save = _agree(run, signals["stop"] or time.time() > run.deadline,
                                time.time() - last_save > every)
            if stop:
                break
            if save:
                flush()
                save_checkpoint(run, t)
                last_save = time.time()
    flush()
    t.train_seconds += time.time() - tick
    bar.close()
    save_checkpoint(run, t)
    return t


@contextmanager
def ema_weights(run: Run, t: Trainable) -> Iterator[torch.nn.Module]:
    """The unwrapped module with its EMA weights swapped in (restored afterwards)."""
    module = run.accelerator.unwrap_model(t.module)
    if t.ema is None:
        yield module
        return
    t.ema.store(module.parameters())
    t.ema.copy_to(module.parameters())
    try:
        yield module
    finally:
        t.ema.restore(module.parameters())


def write_metrics(run: Run, metrics: dict) -> None:
    """metrics.json: the figures of a stage (assemble copies them into the model card)."""
    import json

    if run.is_main:
        metrics = {**metrics, "init_from": str(run.init_from) if run.init_from else None,
                   "minutes": round((time.time() - run.started) / 60, 2),
                   "device": torch.cuda.get_device_name() if run.device.type == "cuda" else "cpu",
                   "processes": run.accelerator.num_processes, "recipe": run.recipe}
        atomic_write_text(run.out / "metrics.json", json.dumps(metrics, indent=2) + "\n")


def loss_summary(run: Run, t: Trainable) -> dict:
    """Steps, final loss, throughput and a loss curve of at most ~500 points."""
    every = max(1, len(t.losses) // 500)
    return {"steps": t.step, "final_loss": float(np.mean(t.losses[-100:])) if t.losses else math.nan,
            "samples_per_second": round(t.step * run.recipe["batch_size"] / max(t.train_seconds, 1e-9), 1),
            "train_minutes": round(t.train_seconds / 60, 2), "setup_seconds": round(t.setup_seconds, 1),
            "loss_curve": [[i + 1, round(float(np.mean(t.losses[i : i + every])), 5)]
                           for i in range(0, len(t.losses), every)]}


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def offset_noise(shape: torch.Size, offset: float, generator: torch.Generator, device: torch.device) -> Tensor:
    """Gaussian noise plus `offset` x a per-image, per-channel constant (kohya's `noise_offset`).

    SD's schedule leaves a little signal at t = 999, and on a 16x16 latent the mean of plain noise
    varies little (std 1/16), so a model learns to read an image's mean colour off the noise
    instead of off the prompt: then the seed, not the text, picks the background. The offset
    makes that mean unreliable during training, so the prompt has to decide it."""
    noise = torch.randn(shape, generator=generator, device=device)
    if offset:
        noise = noise + offset * torch.randn((*shape[:2], 1, 1), generator=generator, device=device)
    return noise


def denoising_loss(prediction: Tensor, target: Tensor, alpha_bar: Tensor, prediction_type: str,
                   min_snr_gamma: float = 0.0, pixel_weights: Tensor | None = None,
                   sample_weights: Tensor | None = None, snr_floor: float = 0.0) -> Tensor:
    """MSE of an eps or v prediction; with `min_snr_gamma` > 0, each sample weighted by Min-SNR-γ.

    Min-SNR (Hang et al. 2023; kohya's --min_snr_gamma) caps the weight of the low-noise timesteps,
    whose easy, detail-only targets otherwise dominate the gradient, in favour of the mid-noise ones
    where layout and shape are decided: the paper reports ~3x faster convergence. In terms of the
    x0 error the weight is min(SNR, γ); for an eps target that is min(SNR, γ) / SNR, for a v target
    min(SNR, γ) / (SNR + 1). alpha_bar: (b,) of each sample's timestep.

    pixel_weights: (b, 1, h, w), each latent pixel's share of its sample's loss (normalized per
    sample, so that the balance between timesteps stays Min-SNR's). sample_weights: (b,), each
    sample's weight (kohya's prior_loss_weight on regularization images).

    snr_floor > 0: the x0 error weighs at least snr_floor (max(SNR, snr_floor), then Min-SNR's cap).
    An eps loss weighs the x0 error by SNR, ~0.005 at t = 999: next to nothing where the noise hides the
    whole layout and only the text can say where things go (a v loss weighs it by SNR + 1)."""
    squared = (prediction.float() - target.float()).pow(2)
    if pixel_weights is None:
        per_sample = squared.flatten(1).mean(1)
    else:
        weights = pixel_weights.to(squared)
        per_sample = (squared * weights).flatten(1).mean(1) / weights.flatten(1).mean(1)
    if sample_weights is not None:
        per_sample = per_sample * sample_weights.to(per_sample)
    if min_snr_gamma <= 0 and snr_floor <= 0:
        return per_sample.mean()
    alpha_bar = alpha_bar.to(per_sample.device, torch.float32)
    snr = alpha_bar / (1 - alpha_bar).clamp(min=1e-8)
    x0_weight = snr.clamp(min=snr_floor, max=min_snr_gamma if min_snr_gamma > 0 else None)
    weight = x0_weight / (snr if prediction_type == "epsilon" else snr + 1).clamp(min=1e-8)
    return (weight * per_sample).mean()
