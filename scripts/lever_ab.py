"""Two sets of speed levers, one process, images alternating: the fairest A/B on a noisy machine.

    python scripts/lever_ab.py "" compile               # default levers against --lever compile
    python scripts/lever_ab.py "" deepcache --runs 10 --model ~/models/sd15.safetensors --size 512
    python scripts/lever_ab.py "" tome --unet-call --runs 3 --model SD15.safetensors --size 768

`sfumato bench speed` starts a process per run (it also measures loading and memory), which puts a
compiling lever's minute of compiling into every run and spreads the runs over minutes of this
machine's drifting speed. Here each set's first image (compiling, caches) is untimed and the sets
take turns, so drift hits both alike. Levers are "+"-joined names; "" is the defaults. With
--unet-call it times one guided UNet call (cond + uncond: a sampling step's work) instead of whole
images, which on SD-sized models at large sizes saves many minutes; levers that act across steps
(deepcache) show only in whole images.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import sfumato  # noqa: F401  # isort: skip  (before torch: it makes idle OpenMP threads sleep)
import torch

from sfumato.accel import Levers, compute_context
from sfumato.denoiser import cfg_denoiser
from sfumato.pipeline import Pipeline
from sfumato.speed import NEGATIVE, PROMPT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("levers", nargs=2, help='two "+"-joined lever sets, "" for the defaults')
    parser.add_argument("--model", default=None, help="default: the built-in model")
    parser.add_argument("--size", type=int, default=0, help="0: the model's own size")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--unet-call", action="store_true", help="time one guided UNet call, not images")
    args = parser.parse_args()
    pipes = {name or "default": Pipeline.load(args.model, device="cpu",
                                              levers=Levers.parse([n for n in name.split("+") if n]))
             for name in args.levers}
    size = args.size or next(iter(pipes.values())).model.default_size
    params = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": 1, "steps": args.steps, "cfg_scale": 7.0,
              "width": size, "height": size, "sampler": "Euler", "scheduler": "karras"}
    unit = "UNet call" if args.unet_call else "image"
    work = {name: one_unet_call(pipe, size) if args.unet_call else (lambda pipe=pipe: pipe.generate(**params))
            for name, pipe in pipes.items()}
    for name, run in work.items():
        start = time.perf_counter()
        run()
        print(f"{name}: first {unit} {time.perf_counter() - start:.1f} s (untimed)", flush=True)
    times: dict[str, list[float]] = {name: [] for name in pipes}
    for _ in range(args.runs):
        for name, run in work.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    for name, seconds in times.items():
        print(f"{name}: median {statistics.median(seconds):.3f} s/{unit} over {args.runs} "
              f"({min(seconds):.2f}-{max(seconds):.2f})")


def one_unet_call(pipe: Pipeline, size: int) -> Callable[[], object]:
    """A sampling step's UNet work at CFG 7, on fixed noise at sigma 1."""
    cond, uncond = pipe.condition([PROMPT, NEGATIVE], 1, size, size, clip_skip=1)
    denoise = cfg_denoiser(pipe.unet, cond, uncond, 7.0)
    channels = pipe.model.unet.config.in_channels
    x = torch.randn(1, channels, size // 8, size // 8, generator=torch.Generator().manual_seed(0))

    def run() -> object:
        with compute_context(pipe.levers, pipe.device, pipe.one_thread):
            return denoise(x, torch.ones(1))

    return run


if __name__ == "__main__":
    main()
