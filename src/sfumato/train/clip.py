"""Stage 2: CLIP (text + vision towers), contrastive loss with in-batch negatives.

The text tower becomes the pipeline's text encoder (OUT/text_encoder, a CLIPTextModel, as SD1
uses it); the whole model (OUT/clip, a CLIPModel) is kept for a CLIP score. Images go into the
vision tower as (b, 3, 128, 128) in [-1, 1]; OUT/clip's preprocessor config says the same.

With a locked text tower (--lock-text: a text encoder the UNet stage tuned) only the vision tower and
the projections learn: the CLIP score then reads prompts through the pipeline's own text encoder, and
the model folder needs no second text tower (locked-text tuning, the mirror of LiT's locked image).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from sfumato.errors import SfumatoError
from sfumato.train.assemble import TEXT_PREFIX, load_saved, stage_folder
from sfumato.train.common import (
    Run,
    atomic_write_text,
    ema_weights,
    loss_summary,
    make_trainable,
    param_count,
    save_grid,
    save_pretrained_atomic,
    train_loop,
    write_metrics,
)
from sfumato.train.data import (
    EVAL_SEED_OFFSET,
    eval_captions,
    hash_seed,
    load_tokenizer,
    pixels_to_model,
    random_captions,
    render_pool,
    to_model_images,
    tokenize,
)
from sfumato.world.captions import SWAP_KINDS, swap_word

BOS, EOS = 49406, 49407  # CLIP's <|startoftext|>, <|endoftext|> (also the SD1 pad token)


def build_clip(model: dict, image_size: int):
    from transformers import CLIPConfig, CLIPModel

    text, vision = model["text"], model["vision"]
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=text["width"], intermediate_size=4 * text["width"],
                         num_hidden_layers=text["layers"], num_attention_heads=text["heads"],
                         max_position_embeddings=77, hidden_act="quick_gelu",
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS),
        vision_config=dict(hidden_size=vision["width"], intermediate_size=4 * vision["width"],
                           num_hidden_layers=vision["layers"], num_attention_heads=vision["heads"],
                           image_size=image_size, patch_size=vision["patch_size"], hidden_act="quick_gelu"),
        projection_dim=model["projection_dim"],
    )
    return CLIPModel(config)


def text_encoder_of(clip):
    """The text tower as a standalone CLIPTextModel (what the pipeline loads)."""
    from transformers import CLIPTextModel

    encoder = CLIPTextModel(clip.config.text_config)
    # transformers 5: clip.text_model is a CLIPTextModel; 4.x: both hold a CLIPTextTransformer.
    getattr(encoder, "text_model", encoder).load_state_dict(clip.text_model.state_dict())
    return encoder.eval()


@torch.no_grad()
def similarity(clip, images: Tensor, input_ids: Tensor) -> Tensor:
    """(images, captions) cosine similarities of the projected embeddings."""
    image = torch.nn.functional.normalize(as_features(clip.get_image_features(pixel_values=images)), dim=-1)
    text = torch.nn.functional.normalize(as_features(clip.get_text_features(input_ids=input_ids)), dim=-1)
    return image @ text.T


def as_features(output) -> Tensor:
    # transformers 5 may return a model output instead of a tensor from get_*_features
    return output if isinstance(output, Tensor) else output.pooler_output


@torch.no_grad()
def retrieval_top1(clip, images: Tensor, input_ids: Tensor, group: int) -> float:
    """Image -> caption top-1 accuracy, each image against the captions of its group of `group`."""
    hits, total = 0, 0
    for start in range(0, len(images) - group + 1, group):
        sims = similarity(clip, images[start : start + group], input_ids[start : start + group])
        hits += int((sims.argmax(1) == torch.arange(len(sims), device=sims.device)).sum())
        total += len(sims)
    return hits / max(total, 1)


DEFAULT_HARD_NEGATIVES = ("shape", "colour")  # `hard_negatives = true`, as the shipped CLIP was trained


def hard_negative(caption: str, rng: random.Random, kinds: Sequence[str] = DEFAULT_HARD_NEGATIVES) -> str | None:
    """The caption with a word of the first of `kinds` (SWAP_KINDS) it has swapped; None if it has none."""
    return next((s for kind in kinds if (s := swap_word(caption, SWAP_KINDS[kind], rng))), None)


def hard_negative_kinds(setting: bool | list[str]) -> tuple[str, ...]:
    """The recipe's `hard_negatives`: false, true (shape else colour) or SWAP_KINDS names, the first a
    caption has swapped (a list that starts with "relation" swaps every relation caption's relation)."""
    if setting is True:
        return DEFAULT_HARD_NEGATIVES
    kinds = tuple(setting or ())
    if unknown := [k for k in kinds if k not in SWAP_KINDS]:
        raise SfumatoError(f"recipe: hard_negatives {', '.join(map(repr, unknown))}: allowed true, false or a list "
                           f"of {', '.join(SWAP_KINDS)}")
    return kinds


@torch.no_grad()
def swap_choice(clip, images: Tensor, captions: list[str], words, tokenizer) -> float:
    """How often CLIP scores an image's caption above the same caption with one of `words` swapped
    for another (0.5: it cannot tell them apart), over the captions that have such a word."""
    rng = random.Random(0)
    pairs = [(i, swapped) for i, c in enumerate(captions) if (swapped := swap_word(c, words, rng))]
    if not pairs:
        return float("nan")
    rows = torch.tensor([i for i, _ in pairs])
    ids = tokenize(tokenizer, [captions[i] for i, _ in pairs]).to(images.device)
    wrong = tokenize(tokenizer, [c for _, c in pairs]).to(images.device)
    right_sims = similarity(clip, images[rows], ids).diagonal()
    wrong_sims = similarity(clip, images[rows], wrong).diagonal()
    return (right_sims > wrong_sims).float().mean().item()


def lock_text_tower(clip, folder: Path) -> None:
    """Load folder/text_encoder into the CLIP's text tower and freeze it."""
    from safetensors.torch import load_file

    path = stage_folder(folder, "text_encoder") / "model.safetensors"  # a clear error if there is none
    weights = {k.removeprefix(TEXT_PREFIX): v.float() for k, v in load_file(path).items()}
    try:
        clip.text_model.load_state_dict(weights)
    except RuntimeError as e:  # missing keys or other shapes: another architecture
        raise SfumatoError(f"--lock-text {folder}: its text encoder is not this recipe's text tower "
                           f"({str(e).splitlines()[0]})") from None
    clip.text_model.requires_grad_(False)


def train_clip(run: Run, lock_text: Path | None = None) -> dict:
    r, data = run.recipe, run.recipe["data"]
    hard_negatives = hard_negative_kinds(r.get("hard_negatives", False))  # a typo fails before the pool
    tokenizer = load_tokenizer()
    clip = build_clip(r["model"], data["size"])
    if run.init_from:
        load_saved(clip, run.init_from, "clip")
    if lock_text is not None:  # before the pool: a wrong folder fails in seconds, not after rendering
        lock_text_tower(clip, lock_text)
    pool, scenes = render_pool(run.seed, data["train_scenes"], "train", data["size"], data.get("workers", 0))
    t = make_trainable(run, clip)  # after loading: the EMA starts from those weights

    def make_batch(step: int) -> dict:
        index = run.shard(run.numpy_rng(step).integers(0, len(pool), r["batch_size"]))
        captions = random_captions([scenes[i] for i in index], run.seed, step, run.accelerator.process_index)
        batch = {"pixels": torch.from_numpy(pool[index]), "ids": tokenize(tokenizer, captions)}
        if hard_negatives:
            rng = random.Random(hash_seed(run.seed, step, run.accelerator.process_index, 1))
            batch["hard_ids"] = tokenize(tokenizer, [hard_negative(c, rng, hard_negatives) or captions[i - 1]
                                                     for i, c in enumerate(captions)])
        return batch

    def loss_fn(batch: dict, step: int) -> Tensor:
        pixels = pixels_to_model(batch["pixels"])
        if not hard_negatives:
            return t.module(input_ids=batch["ids"], pixel_values=pixels, return_loss=True).loss
        # Each image also against its own caption with a word swapped (a shape, else a colour, by
        # default): in-batch negatives alone are told apart by colour, and CLIP then never learns
        # shapes (session 13), nor relations or numbers (session 27).
        logits = t.module(input_ids=torch.cat([batch["ids"], batch["hard_ids"]]), pixel_values=pixels).logits_per_image
        targets = torch.arange(len(pixels), device=logits.device)
        square = logits[:, : len(pixels)]
        return (F.cross_entropy(logits, targets) + F.cross_entropy(square.T, targets)) / 2

    evals = {}
    for split in ("train", "heldout"):  # unseen scenes; "heldout": unseen shape/colour pairs too
        eval_pool, eval_scenes = render_pool(run.seed + EVAL_SEED_OFFSET, data["eval_scenes"], split, data["size"])
        captions = eval_captions(eval_scenes, run.seed)
        evals[split] = (to_model_images(eval_pool, run.device), tokenize(tokenizer, captions).to(run.device),
                        captions)

    def on_sample(step: int) -> None:
        # The similarity matrix of 16 held-out pairs as a picture: a bright diagonal is good.
        if run.is_main:
            images, ids, _ = evals["train"]
            with ema_weights(run, t) as module:
                sims = similarity(module.eval(), images[:16], ids[:16]).float()
                module.train()
            picture = sims.repeat_interleave(8, 0).repeat_interleave(8, 1)
            save_grid(picture.mul(2).sub(1).expand(1, 3, -1, -1), run.out / "samples" / f"clip_{step:07d}.png")

    train_loop(run, t, make_batch, loss_fn, on_sample, desc="clip")
    on_sample(t.step)
    group = data.get("retrieval_candidates", 32)
    with ema_weights(run, t) as module:
        clip = module.eval()
        metrics = {"stage": "clip", "params": param_count(clip), "text_locked_to": str(lock_text) if lock_text else None,
                   "text_encoder_params": param_count(clip.text_model), **loss_summary(run, t),
                   "retrieval_candidates": group, "chance": round(1 / group, 4),
                   "logit_scale": float(clip.logit_scale.detach().exp())}
        for split, (images, ids, captions) in evals.items():
            metrics[f"retrieval_top1_{split}"] = round(retrieval_top1(clip, images, ids, group), 4)
            for kind, words in SWAP_KINDS.items():
                metrics[f"{kind}_swap_choice_{split}"] = round(
                    swap_choice(clip, images, captions, words, tokenizer), 4)
        if run.is_main:
            save_clip(clip, run)
        clip.train()
    write_metrics(run, metrics)
    return metrics


def save_clip(clip, run: Run) -> None:
    save_pretrained_atomic(clip, run.out / "clip")
    size = run.recipe["data"]["size"]
    # CLIPImageProcessor settings for how the vision tower was trained: [0, 1] -> [-1, 1], no resize
    # beyond the training size. Written as JSON: building the processor wants torchvision.
    processor = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
                 "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size},
                 "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                 "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "do_convert_rgb": True}
    atomic_write_text(run.out / "clip" / "preprocessor_config.json", json.dumps(processor, indent=2) + "\n")
    save_pretrained_atomic(text_encoder_of(clip), run.out / "text_encoder")
