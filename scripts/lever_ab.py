"""Two sets of speed levers, one process, images alternating: the fairest A/B on a noisy machine.

    python scripts/lever_ab.py "" compile               # default levers against --lever compile
    python scripts/lever_ab.py "" deepcache --runs 10 --model ~/models/sd15.safetensors --size 512

`sfumato bench speed` starts a process per run (it also measures loading and memory), which puts a
compiling lever's minute of compiling into every run and spreads the runs over minutes of this
machine's drifting speed. Here each set's first image (compiling, caches) is untimed and the sets
take turns, so drift hits both alike. Levers are "+"-joined names; "" is the defaults.
"""

from __future__ import annotations

import argparse
import statistics
import time

from sfumato.accel import Levers
from sfumato.pipeline import Pipeline
from sfumato.speed import NEGATIVE, PROMPT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("levers", nargs=2, help='two "+"-joined lever sets, "" for the defaults')
    parser.add_argument("--model", default=None, help="default: the built-in model")
    parser.add_argument("--size", type=int, default=0, help="0: the model's own size")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    pipes = {name or "default": Pipeline.load(args.model, device="cpu",
                                              levers=Levers.parse([n for n in name.split("+") if n]))
             for name in args.levers}
    size = args.size or next(iter(pipes.values())).model.default_size
    params = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": 1, "steps": args.steps, "cfg_scale": 7.0,
              "width": size, "height": size, "sampler": "Euler", "scheduler": "karras"}
    for name, pipe in pipes.items():
        start = time.perf_counter()
        pipe.generate(**params)
        print(f"{name}: first image {time.perf_counter() - start:.1f} s (untimed)", flush=True)
    times: dict[str, list[float]] = {name: [] for name in pipes}
    for _ in range(args.runs):
        for name, pipe in pipes.items():
            start = time.perf_counter()
            pipe.generate(**params)
            times[name].append(time.perf_counter() - start)
    for name, seconds in times.items():
        print(f"{name}: median {statistics.median(seconds):.3f} s/image over {args.runs} "
              f"({min(seconds):.2f}-{max(seconds):.2f})")


if __name__ == "__main__":
    main()
