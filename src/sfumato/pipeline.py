"""The one code path from a prompt to images, for the built-in model and SD checkpoints alike.

    prompt -> tokens -> embedding -> CFG denoiser -> sampler -> latents -> VAE -> images
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sfumato import accel
from sfumato import latents as latent_space
from sfumato.checkpoints import BUILTIN_MODEL, Model, cache_folder, load_model
from sfumato.deepcache import DeepCacheUNet
from sfumato.denoiser import Conditioning, UNetDenoiser, cfg_denoiser
from sfumato.errors import ParamError
from sfumato.metadata import LEVERS_KEY, infotext
from sfumato.params import GenerationParams
from sfumato.prompt import extract_lora_tags
from sfumato.sampling import get_sigmas, sample
from sfumato.text import TextEncoder

# callback(step, total, latents); raise sfumato.errors.Interrupted inside it to stop.
StepCallback = Callable[[int, int, torch.Tensor], None]


# From this latent size on (a 512x512 image) the heap the steps freed is handed back before the
# decode, whose activations are the peak of a generation (SD1.5 512x512: 3,640 -> 3,460 MB). Below
# it the decode is small, and taking the pages back costs more than it saves: a built-in 128x128
# image took 0.72 s against 0.69 s with it (median of 12, alternating in one process).
TRIM_BEFORE_DECODE_LATENT_PIXELS = 64 * 64


@dataclass
class GeneratedImage:
    image: Image.Image
    seed: int
    params: GenerationParams  # with the concrete seed of this image
    infotext: str


def pick_device(name: str | None = None) -> torch.device:
    """CUDA, then Apple's MPS, then the CPU, unless a device is named."""
    if name:
        try:
            return torch.device(name)
        except RuntimeError:
            raise ParamError(f"unknown device {name!r}; allowed: cpu, cuda, cuda:N, mps") from None
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on accelerators (half the memory, tensor cores); fp32 on the CPU, where fp16
    matmuls are slow and bf16 costs precision."""
    return torch.float32 if device.type == "cpu" else torch.float16


class Pipeline:
    """A loaded model, ready to generate. Holds no state between calls except the model itself
    (and the LoRAs currently applied to it)."""

    def __init__(self, model: Model, device: torch.device, dtype: torch.dtype,
                 lora_dir: str | Path | None = None, levers: accel.Levers | None = None,
                 allow_lora_paths: bool = True):
        self.model = model
        self.device = device
        self.dtype = dtype
        self.levers = levers or accel.Levers.none()  # what prepare() applied
        self.lora_dir = Path(lora_dir) if lora_dir else None
        self.allow_lora_paths = allow_lora_paths  # False: LoRA names resolve only inside lora_dir
        self.text = TextEncoder(model.tokenizers, model.text_encoders, model.family)
        self._loras = None  # sfumato.lora.LoraStack, created on first use
        self._tome_ratio = self.levers.tome  # the token merging ratio the UNet is patched with now
        self.one_thread = self.levers.one_thread and accel.small_on_cpu(model, device)
        self.pages_out = accel.pages_out(self.levers, model, device)
        self._traced = None  # the jit lever's TracedUNet, where it applies
        if accel.traces_unet(self.levers, model, device) and not model.frozen:
            from sfumato.tracing import TracedUNet

            self._traced = TracedUNet(model.unet, cache_folder() / "jit")
            self._traced.enabled = not self._tome_ratio
        self.unet = UNetDenoiser(self._traced or model.unet, model.alphas_cumprod, model.prediction_type)

    @classmethod
    def load(cls, model: str | Path | None = None, *, vae: str | Path | None = None,
             device: str | None = None, dtype: torch.dtype | None = None,
             allow_pickle: bool = False, lora_dir: str | Path | None = None,
             levers: accel.Levers | None = None, allow_lora_paths: bool = True) -> Pipeline:
        """levers: speed-ups to apply (default: the exact ones; see sfumato.accel)."""
        torch_device = pick_device(device)
        dtype = dtype or default_dtype(torch_device)
        levers = levers or accel.Levers()
        loaded = load_model(model or BUILTIN_MODEL, vae=vae, device=torch_device,
                            dtype=levers.weights_dtype(dtype), allow_pickle=allow_pickle,
                            keep_converted=levers.fp16_copy and torch_device.type == "cpu")
        return cls(accel.prepare(loaded, levers, torch_device, dtype), torch_device, dtype, lora_dir,
                   levers, allow_lora_paths)

    def generate(self, params: GenerationParams | None = None, *, callback: StepCallback | None = None,
                 init_image: Image.Image | None = None, **kwargs) -> list[GeneratedImage]:
        """Make params.batch_size images. Image i uses seed + i, whatever the batch size."""
        params = (params or GenerationParams(**kwargs)).validated().with_seed()
        width = params.width or self.model.default_size
        height = params.height or self.model.default_size
        prompt, tags = extract_lora_tags(params.prompt)
        negative, negative_tags = extract_lora_tags(params.negative_prompt)
        lora_hashes = self._activate_loras(list(params.loras) + [
            (t.name, t.te_weight, t.unet_weight) for t in tags + negative_tags])
        self._merge_tokens(self.levers.tome if params.token_merging_ratio is None
                           else params.token_merging_ratio)
        params = dataclasses.replace(params, token_merging_ratio=self._tome_ratio)

        latents = self.sample_latents(params, prompt, negative, width, height, callback=callback,
                                      init_image=init_image)
        self._rest(self.model.unet, self.model.vae.encoder)  # memory for the decode's activations
        pixels = self.decode(latents)
        self._rest(self.model.vae)
        return [self._finish(image, params, i, width, height, lora_hashes, init_image is not None)
                for i, image in enumerate(pixels)]

    def sample_latents(self, params: GenerationParams, prompt: str, negative: str, width: int,
                       height: int, *, callback: StepCallback | None = None,
                       init_image: Image.Image | None = None) -> torch.Tensor:
        """Denoise seeded noise (or a noised init image) into latents, (b, c, h, w)."""
        b = params.batch_size
        seeds = [params.seed + i for i in range(b)]
        cond, uncond = self.condition([prompt, negative], 1, width, height, params.clip_skip)
        self._rest(*self.model.text_encoders)

        sigmas = get_sigmas(params.scheduler, params.steps, self.model.alphas_cumprod)
        noise = latent_space.SeededNoise(seeds, latent_space.latent_shape(self.model.vae, width, height),
                                         self.device)
        x = noise() * sigmas[0]  # (b, 4, h/8, w/8)
        if init_image is not None:  # img2img: start part-way down the schedule from the image
            sigmas = sigmas[_first_step(params.steps, params.denoising_strength):]
            x = self.encode_image(init_image, width, height, seeds[0]).expand(b, -1, -1, -1)
            x = x + noise() * sigmas[0]

        unet = self.unet
        if self.levers.deepcache:  # a fresh feature cache for every sampling run
            unet = UNetDenoiser(DeepCacheUNet(self.model.unet), self.model.alphas_cumprod,
                                self.model.prediction_type)
        denoiser = one_image_at_a_time(cfg_denoiser(unet, cond, uncond, params.cfg_scale))
        total = len(sigmas) - 1

        def on_step(i: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
            if callback is not None:
                callback(i + 1, total, denoised)

        with torch.inference_mode(), accel.compute_context(self.levers, self.device, self.one_thread):
            return sample(params.sampler, denoiser, x, sigmas.to(self.device),
                          noise_sampler=noise, callback=on_step)

    def condition(self, prompts: list[str], batch: int, width: int, height: int,
                  clip_skip: int) -> tuple[Conditioning, Conditioning]:
        """Encode [prompt, negative] once and repeat for the batch."""
        with torch.inference_mode():
            both = self.text.encode(prompts, clip_skip=clip_skip)
        if self.model.family == "sdxl":  # micro-conditioning: original size, crop, target size
            ids = torch.tensor([height, width, 0, 0, height, width], dtype=both.hidden.dtype)
            both = dataclasses.replace(both, time_ids=ids.expand(2, -1).to(both.hidden.device))

        def pick(index: int) -> Conditioning:
            def rows(t: torch.Tensor | None) -> torch.Tensor | None:
                return None if t is None else t[index:index + 1].expand(batch, *t.shape[1:])
            return Conditioning(rows(both.hidden), rows(both.pooled), rows(both.time_ids))

        return pick(0), pick(1)

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        if latents.shape[-2] * latents.shape[-1] >= TRIM_BEFORE_DECODE_LATENT_PIXELS:
            accel.release_free_memory()  # what the steps freed, before the decode's big activations
        # One image at a time, for the same reason as one_image_at_a_time.
        images = torch.cat([latent_space.decode(self.model.vae, z[None]) for z in latents])
        array = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        return [Image.fromarray(a) for a in array]

    def encode_image(self, image: Image.Image, width: int, height: int, seed: int) -> torch.Tensor:
        resized = image.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
        pixels = torch.from_numpy(np.array(resized)).permute(2, 0, 1)[None].float() / 255
        generator = torch.Generator("cpu").manual_seed(seed)
        return latent_space.encode(self.model.vae, pixels, generator).to(self.device)

    def _rest(self, *modules: torch.nn.Module, tensors: list[torch.Tensor] | None = None) -> None:
        """Until their next use, these weights leave resident memory (accel.page_out): an SD1.5
        512x512 image then peaks at what one component needs, not all three."""
        if self.pages_out:
            accel.page_out(*modules, tensors=tensors or ())

    def _activate_loras(self, specs: list[tuple[str, float, float]]) -> dict[str, str]:
        """Apply exactly these LoRAs (removing others); returns {name: short hash} for metadata."""
        if not specs and self._loras is None:
            return {}
        from sfumato.lora import LoraStack  # only users of LoRAs pay for the import

        if self._loras is None:
            self._loras = LoraStack(self.model, lora_dir=self.lora_dir,
                                    allow_paths=self.allow_lora_paths)
        before = self._loras.active
        hashes = self._loras.activate(specs)
        if self._loras.active != before:
            self._unet_changed()
            self._rest(tensors=self._loras.set_aside())  # read by the merge, unused until the next
        return hashes

    def _merge_tokens(self, ratio: float) -> None:
        """Patch the UNet for this token merging ratio (A1111 applies its setting per job too)."""
        if ratio == self._tome_ratio:
            return
        accel.merge_tokens(self.model.unet, self.device, ratio)
        self._tome_ratio = ratio
        self._unet_changed()

    def _unet_changed(self) -> None:
        """The UNet's weights (a LoRA merged or removed) or blocks (token merging) changed: what
        was compiled or traced from it holds the old ones as constants."""
        if self.levers.compile:
            accel.compile_unet(self.model.unet, self.device)
        if self._traced is not None:
            self._traced.weights_changed()
            self._traced.enabled = not self._tome_ratio  # tomesd's blocks are Python, not traced

    def _finish(self, image: Image.Image, params: GenerationParams, index: int, width: int,
                height: int, lora_hashes: dict[str, str], img2img: bool) -> GeneratedImage:
        seed = params.seed + index
        one = dataclasses.replace(params, seed=seed, batch_size=1, width=width, height=height)
        extra: dict = {}
        if img2img:
            extra["Denoising strength"] = f"{params.denoising_strength:g}"
        if lora_hashes:
            extra["Lora hashes"] = ", ".join(f"{n}: {h}" for n, h in lora_hashes.items())
        lossy = dataclasses.replace(self.levers, tome=params.token_merging_ratio).lossy_names()
        if lossy:  # the same seed gives another picture without them
            extra[LEVERS_KEY] = ", ".join(lossy)
        text = infotext(one, seed=seed, width=width, height=height, model_name=self.model.name,
                        model_hash=self.model.hash, extra=extra)
        return GeneratedImage(image=image, seed=seed, params=one, infotext=text)


def one_image_at_a_time(denoiser: Callable) -> Callable:
    """Run the denoiser on each image of the batch separately. Kernels pick different blockings
    for different batch sizes, which changes the last bits of the result; one image per call
    (its cond and uncond still in one batch) keeps an image's bytes the same at any batch size.
    On a CPU, throughput is about linear in the batch anyway, so this costs little."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return torch.cat([denoiser(x[i:i + 1], sigma[i:i + 1]) for i in range(len(x))])

    return denoise


def _first_step(steps: int, strength: float) -> int:
    """img2img runs the last `strength` fraction of the schedule (A1111's convention)."""
    return min(steps - 1, max(0, steps - int(round(steps * strength))))
