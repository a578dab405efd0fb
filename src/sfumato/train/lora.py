"""`sfumato train lora`: teach a model a concept from a folder of captioned images.

Options and output follow kohya's sd-scripts (train_network.py), so the file works wherever
kohya LoRAs do (A1111, ComfyUI, diffusers). Adapters are peft LoRA layers on the UNet's
attention projections (and optionally feed-forward / resnet convs, and the text encoder); the
objective is Stable Diffusion's own: predict the noise (or v) added at a uniform timestep.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import click
import torch
from torch import Tensor, nn

from sfumato.commands import user_errors
from sfumato.errors import LoraError
from sfumato.files import write_bytes_atomic
from sfumato.lora_formats import canonical_path, name_tokens
from sfumato.train.common import denoising_loss, offset_noise
from sfumato.train.lora_data import Example, collect_examples, epoch_batches, load_pixels
from sfumato.train.lora_export import (
    BASE_MODEL_VERSION,
    kohya_metadata,
    save_lora,
)

TARGETS = {  # module-name endings per target group
    "attn": ("to_q", "to_k", "to_v", "to_out.0"),
    "ff": ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"),
    "conv": ("conv1", "conv2", "conv_shortcut"),  # resnet convs: kohya's LoCon
    # how the UNet reads the text, and nothing else (Custom Diffusion's choice, Kumari et al. 2023): a
    # prompt without the concept reads as before, so such LoRAs mix with less interference
    "cross": ("attn2.to_k", "attn2.to_v"),
}
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
REG_TARGETS = ("noise", "model")  # what regularization images learn (TrainConfig.reg_target)
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
WORD_PARAM = "trainable_tokens_delta"  # peft's name for a learned word's token vectors


@dataclass
class TrainConfig:
    images: Path
    out: Path
    caption: str | None = None        # one caption for every image, instead of .txt files
    trigger: str | None = None        # prepended to every caption
    reg_images: Path | None = None    # regularization images (kohya's reg_data_dir), with .txt captions
    reg_caption: str | None = None    # one caption for every regularization image
    prior_loss_weight: float = 1.0    # kohya's: the regularization images' share of the loss
    reg_target: str = "noise"         # regularization images learn the noise (kohya) or the base model's prediction
    reg_caption_dropout: float = 0.0  # share of regularization captions replaced by "" (holds the unconditional)
    rank: int = 8
    alpha: float | None = None        # None: alpha = rank (scale 1)
    lr: float = 1e-4
    te_lr: float | None = None        # None: same as lr
    words: tuple[str, ...] = ()       # words whose token vectors are learned, bundled in the file (bundle_emb)
    word_lr: float | None = None      # None: same as lr
    train_text_encoder: bool = False
    steps: int | None = None          # None: epochs * batches per epoch
    epochs: int = 10
    repeats: int = 1
    batch_size: int = 1
    resolution: int | None = None     # None: the model's default size
    buckets: bool = False
    cache_latents: bool = False
    gradient_checkpointing: bool = False
    targets: tuple[str, ...] = ("attn",)
    seed: int = 0
    sample_every: int = 0
    sample_prompts: tuple[str, ...] = ()
    save_every: int = 0
    resume: bool = False
    fp16: bool = False                # save the file in fp16 (half the size)
    noise_offset: float = 0.0         # kohya's: match the base model's training (built-in: 0.2)
    min_snr_gamma: float = 0.0        # kohya's Min-SNR loss weighting (5 is usual); 0 = plain MSE
    max_minutes: float | None = None  # stop early (and save) after this much training time
    progress: bool = True

    @property
    def state_path(self) -> Path:
        return self.out.with_name(self.out.stem + ".state.pt")


# ----------------------------------------------------------------------------- adapters

def target_names(root: nn.Module, endings: tuple[str, ...]) -> list[str]:
    return [name for name, m in root.named_modules()
            if isinstance(m, nn.Linear | nn.Conv2d) and name.endswith(tuple("." + e for e in endings))]


def check_rank(rank: int, roots: dict[str, nn.Module], names: dict[str, list[str]]) -> None:
    if rank < 1:
        raise LoraError(f"--rank must be at least 1, got {rank}")
    smallest = min(min(root.get_submodule(n).weight.shape[:2]) for c, root in roots.items()
                   for n in names[c])
    if rank > smallest:
        raise LoraError(f"--rank {rank} is larger than the smallest targeted layer dimension "
                        f"({smallest}); allowed: 1..{smallest}")


def attach_adapters(roots: dict[str, nn.Module], names: dict[str, list[str]], rank: int,
                    alpha: float, seed: int) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    # peft draws the initial down weights from torch's global generator: seed it (without
    # disturbing anyone else's draws) so that a seed gives the same LoRA every time.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for component, root in roots.items():
            root.requires_grad_(False)
            if names[component]:
                config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=names[component])
                inject_adapter_in_model(config, root)


def attach_word_vectors(encoder: nn.Module, token_ids: list[int]) -> None:
    """Make these rows of the text encoder's token embedding trainable, and nothing else of it
    (pivotal tuning: a word the encoder never learned gets vectors of its own)."""
    from peft import TrainableTokensConfig, inject_adapter_in_model

    inject_adapter_in_model(TrainableTokensConfig(token_indices=token_ids, target_modules=["token_embedding"]),
                            encoder)


def word_vectors(roots: dict[str, nn.Module], words: dict[str, list[int]]) -> dict[str, Tensor]:
    """Each learned word's vectors, (tokens, width), in token order."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    if not words:
        return {}
    [layer] = [m for m in roots["text_encoder"].modules() if isinstance(m, TrainableTokensLayer)]
    rows, vectors = layer.token_indices["default"], getattr(layer, WORD_PARAM)["default"]
    return {w: vectors[[rows.index(t) for t in ids]] for w, ids in words.items()}


def detach_adapters(roots: dict[str, nn.Module]) -> None:
    """Put the original layers back, leaving the model as it was loaded."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for root in roots.values():
        for name, module in list(root.named_modules()):
            if isinstance(module, BaseTunerLayer):
                parent, _, child = name.rpartition(".")
                setattr(root.get_submodule(parent), child, module.get_base_layer())
        if hasattr(root, "peft_config"):
            del root.peft_config


def adapter_layers(roots: dict[str, nn.Module]) -> dict[str, tuple[nn.Module, nn.Module]]:
    """kohya layer name -> (down module, up module), in model order."""
    from peft.tuners.lora import LoraLayer

    return {KOHYA_PREFIX[c] + canonical_path(c, name).replace(".", "_"):
            (m.lora_A["default"], m.lora_B["default"])
            for c, root in roots.items() for name, m in root.named_modules() if isinstance(m, LoraLayer)}


def kohya_tensors(roots: dict[str, nn.Module], alpha: float, dtype: torch.dtype,
                  words: dict[str, list[int]]) -> dict[str, Tensor]:
    """The adapters as kohya writes them, and each learned word as A1111 reads an embedding
    bundled in a LoRA file (bundle_emb.<word>.string_to_param.*)."""
    tensors = {f"bundle_emb.{w}.string_to_param.*": v.detach().to("cpu", dtype).contiguous()
               for w, v in word_vectors(roots, words).items()}
    for name, (down, up) in adapter_layers(roots).items():
        tensors[f"{name}.lora_down.weight"] = down.weight.detach().to("cpu", dtype).contiguous()
        tensors[f"{name}.lora_up.weight"] = up.weight.detach().to("cpu", dtype).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return tensors


# ----------------------------------------------------------------------------- training

def training_examples(cfg: TrainConfig) -> list[Example]:
    """The subject's images, then the regularization images (the trigger is the subject's only)."""
    examples = collect_examples(cfg.images, cfg.caption, cfg.trigger)
    if cfg.reg_images is not None:
        examples += collect_examples(cfg.reg_images, cfg.reg_caption, None, prior=True)
    return examples


def encode_text(model, captions: list[str]) -> Tensor:
    """(b, 77, d) last-layer hidden states, as SD1/SD2 UNets were trained on."""
    tokenizer, encoder = model.tokenizers[0], model.text_encoders[0]
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return encoder(input_ids=ids.to(encoder.device)).last_hidden_state


def encode_latents(vae, pixels: Tensor, generator: torch.Generator) -> Tensor:
    """A sample of the VAE posterior, scaled as the UNet sees latents."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    noise = torch.randn(dist.mean.shape, generator=generator).to(dist.mean)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (dist.mean + dist.std * noise - shift) * vae.config.scaling_factor


def diffusion_loss(model, latents: Tensor, hidden: Tensor, generator: torch.Generator,
                   noise_offset: float = 0.0, min_snr_gamma: float = 0.0,
                   sample_weights: Tensor | None = None, base_target: Callable | None = None) -> Tensor:
    """SD's objective: noise the latents at a uniform timestep, predict eps (or v), MSE
    (Min-SNR-weighted with min_snr_gamma > 0, each sample weighted by sample_weights; see
    common.denoising_loss). base_target(noisy, t) -> (rows, prediction): those rows' target is
    the base model's own prediction instead (--reg-target model).

    Written out rather than via a diffusers scheduler: a Model carries alphas_cumprod, not a
    scheduler, and the forward process is these two lines."""
    b = latents.shape[0]
    t = torch.randint(0, len(model.alphas_cumprod), (b,), generator=generator)
    noise = offset_noise(latents.shape, noise_offset, generator, torch.device("cpu")).to(latents)
    alpha_bar = model.alphas_cumprod[t].to(latents.device, torch.float32).view(b, 1, 1, 1)
    signal, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    noisy = signal * latents + sigma * noise
    target = noise if model.prediction_type == "epsilon" else signal * noise - sigma * latents
    if base_target is not None:
        rows, kept = base_target(noisy, t.to(latents.device))
        target = target.clone()
        target[rows] = kept.to(target)
    prediction = model.unet(noisy, t.to(latents.device), encoder_hidden_states=hidden).sample
    return denoising_loss(prediction, target, alpha_bar.flatten(), model.prediction_type, min_snr_gamma,
                          sample_weights=sample_weights)


@contextmanager
def adapters_off(roots: dict[str, nn.Module]) -> Iterator[None]:
    """The base model, for as long as the block runs (peft keeps the adapters' weights aside)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for root in roots.values() for m in root.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def trainable(roots: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    return {f"{c}.{n}": p for c, root in roots.items() for n, p in root.named_parameters()
            if "lora_" in n or WORD_PARAM in n}


def save_state(cfg: TrainConfig, roots, optimizer, generator, step: int, started: float) -> None:
    import io

    buffer = io.BytesIO()
    torch.save({"step": step, "started": started, "identity": state_identity(cfg),
                "adapters": {k: p.detach().cpu() for k, p in trainable(roots).items()},
                "optimizer": optimizer.state_dict(), "rng": generator.get_state()}, buffer)
    write_bytes_atomic(cfg.state_path, buffer.getvalue())


def state_identity(cfg: TrainConfig) -> dict:
    """What must not change between a run and its resumption."""
    return {"rank": cfg.rank, "alpha": cfg.alpha, "targets": list(cfg.targets),
            "train_text_encoder": cfg.train_text_encoder, "words": list(cfg.words), "seed": cfg.seed}


def restore_state(cfg: TrainConfig, roots, optimizer, generator) -> tuple[int, float]:
    if not cfg.state_path.is_file():
        raise LoraError(f"--resume: no training state at {cfg.state_path}")
    state = torch.load(cfg.state_path, map_location="cpu", weights_only=True)
    if state["identity"] != state_identity(cfg):
        raise LoraError(f"--resume: {cfg.state_path.name} was made with {state['identity']}, "
                        f"not {state_identity(cfg)}")
    with torch.no_grad():
        for key, param in trainable(roots).items():
            param.copy_(state["adapters"][key])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["rng"])
    return state["step"], state["started"]


def write_samples(model, cfg: TrainConfig, step: int, resolution: int) -> None:
    from sfumato.metadata import save_png
    from sfumato.pipeline import Pipeline

    pipe = Pipeline(model, model.unet.device, model.unet.dtype)
    for i, prompt in enumerate(cfg.sample_prompts):
        [result] = pipe.generate(prompt=prompt, seed=cfg.seed, steps=20, width=resolution,
                                 height=resolution)
        save_png(result.image, cfg.out.parent / "samples" / f"{cfg.out.stem}-step{step:06d}-{i}.png",
                 infotext=result.infotext, params=result.params.to_dict())


def check_words(words: dict[str, list[int]], examples: list[Example]) -> None:
    captions = [e.caption for e in examples if not e.prior]
    for word, ids in words.items():
        if not word.strip() or not ids:
            raise LoraError(f"--learn-word {word!r} must be a word the captions use, not blank")
        if not any(re.search(rf"(?<!\w){re.escape(word)}(?!\w)", c) for c in captions):
            raise LoraError(f"--learn-word {word!r} appears in none of the {len(captions)} captions; "
                            "it must be the word they use for the concept")
    tokens = [t for ids in words.values() for t in ids]
    if len(set(tokens)) < len(tokens):
        raise LoraError(f"--learn-word {', '.join(words)}: these words share tokens; learn one of them")


def prepare(model, cfg: TrainConfig, examples: list[Example]) -> tuple[dict, dict, dict, int]:
    """Every check that can fail, before training: (roots, target names, word tokens, resolution)."""
    if model.family not in BASE_MODEL_VERSION:
        raise LoraError(f"LoRA training supports SD1/SD2-family models, not {model.family!r}")
    unknown = set(cfg.targets) - set(TARGETS)
    if unknown or not cfg.targets:
        raise LoraError(f"unknown --target {sorted(unknown)}; allowed: {', '.join(TARGETS)}")
    roots = {"unet": model.unet}
    endings = {"unet": tuple(e for t in cfg.targets for e in TARGETS[t]),
               "text_encoder": TE_TARGETS if cfg.train_text_encoder else ()}
    if cfg.train_text_encoder or cfg.words:
        roots["text_encoder"] = model.text_encoders[0]
    names = {c: target_names(root, endings[c]) for c, root in roots.items()}
    check_rank(cfg.rank, {c: r for c, r in roots.items() if names[c]}, names)
    words = {w: name_tokens(model.tokenizers[0], w) for w in cfg.words}  # the rows a bundled embedding sets
    check_words(words, examples)
    resolution = cfg.resolution or model.default_size
    multiple = 2 ** (len(model.vae.config.block_out_channels) - 1) * 2 ** (len(model.unet.down_blocks) - 1)
    if resolution % multiple:
        raise LoraError(f"--resolution {resolution} must be a multiple of {multiple} for this model")
    if cfg.reg_target not in REG_TARGETS:
        raise LoraError(f"--reg-target {cfg.reg_target!r}: allowed {', '.join(REG_TARGETS)}")
    if cfg.sample_every and not cfg.sample_prompts:
        raise LoraError("--sample-every needs at least one --sample-prompt")
    if cfg.resume and not cfg.state_path.is_file():
        raise LoraError(f"--resume: no training state at {cfg.state_path}")
    load_pixels(examples, resolution, multiple, cfg.buckets)
    return roots, names, words, resolution


def set_training(roots: dict[str, nn.Module], training: bool, checkpointing: bool) -> None:
    for root in roots.values():
        root.train(training)
        if checkpointing:  # diffusers and transformers name the switch differently
            if hasattr(root, "enable_gradient_checkpointing"):
                (root.enable_gradient_checkpointing if training else root.disable_gradient_checkpointing)()
            else:
                (root.gradient_checkpointing_enable if training else root.gradient_checkpointing_disable)()


@dataclass
class Run:
    """One training run's moving parts, so saving and stepping read as one line each."""

    model: object
    cfg: TrainConfig
    examples: list[Example]
    roots: dict[str, nn.Module]
    words: dict[str, list[int]]
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    alpha: float
    total: int
    per_epoch: int
    resolution: int
    started: float = 0.0

    def save(self, path: Path, done: int) -> None:
        dtype = torch.float16 if self.cfg.fp16 else torch.float32
        epochs = math.ceil(self.total / self.per_epoch)
        metadata = kohya_metadata(self.cfg, self.model, self.examples, step=done,
                                  epoch=math.ceil(done / self.per_epoch), epochs=epochs,
                                  total=self.total, started=self.started, resolution=self.resolution)
        save_lora(path, kohya_tensors(self.roots, self.alpha, dtype, self.words), metadata)
        save_state(self.cfg, self.roots, self.optimizer, self.generator, done, self.started)

    def base_prediction(self, captions: list[str], rows: Tensor, base_texts: dict[str, Tensor]) -> Callable:
        """What the model without this LoRA predicts for these rows: regularization images learn to
        keep it, so prompts that are not the subject's come out as before."""
        def predict(noisy: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
            hidden = torch.stack([base_texts[c] for c in captions]).to(noisy)
            with torch.no_grad(), adapters_off(self.roots):
                return rows.to(noisy.device), self.model.unet(noisy[rows], t[rows], encoder_hidden_states=hidden).sample
        return predict

    def step(self, batch: list[int], latents: list[Tensor] | None, base_texts: dict[str, Tensor]) -> float:
        device, dtype = self.model.unet.device, self.model.unet.dtype
        if latents is not None:
            x0 = torch.stack([latents[i] for i in batch])
        else:
            with torch.no_grad():
                pixels = torch.stack([self.examples[i].pixels for i in batch])
                x0 = encode_latents(self.model.vae, pixels, self.generator)
        prior = torch.tensor([self.examples[i].prior for i in batch])
        dropped = torch.zeros_like(prior)
        if self.cfg.reg_caption_dropout and prior.any():
            dropped = prior & (torch.rand(len(batch), generator=self.generator) < self.cfg.reg_caption_dropout)
        captions = ["" if drop else self.examples[i].caption for i, drop in zip(batch, dropped.tolist(), strict=True)]
        hidden = (encode_text(self.model, captions) if "text_encoder" in self.roots
                  else torch.stack([base_texts[c] for c in captions]))
        weights = torch.where(prior, self.cfg.prior_loss_weight, 1.0)
        base_target = None
        if self.cfg.reg_target == "model" and prior.any():
            base_target = self.base_prediction([c for c, p in zip(captions, prior.tolist(), strict=True) if p], prior,
                                               base_texts)
        loss = diffusion_loss(self.model, x0.to(device, dtype), hidden.to(device, dtype), self.generator,
                              self.cfg.noise_offset, self.cfg.min_snr_gamma, weights, base_target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()


def train_lora(model, cfg: TrainConfig, examples: list[Example] | None = None) -> Path:
    """Train, write cfg.out (kohya format), and leave the model as it was. Returns cfg.out."""
    from sfumato.accel import small_on_cpu, torch_threads

    # A small model's ops are too short to share between CPU threads (accel.torch_threads): the
    # built-in model trained a LoRA at 6.6 steps/s on one thread against 2.6 on two (batch 4, 2 cores).
    with torch_threads(1) if small_on_cpu(model, model.unet.device) else nullcontext():
        return run_training(model, cfg, examples)


def run_training(model, cfg: TrainConfig, examples: list[Example] | None) -> Path:
    from tqdm import tqdm

    examples = examples or training_examples(cfg)
    roots, names, words, resolution = prepare(model, cfg, examples)
    per_epoch = len(epoch_batches(examples, cfg.repeats, cfg.batch_size, cfg.seed, 0))
    total = cfg.steps or cfg.epochs * per_epoch
    alpha = cfg.alpha if cfg.alpha is not None else cfg.rank
    attach_adapters(roots, names, cfg.rank, alpha, cfg.seed)
    if words:
        attach_word_vectors(roots["text_encoder"], [t for ids in words.values() for t in ids])
    try:
        params = trainable(roots)
        rates = {"unet": cfg.lr, "text_encoder": cfg.te_lr or cfg.lr, "words": cfg.word_lr or cfg.lr}
        group_of = {k: "words" if WORD_PARAM in k else k.split(".")[0] for k in params}
        groups = [{"params": [p for k, p in params.items() if group_of[k] == g], "lr": rate}
                  for g, rate in rates.items() if g in group_of.values()]
        run = Run(model, cfg, examples, roots, words, torch.optim.AdamW(groups),
                  torch.Generator().manual_seed(cfg.seed), alpha, total, per_epoch, resolution)
        start, run.started = (restore_state(cfg, roots, run.optimizer, run.generator) if cfg.resume
                              else (0, time.time()))
        with torch.no_grad(), adapters_off(roots):  # what does not change during training, computed once
            fixed = torch.Generator().manual_seed(cfg.seed + 1)
            latents = ([encode_latents(model.vae, e.pixels[None], fixed)[0] for e in examples]
                       if cfg.cache_latents else None)
            # the base model's reading of every caption (and of the empty one): the UNet's input while the
            # text encoder is frozen, and the regularization target's with --reg-target model
            captions = sorted({e.caption for e in examples} | {""})
            base_texts = dict(zip(captions, encode_text(model, captions), strict=True))
        set_training(roots, True, cfg.gradient_checkpointing)
        bar = tqdm(total=total, initial=start, desc=f"train {cfg.out.stem}", unit="step",
                   disable=not cfg.progress)
        batches: dict[int, list[list[int]]] = {}
        smooth, done = None, start
        deadline = time.time() + cfg.max_minutes * 60 if cfg.max_minutes else math.inf
        for done in range(start + 1, total + 1):
            epoch, position = divmod(done - 1, per_epoch)
            if epoch not in batches:
                batches = {epoch: epoch_batches(examples, cfg.repeats, cfg.batch_size, cfg.seed, epoch)}
            loss = run.step(batches[epoch][position], latents, base_texts)
            smooth = loss if smooth is None else 0.9 * smooth + 0.1 * loss
            bar.update()
            bar.set_postfix(loss=f"{smooth:.4f}", epoch=epoch + 1)
            if cfg.save_every and done % cfg.save_every == 0 and done < total:
                run.save(cfg.out.with_name(f"{cfg.out.stem}-step{done:06d}.safetensors"), done)
            if cfg.sample_every and done % cfg.sample_every == 0:
                set_training(roots, False, cfg.gradient_checkpointing)
                write_samples(model, cfg, done, resolution)
                set_training(roots, True, cfg.gradient_checkpointing)
            if time.time() > deadline:
                break
        bar.close()
        run.save(cfg.out, done)
    finally:
        set_training(roots, False, cfg.gradient_checkpointing)
        detach_adapters(roots)
    return cfg.out


@click.command("lora")
@click.option("--images", required=True, type=click.Path(path_type=Path),
              help="folder of images, each with a same-named .txt caption")
@click.option("--model", "model_path", default=None, help="checkpoint file or folder [built-in model]")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="output .safetensors")
@click.option("--caption", default=None, help="one caption for every image (no .txt files needed)")
@click.option("--trigger", default=None, help="word prepended to every caption")
@click.option("--reg-images", default=None, type=click.Path(path_type=Path),
              help="regularization images with .txt captions (kohya's reg_data_dir): pictures of what the "
                   "model already draws, trained on beside the subject so other prompts keep working")
@click.option("--reg-caption", default=None, help="one caption for every regularization image")
@click.option("--prior-loss-weight", default=1.0, show_default=True, type=click.FloatRange(min=0),
              help="weight of the regularization images in the loss")
@click.option("--reg-target", default="noise", show_default=True, type=click.Choice(REG_TARGETS),
              help="what regularization images learn: the noise, as kohya's, or the base model's own prediction "
                   "(distilled: other prompts keep their pictures)")
@click.option("--reg-caption-dropout", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="share of regularization captions left empty, so CFG's unconditional prediction is kept too")
@click.option("--rank", default=8, show_default=True, type=int, help="network dim")
@click.option("--alpha", default=None, type=float, help="network alpha [= rank]")
@click.option("--lr", default=1e-4, show_default=True, type=float, help="UNet learning rate")
@click.option("--te-lr", default=None, type=float, help="text-encoder learning rate [= --lr]")
@click.option("--train-text-encoder", is_flag=True, help="also train LoRA on the text encoder")
@click.option("--learn-word", "words", multiple=True,
              help="a caption word whose token vectors are learned and bundled in the file (bundle_emb, read by "
                   "A1111 and ComfyUI, not by diffusers' load_lora_weights): pivotal tuning, for a word the model "
                   "never learned (repeatable)")
@click.option("--word-lr", default=None, type=float, help="learning rate of --learn-word vectors [= --lr]")
@click.option("--target", "targets", multiple=True, default=("attn",), show_default=True,
              type=click.Choice(list(TARGETS)), help="UNet layers to adapt (repeatable)")
@click.option("--steps", default=None, type=click.IntRange(min=1), help="training steps [epochs x batches]")
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--repeats", default=1, show_default=True, type=click.IntRange(min=1),
              help="times each image is seen per epoch")
@click.option("--batch-size", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--resolution", default=None, type=click.IntRange(min=8), help="[model's default size]")
@click.option("--buckets", is_flag=True, help="aspect-ratio buckets instead of square centre crops")
@click.option("--cache-latents", is_flag=True, help="encode each image once (faster, no VAE noise)")
@click.option("--gradient-checkpointing", is_flag=True, help="less memory, ~30% slower")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--sample-every", default=0, type=click.IntRange(min=0), help="write samples every N steps")
@click.option("--sample-prompt", "sample_prompts", multiple=True, help="prompt for samples (repeatable)")
@click.option("--save-every", default=0, type=click.IntRange(min=0), help="intermediate file every N steps")
@click.option("--resume", is_flag=True, help="continue from OUT's .state.pt side file")
@click.option("--fp16", is_flag=True, help="save the LoRA in fp16")
@click.option("--noise-offset", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="kohya's noise offset; use the base model's (the built-in model's recipe: 0.2)")
@click.option("--min-snr-gamma", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Min-SNR loss weighting, as kohya's (5 is usual; 0 = off)")
@click.option("--max-minutes", type=float, default=None, help="stop (and save) after this training time")
@click.option("--device", default=None, help="cpu, cuda, mps [best available]")
@user_errors
def lora_command(images: Path, model_path: str | None, out: Path, device: str | None, **options) -> None:
    """Train a LoRA (kohya-compatible .safetensors) on a folder of captioned images."""
    from sfumato.checkpoints import BUILTIN_MODEL, load_model
    from sfumato.pipeline import pick_device

    if out.suffix != ".safetensors":
        raise LoraError(f"--out {out} must end in .safetensors")
    cfg = TrainConfig(images=images, out=out, targets=tuple(options.pop("targets")), words=tuple(options.pop("words")),
                      sample_prompts=tuple(options.pop("sample_prompts")), **options)
    examples = training_examples(cfg)  # before the slow load
    model = load_model(model_path or BUILTIN_MODEL, device=pick_device(device))
    train_lora(model, cfg, examples)
    click.echo(f"wrote {out}")
