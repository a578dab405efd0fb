"""The generation parameters: one validated object shared by the CLI, the API and the server."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

from sfumato.errors import ParamError

# A1111's names; the sampling module implements each of them.
SAMPLER_NAMES = ("Euler", "Euler a", "DDIM", "DPM++ 2M", "DPM++ 2M SDE", "UniPC", "LCM")
SCHEDULE_NAMES = ("normal", "karras")

MAX_SEED = 2**32 - 1  # A1111 seeds are 32-bit
MAX_TOME_RATIO = 0.9  # A1111's slider ends here; at 1 tomesd would merge every token away


@dataclass(frozen=True)
class GenerationParams:
    prompt: str
    negative_prompt: str = ""
    seed: int = -1  # -1: pick one at random; the seed used is reported
    steps: int = 20
    cfg_scale: float = 7.0  # 1 disables classifier-free guidance (and its second UNet pass)
    width: int = 0  # 0: the model's native size
    height: int = 0
    sampler: str = "DPM++ 2M"
    scheduler: str = "karras"
    batch_size: int = 1
    clip_skip: int = 1  # 1 = last CLIP layer, 2 = penultimate (A1111 semantics)
    denoising_strength: float = 0.75  # img2img only: how much of the init image is re-noised
    loras: tuple[tuple[str, float, float], ...] = field(default=())  # (name/path, te weight, unet weight)
    # A1111's "Token merging ratio" (0 = off); None: the pipeline's tome lever decides
    token_merging_ratio: float | None = None

    def validated(self) -> GenerationParams:
        """Return a copy with names normalised; raise ParamError on anything out of range."""
        _check(isinstance(self.prompt, str), "prompt", "must be text")
        _check(isinstance(self.negative_prompt, str), "negative_prompt", "must be text")
        _check_int(self.seed, "seed", -1, MAX_SEED)
        _check_int(self.steps, "steps", 1, 150)
        _check_number(self.cfg_scale, "cfg_scale", 0.0, 30.0)
        for name in ("width", "height"):
            value = getattr(self, name)
            _check_int(value, name, 0, 4096)
            _check(value % 8 == 0, name, f"must be a multiple of 8 (got {value}); 0 = model default")
            _check(value == 0 or value >= 64, name, f"must be at least 64 (got {value})")
        _check_int(self.batch_size, "batch_size", 1, 64)
        _check_int(self.clip_skip, "clip_skip", 1, 12)
        _check_number(self.denoising_strength, "denoising_strength", 0.0, 1.0)
        for lora in self.loras:
            _check(len(lora) == 3, "loras", "each entry is (name, te_weight, unet_weight)")
        ratio = None if self.token_merging_ratio is None else tome_ratio(self.token_merging_ratio)
        return dataclasses.replace(
            self,
            sampler=canonical_sampler(self.sampler),
            scheduler=canonical_scheduler(self.scheduler),
            cfg_scale=float(self.cfg_scale),
            denoising_strength=float(self.denoising_strength),
            token_merging_ratio=ratio,
        )

    def with_seed(self) -> GenerationParams:
        """Resolve seed -1 to a concrete random seed, so that the image can be made again."""
        if self.seed != -1:
            return self
        return dataclasses.replace(self, seed=random.SystemRandom().randrange(MAX_SEED))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> GenerationParams:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ParamError(f"unknown parameter(s) {unknown}; allowed: {sorted(known)}")
        values = dict(data)
        if "loras" in values:
            values["loras"] = tuple(tuple(x) for x in values["loras"])
        return cls(**values)


def canonical_sampler(name: str) -> str:
    """Match a sampler name case-insensitively ('dpm++ 2m' -> 'DPM++ 2M')."""
    by_key = {s.lower().replace("_", " "): s for s in SAMPLER_NAMES}
    key = " ".join(str(name).replace("_", " ").split()).lower()
    if key.endswith(" karras") and key[: -len(" karras")] in by_key:  # A1111 < 1.9 style names
        key = key[: -len(" karras")]
    if key not in by_key:
        raise ParamError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLER_NAMES)}")
    return by_key[key]


def canonical_scheduler(name: str) -> str:
    key = str(name).strip().lower()
    if key == "automatic":  # A1111's default: Karras for the DPM++ family
        key = "karras"
    if key not in SCHEDULE_NAMES:
        raise ParamError(f"unknown schedule {name!r}; allowed: {', '.join(SCHEDULE_NAMES)}")
    return key


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ParamError(f"{name} {message}")


def _check_int(value: object, name: str, low: int, high: int) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool), name, f"must be an integer (got {value!r})")
    _check(low <= value <= high, name, f"must be between {low} and {high} (got {value})")  # type: ignore[operator]


def tome_ratio(value: object, name: str = "token_merging_ratio") -> float:
    """A token merging ratio, checked (the one check for the API, the options and `--lever tome=R`)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= MAX_TOME_RATIO
    if not ok:
        raise ParamError(f"{name} {value!r}: must be a number from 0 (off) to {MAX_TOME_RATIO:g}")
    return float(value)


def _check_number(value: object, name: str, low: float, high: float) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    _check(ok, name, f"must be a number (got {value!r})")
    _check(low <= value <= high, name, f"must be between {low} and {high} (got {value})")  # type: ignore[operator]
