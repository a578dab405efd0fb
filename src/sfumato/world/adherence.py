"""Prompt adherence on the shapes world (GenEval's method): generate, analyze, score.

    report = run_adherence(pipe, read_suite(), images_per_prompt=4, cfg=7.0, steps=20)
    print(format_table(report))

Every prompt of the suite gets N images (seeds seed..seed+N-1, one batch). The analyzer judges
each claim the prompt makes; an image is correct only when ALL its claims hold. A category's
score is the mean over its images, the overall score the mean over categories, leaving out
"concept" (taught by a LoRA later, never seen by base training; reported on its own row). Beside
it, each image's CLIP score against its prompt (world.clip_score), averaged the same way.
"""

from __future__ import annotations

import json
import math
import textwrap
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click

from sfumato.commands import user_errors
from sfumato.errors import SfumatoError
from sfumato.files import write_bytes_atomic
from sfumato.world.captions import Claim
from sfumato.world.suite import (
    EXCLUDED_FROM_OVERALL,
    SUITE_VERSION,
    SuitePrompt,
    read_suite,
)

if TYPE_CHECKING:
    from PIL import Image

    from sfumato.pipeline import Pipeline

THUMB = 96  # contact-sheet cell size in pixels
SAMPLES_PER_CATEGORY = 2  # prompts per category (and cfg) shown on the contact sheet


@dataclass
class ImageResult:
    prompt_id: str
    category: str
    cfg: float
    seed: int
    claims: dict[Claim, bool]
    clip_score: float | None = None

    @property
    def correct(self) -> bool:
        return image_correct(self.claims)


@dataclass
class Sample:
    """Images of one prompt at one cfg, kept (as thumbnails) for the contact sheet."""

    prompt: SuitePrompt
    cfg: float
    images: list[tuple[Image.Image, bool]]


@dataclass
class Report:
    suite_version: str
    model: dict[str, str]
    params: dict
    prompts: dict[str, SuitePrompt]
    results: list[ImageResult]
    elapsed_s: float
    samples: list[Sample] = field(default_factory=list)

    @property
    def cfgs(self) -> list[float]:
        return list(dict.fromkeys(r.cfg for r in self.results))

    def scores(self, cfg: float | None = None) -> dict[str, float]:
        """Category -> share of correct images (at one cfg; None: the first one)."""
        cfg = self.cfgs[0] if cfg is None else cfg
        return category_scores(r for r in self.results if r.cfg == cfg)

    def overall(self, cfg: float | None = None) -> float:
        return overall_score(self.scores(cfg))

    def clip_scores(self, cfg: float | None = None) -> dict[str, float]:
        """Category -> mean CLIP score of its images (empty where none was computed)."""
        cfg = self.cfgs[0] if cfg is None else cfg
        return category_means((r.category, r.clip_score) for r in self.results
                              if r.cfg == cfg and r.clip_score is not None)

    def to_dict(self) -> dict:
        return {
            "suite_version": self.suite_version,
            "model": self.model,
            "params": self.params,
            "elapsed_s": round(self.elapsed_s, 2),
            "excluded_from_overall": list(EXCLUDED_FROM_OVERALL),
            "scores": {f"{c:g}": {"categories": self.scores(c), "overall": _finite(self.overall(c)),
                                  "clip_score": {"categories": self.clip_scores(c),
                                                 "overall": _finite(overall_score(self.clip_scores(c)))}}
                       for c in self.cfgs},
            "images": [_result_dict(r, self.prompts[r.prompt_id]) for r in self.results],
        }


# ----------------------------------------------------------------------------- scoring

def image_correct(claims: Mapping[object, bool]) -> bool:
    """GenEval's rule: an image counts only when every claim of its prompt holds."""
    return bool(claims) and all(claims.values())


def claim_report(claim_sets: Iterable[Mapping[Claim, bool]]) -> str:
    """One line for a set of analysed images: the share passing every claim, and the share of each
    kind of claim that failed (what the measuring scripts in scripts/ print)."""
    held: dict[str, int] = {}
    lost: dict[str, int] = {}
    passed = images = 0
    for claims in claim_sets:
        images += 1
        passed += image_correct(claims)
        for claim, ok in claims.items():
            held[claim.kind] = held.get(claim.kind, 0) + 1
            lost[claim.kind] = lost.get(claim.kind, 0) + (not ok)
    kinds = ", ".join(f"{kind} {lost[kind] / held[kind]:.2f}" for kind in sorted(held))
    return f"{passed / max(images, 1):.3f} of {images} pass every claim; claims failed by kind: {kinds}"


def category_scores(results: Iterable[ImageResult]) -> dict[str, float]:
    return category_means((r.category, float(r.correct)) for r in results)


def category_means(values: Iterable[tuple[str, float]]) -> dict[str, float]:
    totals: dict[str, list[float]] = {}
    for category, value in values:
        counts = totals.setdefault(category, [0.0, 0])
        counts[0] += value
        counts[1] += 1
    return {category: total / n for category, (total, n) in totals.items()}


def overall_score(scores: Mapping[str, float]) -> float:
    """Mean over categories (each weighs the same, whatever its size), concept left out."""
    kept = [s for category, s in scores.items() if category not in EXCLUDED_FROM_OVERALL]
    return sum(kept) / len(kept) if kept else math.nan


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 4)


def _result_dict(result: ImageResult, prompt: SuitePrompt) -> dict:
    return {"id": result.prompt_id, "category": result.category, "prompt": prompt.prompt,
            "negative_prompt": prompt.negative_prompt, "cfg": result.cfg, "seed": result.seed,
            "correct": result.correct, "clip_score": None if result.clip_score is None else round(result.clip_score, 3),
            "claims": [{"kind": c.kind, "text": c.text, "holds": bool(h)} for c, h in result.claims.items()]}


# ----------------------------------------------------------------------------- running

def select_prompts(prompts: Sequence[SuitePrompt], categories: Sequence[str] | None = None,
                   limit: int | None = None) -> list[SuitePrompt]:
    """The prompts of these categories (None: all), at most `limit` per category."""
    known = list(dict.fromkeys(p.category for p in prompts))
    unknown = sorted(set(categories or ()) - set(known))
    if unknown:
        raise SfumatoError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {unknown}; "
                           f"this suite has: {', '.join(known)}")
    taken: dict[str, int] = {}
    chosen = []
    for prompt in prompts:
        if categories and prompt.category not in categories:
            continue
        if limit is None or taken.get(prompt.category, 0) < limit:
            taken[prompt.category] = taken.get(prompt.category, 0) + 1
            chosen.append(prompt)
    return chosen


def run_adherence(pipe: Pipeline, suite: Sequence[SuitePrompt], *, images_per_prompt: int = 4,
                  cfg: float | Sequence[float] = 7.0, sampler: str = "DPM++ 2M",
                  scheduler: str = "karras", steps: int = 20, seed: int = 0,
                  batch: int | None = None, suite_version: str = SUITE_VERSION,
                  clip_scorer: Callable[[list, str], list[float]] | None = None, progress: bool = True) -> Report:
    """Generate and judge N images per prompt for each cfg value; `batch` caps the images of
    one generate call (default: all N at once). Image i of a prompt always has seed seed+i.
    clip_scorer(images, prompt): a CLIP score per image (world.clip_score.ClipScorer), or None."""
    from tqdm import tqdm

    from sfumato.params import GenerationParams
    from sfumato.world.analyzer import analyze

    cfgs = [float(c) for c in (cfg if isinstance(cfg, Sequence) else [cfg])]
    if images_per_prompt < 1:
        raise SfumatoError(f"images per prompt must be at least 1 (got {images_per_prompt})")
    batch = batch or images_per_prompt
    sampled = {p.id for p in select_prompts(suite, limit=SAMPLES_PER_CATEGORY)}
    results, samples = [], []
    start = time.perf_counter()
    with tqdm(total=len(suite) * len(cfgs), unit="prompt", desc="adherence", disable=not progress) as bar:
        for scale in cfgs:
            for prompt in suite:
                images = []
                for first in range(0, images_per_prompt, batch):
                    params = GenerationParams(prompt.prompt, prompt.negative_prompt, seed=seed + first,
                                              steps=steps, cfg_scale=scale, sampler=sampler,
                                              scheduler=scheduler,
                                              batch_size=min(batch, images_per_prompt - first))
                    images += pipe.generate(params)
                judged = [(g, analyze(g.image, prompt.expectation)) for g in images]
                clip = clip_scorer([g.image for g in images], prompt.prompt) if clip_scorer else [None] * len(images)
                results += [ImageResult(prompt.id, prompt.category, scale, g.seed, claims, c)
                            for (g, claims), c in zip(judged, clip, strict=True)]
                if prompt.id in sampled:
                    samples.append(Sample(prompt, scale, [(_thumbnail(g.image), image_correct(c))
                                                          for g, c in judged]))
                bar.update()
    model = {"name": pipe.model.name, "hash": pipe.model.hash, "path": str(pipe.model.path)}
    params = {"images_per_prompt": images_per_prompt, "cfg": cfgs, "sampler": sampler,
              "scheduler": scheduler, "steps": steps, "seed": seed, "batch": batch,
              "prompts": len(suite), "clip_score": clip_scorer is not None}
    return Report(suite_version, model, params, {p.id: p for p in suite}, results,
                  time.perf_counter() - start, samples)


def _thumbnail(image: Image.Image) -> Image.Image:
    from PIL import Image

    return image.convert("RGB").resize((THUMB, THUMB), Image.Resampling.LANCZOS)


# ----------------------------------------------------------------------------- output

def format_table(report: Report) -> str:
    """One row per category (single cfg), or one row per cfg with categories as columns."""
    categories = list(dict.fromkeys(r.category for r in report.results))
    scored = [c for c in categories if c not in EXCLUDED_FROM_OVERALL]
    excluded = [c for c in categories if c in EXCLUDED_FROM_OVERALL]
    has_clip = any(r.clip_score is not None for r in report.results)
    if len(report.cfgs) == 1:
        counts = {c: sum(r.category == c for r in report.results) for c in categories}
        width = max(len(c) for c in [*categories, "overall (GenEval)"]) + 2
        scores, clip = report.scores(), report.clip_scores()
        clip_cells = {c: f"{v:>7.1f}" for c, v in clip.items()}  # empty without CLIP scores
        lines = [f"{'category':<{width}}{'score':>7}{'images':>8}" + ("   clip" if has_clip else "")]
        lines += [f"{c:<{width}}{scores[c]:>7.3f}{counts[c]:>8}{clip_cells.get(c, '')}" for c in scored]
        lines.append(f"{'overall (GenEval)':<{width}}{report.overall():>7.3f}"
                     + (f"{'':>8}{overall_score(clip):>7.1f}" if has_clip else ""))
        lines += [f"{c + ' (excluded)':<{width}}{scores[c]:>7.3f}{counts[c]:>8}{clip_cells.get(c, '')}"
                  for c in excluded]
        return "\n".join(lines)
    columns = [*scored, "overall", *excluded]
    header = "cfg".rjust(6) + "".join(f"  {c:>{max(len(c), 5)}}" for c in columns) + ("   clip" if has_clip else "")
    rows = [header]
    for cfg in report.cfgs:
        values = {**report.scores(cfg), "overall": report.overall(cfg)}
        rows.append(f"{cfg:>6g}" + "".join(f"  {values.get(c, math.nan):>{max(len(c), 5)}.3f}" for c in columns)
                    + (f"  {overall_score(report.clip_scores(cfg)):>5.1f}" if has_clip else ""))
    return "\n".join(rows)


def contact_sheet(samples: Sequence[Sample], label_width: int = 240) -> Image.Image:
    """One row per sample: the prompt on the left, then its images, each marked ✓ or ✗."""
    from PIL import Image, ImageDraw

    columns = max((len(s.images) for s in samples), default=1)
    sheet = Image.new("RGB", (label_width + columns * (THUMB + 4), max(len(samples), 1) * (THUMB + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, sample in enumerate(samples):
        top = row * (THUMB + 4) + 2
        text = f"{sample.prompt.id}  cfg {sample.cfg:g}\n" + "\n".join(
            textwrap.wrap(sample.prompt.prompt, width=label_width // 6 - 1)[:4])
        if sample.prompt.negative_prompt:
            text += f"\nnegative: {sample.prompt.negative_prompt}"[: label_width // 6]
        draw.multiline_text((4, top + 2), text, fill="black", spacing=2)
        for col, (image, correct) in enumerate(sample.images):
            left = label_width + col * (THUMB + 4)
            sheet.paste(image, (left, top))
            draw_mark(draw, left + THUMB - 24, top + 2, 22, correct)
    return sheet


def draw_mark(draw, left: int, top: int, size: int, correct: bool) -> None:
    """A green check or a red cross on a white disc, drawn as lines (no font needed)."""
    draw.ellipse((left, top, left + size, top + size), fill="white", outline="black")
    def at(u: float, v: float) -> tuple[float, float]:
        return left + u * size, top + v * size
    if correct:
        draw.line([at(0.22, 0.52), at(0.42, 0.72), at(0.78, 0.3)], fill=(0, 150, 0), width=3)
    else:
        draw.line([at(0.28, 0.28), at(0.72, 0.72)], fill=(210, 0, 0), width=3)
        draw.line([at(0.28, 0.72), at(0.72, 0.28)], fill=(210, 0, 0), width=3)


def write_report(report: Report, out: Path) -> tuple[Path, Path]:
    """adherence.json (every image's claims) and adherence.png (the contact sheet) in `out`."""
    import io

    json_path = write_bytes_atomic(out / "adherence.json", json.dumps(report.to_dict(), indent=1).encode())
    buffer = io.BytesIO()
    contact_sheet(report.samples).save(buffer, format="PNG")
    return json_path, write_bytes_atomic(out / "adherence.png", buffer.getvalue())


# ----------------------------------------------------------------------------- command

def parse_cfg_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SfumatoError(f"--cfg {text!r}: give a number or a comma-separated list (e.g. 1,3,7,11)") from None
    if not values:
        raise SfumatoError("--cfg: give at least one value")
    return values


@click.command("adherence")
@click.option("--model", "-m", help="Checkpoint or diffusers folder; default: built-in.")
@click.option("--sampler", default="DPM++ 2M", show_default=True)
@click.option("--scheduler", "--schedule", "scheduler", default="karras", show_default=True)
@click.option("--steps", type=click.IntRange(1, 150), default=20, show_default=True)
@click.option("--cfg", "cfg_text", default="7", show_default=True, help="A value, or a sweep: 1,3,7,11.")
@click.option("--images-per-prompt", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--batch", type=click.IntRange(1, 64), help="Images per generate call; default: all of a prompt's.")
@click.option("--suite", "suite_path", type=click.Path(dir_okay=False),
              help="A JSONL suite (or scene specs); default: the built-in v1.")
@click.option("--categories", help="Comma-separated categories; default: all.")
@click.option("--limit", type=click.IntRange(1), help="At most N prompts per category.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", default="outputs/adherence", show_default=True, type=click.Path(file_okay=False))
@click.option("--device", help="cpu | cuda | cuda:N | mps; default: best available.")
@click.option("--clip-score/--no-clip-score", default=True, show_default=True,
              help="Also score each image against its prompt with the built-in model's CLIP.")
@user_errors
def adherence_command(model, sampler, scheduler, steps, cfg_text, images_per_prompt, batch,
                      suite_path, categories, limit, seed, out, device, clip_score) -> None:
    """Prompt adherence (GenEval-style) on the shapes world: table, JSON report, contact sheet."""
    from sfumato.params import canonical_sampler, canonical_scheduler

    cfgs = parse_cfg_list(cfg_text)
    sampler, scheduler = canonical_sampler(sampler), canonical_scheduler(scheduler)
    wanted = [c.strip() for c in categories.split(",") if c.strip()] if categories else None
    suite = select_prompts(read_suite(suite_path), wanted, limit)
    version = SUITE_VERSION if suite_path is None else f"custom:{Path(suite_path).name}"

    import sfumato

    pipe = sfumato.load(model, device=device)
    click.echo(f"model {pipe.model.name} [{pipe.model.hash}]  suite {version}  {len(suite)} prompts x "
               f"{images_per_prompt} images  {sampler} {scheduler} {steps} steps")
    scorer = None
    if clip_score:
        from sfumato.world.clip_score import ClipScorer

        scorer = ClipScorer()
    report = run_adherence(pipe, suite, images_per_prompt=images_per_prompt, cfg=cfgs, sampler=sampler,
                           scheduler=scheduler, steps=steps, seed=seed, batch=batch, suite_version=version,
                           clip_scorer=scorer)
    click.echo(format_table(report))
    json_path, sheet_path = write_report(report, Path(out))
    images = len(report.results)
    click.echo(f"elapsed {report.elapsed_s:.1f} s ({images / report.elapsed_s:.1f} images/s)")
    click.echo(f"wrote {json_path} and {sheet_path}")
