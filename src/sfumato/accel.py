"""Speed levers: how a loaded Model is prepared for fast inference.

Exact and near-exact levers (outputs within float32 rounding of the plain path, or of fp16 weights:
exact for the many files stored in fp16, the built-in model's among them) are on by default; lossy
ones are opt-in and `sfumato bench speed --lever NAME` reports what each costs in fidelity. One SD1.5 UNet
step (cond+uncond, 16x16 latents) on this project's shared 2-core AVX2 CPU, median of 3, relative
to plain fp32 eager (9.4 s):

  channels_last   exact   0.93x  the UNet in NHWC, the layout oneDNN's convs prefer (0.92-1.02x
                                 of diffusers' step in `bench speed`: within this machine's noise)
  int8            lossy   0.75x  dynamic int8 nn.Linear (attention, feed-forward); eps max err 0.03
  bf16            lossy   9.1x   bf16 autocast: slower without avx512_bf16 / AMX (see has_fast_bf16)
  compile         exact   0.57x  torch.compile (Inductor; on a CPU with `freezing`: weights folded in as
                                 constants, convs' weights pre-packed for oneDNN). A built-in 128x128
                                 image: 0.49 s against 0.86 s (median of 10, alternating, one process).
                                 The first image of each size waits for compiling: ~100 s, ~60 s in a
                                 later process (frozen graphs skip Inductor's graph cache; its C++
                                 kernels are cached, in compile_cache()). For servers, not one-off runs
  fp16_weights    near    1.08x  weights stored in fp16, each layer cast to fp32 as it runs
                  exact          (sfumato.weight_casting): SD1.5 loads in 2.5 GB, not 4.9; one
                                 512x512 UNet call, 1 thread, machine loaded, median of 4: 18.7 s
                                 against 17.2 s; outputs' relative RMS change 7e-4 (fp32 file).
                                 Models under FP16_WEIGHTS_MIN_PARAMS get the same numbers cheaper
  deepcache       lossy   ~0.5x  DeepCache, interval 3: a cached SD1.5 call costs ~0.22x of a full one
                                 (256x256, this machine under load); see sfumato.deepcache
  tome            lossy   0.83x  ToMe, ratio 0.5, in the full-resolution self-attention: one SD1.5 call
                                 at 768x768, 39.6 -> 32.9 s (scripts/lever_ab.py --unet-call, median
                                 of 3); at 512x512 only ~0.95x (a 4-step image 90.7 -> 87.0 s):
                                 attention grows with the square of the tokens, convolutions linearly.
                                 Nothing to merge in SDXL or the built-in model (see merge_tokens)

Two act on memory alone, for SD-sized models on the CPU. Together, one SD1.5 512x512 image
(`sfumato bench speed --model sd15 --steps 2 --runs 2`; its file is fp32) peaked at 2,744 MB of
RSS against diffusers' 5,428 (0.51x; 3,453 MB, 0.64x, before them), at the same speed:

  page_out        exact   each component's weights leave resident memory when its part of an image
                          is done (text encoder, UNet, VAE): they are views of the checkpoint's
                          memory map, clean pages the OS keeps in its page cache, so the next image
                          maps them back without reading the disk. An fp16 file, which peaked at
                          4.9 GB (its pages plus NHWC copies of the convs' weights), now 2.75 GB
  fp16_copy       exact   an fp32 checkpoint read as fp16 is converted once into a copy in the
                          cache (checkpoints.converted_copy), then memory-mapped like an fp16 file:
                          page_out can drop it, and a load skips the conversion

Two more act only on small models (under FP16_WEIGHTS_MIN_PARAMS) on the CPU, where a step is
a few hundred ops of tens of microseconds each; a built-in 128x128 image, alternating in one
process (`python scripts/lever_ab.py "" "no-jit+no-one_thread"`): 0.40 s against 0.65 s.

  jit             exact   0.65x  the UNet as a frozen TorchScript trace (sfumato.tracing): the same
                                 ops without diffusers' Python; cached on disk, ~0.1 s to load
  one_thread      near    ~0.85x the denoising loop on one thread (torch_threads): a second thread's
                  exact          hand-off costs more than it saves on ops this small

SDPA attention needs no lever: diffusers' default AttnProcessor2_0 already calls
torch.nn.functional.scaled_dot_product_attention (attention_backends() checks it).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from sfumato.errors import ParamError
from sfumato.params import tome_ratio

log = logging.getLogger(__name__)

# Below this many parameters the fp16_weights lever casts every weight to fp32 once, at load: the
# same numbers (fp16-rounded weights, fp32 compute) without a Python hook around each layer call,
# which cost the built-in model (8.5 M parameters) ~20 % of its time (0.87 -> 0.70 s a 128x128
# image, median of 8, in one process) to save it 17 MB. SD-sized models keep the hooks.
FP16_WEIGHTS_MIN_PARAMS = 100_000_000

TOME_RATIO = 0.5  # `--lever tome`: tomesd's recommended ratio; recorded as A1111's "Token merging ratio"


@dataclass(frozen=True)
class Levers:
    channels_last: bool = True   # exact
    compile: bool = False        # exact, but minutes of compiling per shape
    int8: bool = False           # lossy: dynamic int8 Linear layers (CPU only)
    bf16: bool = False           # lossy: bf16 autocast (CPU with avx512_bf16/AMX, or CUDA)
    deepcache: bool = False      # lossy: reuse deep UNet features on 2 calls in 3 (sfumato.deepcache)
    tome: float = 0.0            # lossy: the ratio of tokens merged in the full-resolution self-attention (ToMe)
    fp16_weights: bool = True    # near-exact: weights kept in fp16, each layer run in fp32: half the RAM
    jit: bool = True             # exact: a small UNet on the CPU runs as a frozen trace (sfumato.tracing)
    one_thread: bool = True      # near-exact: a small model's denoising loop on one CPU thread
    page_out: bool = True        # exact: an SD-sized model's idle weights leave resident memory (page_out)
    fp16_copy: bool = True       # exact: on the CPU, an fp32 checkpoint's fp16 copy kept in the cache, memory-mapped

    @classmethod
    def parse(cls, names: list[str] | tuple[str, ...]) -> Levers:
        """Turn opt-in lever names ("int8", "compile", "tome", "tome=0.3", "no-channels_last") into
        Levers; a later name wins over an earlier one."""
        allowed = [f.name for f in fields(cls)]
        chosen: dict[str, bool | float] = {}
        for name in names:
            name, _, ratio = name.partition("=")
            key, value = (name[3:], False) if name.startswith("no-") else (name, True)
            key = key.replace("-", "_")
            if key not in allowed:
                raise ParamError(f"unknown speed lever {name!r}; allowed: {', '.join(allowed)} "
                                 "(prefix no- to turn one off; tome=RATIO for another ratio than "
                                 f"{TOME_RATIO:g})")
            if key == "tome":
                chosen[key] = _tome_lever(value, ratio)
            elif ratio:
                raise ParamError(f"speed lever {name!r} takes no value (only tome=RATIO does)")
            else:
                chosen[key] = value
        return cls(**chosen)

    @classmethod
    def none(cls) -> Levers:
        """Every lever off: the plain diffusers path."""
        return cls(**{f.name: type(f.default)() for f in fields(cls)})

    def names(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name)]

    def lossy_names(self) -> list[str]:
        """The levers on that change the picture (recorded in its metadata; tome's ratio is
        recorded apart, as A1111's "Token merging ratio")."""
        return [name for name in ("int8", "bf16", "deepcache", "tome") if getattr(self, name)]

    def weights_dtype(self, compute_dtype: torch.dtype) -> torch.dtype:
        """The dtype to load weights in: fp16 under the fp16_weights lever when computing in fp32,
        unless int8 is on (its quantizer wants float32 Linear weights, and shrinks them itself)."""
        half = self.fp16_weights and not self.int8 and compute_dtype == torch.float32
        return torch.float16 if half else compute_dtype


def _tome_lever(on: bool, ratio: str) -> float:
    """`tome` (TOME_RATIO), `tome=R` or `no-tome` (0) as a ratio."""
    if not on:
        return 0.0
    if not ratio:
        return TOME_RATIO
    try:
        value: object = float(ratio)
    except ValueError:
        value = ratio  # not a number: tome_ratio's error names the text
    return tome_ratio(value, "tome")


def cpu_flags() -> set[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {flag for line in text.splitlines() if line.startswith("flags")
            for flag in line.split(":", 1)[1].split()}


def has_fast_bf16(flags: set[str] | None = None) -> bool:
    """bf16 matmuls beat fp32 on a CPU only with native bf16 dot products."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def attention_backends(unet: torch.nn.Module) -> set[str]:
    """Class names of the UNet's attention processors ("AttnProcessor2_0" = PyTorch SDPA)."""
    return {type(p).__name__ for p in unet.attn_processors.values()}


def prepare(model, levers: Levers = Levers(), device: torch.device | str = "cpu",
            compute_dtype: torch.dtype = torch.float32):
    """Apply the levers to model.unet and model.vae in place; returns the model.

    Text encoders stay as loaded (they run once per prompt, a few ms), but for fp16_weights."""
    device = torch.device(device)
    if levers.int8 and device.type != "cpu":
        raise ParamError("the int8 lever is for the CPU only (dynamic quantization has no CUDA kernels)")
    small = is_small(model)
    # SD-sized models under fp16_weights: each layer's weights are cast while it runs. The cast
    # writes conv weights in NHWC itself, so the resting ones are never rewritten (page_out).
    cast_weights = levers.weights_dtype(compute_dtype) != compute_dtype
    cast_while_running = cast_weights and not small
    if cast_weights:
        from sfumato.weight_casting import cast_tensors, compute_layers_in

        nhwc = torch.channels_last if levers.channels_last else torch.preserve_format
        for module in (model.unet, model.vae, *model.text_encoders):
            if small:
                cast_tensors(module, compute_dtype)
            else:
                compute_layers_in(module, compute_dtype, nhwc)
    if levers.channels_last and not cast_while_running:
        model.unet.to(memory_format=torch.channels_last)
        # The VAE too where it is SD-sized: an SD1.5 512x512 decode took 21 s against 27 s, and its
        # peak memory above the loaded model fell from ~1,040 to ~880 MB (NCHW convolutions reorder
        # their big activations to oneDNN's layout and back). The built-in model's whole image was
        # 7 % slower with an NHWC VAE (0.74 against 0.70 s, alternating in one process), so not there.
        if not small:
            model.vae.to(memory_format=torch.channels_last)
    if levers.tome:
        merge_tokens(model.unet, device, levers.tome)
    if levers.int8:
        model.unet = quantize_linear_int8(model.unet)
    if levers.compile:
        compile_unet(model.unet, device)
    release_free_memory()
    return model


def pages_out(levers: Levers, model, device: torch.device | str) -> bool:
    """Whether the pipeline drops each component's weights from resident memory when its part of an
    image is done (page_out): SD-sized models on the CPU, whose weights are views of the checkpoint's
    memory map. A small model's are cast at load, into memory of their own."""
    return levers.page_out and torch.device(device).type == "cpu" and not is_small(model)


def is_small(model) -> bool:
    """Under FP16_WEIGHTS_MIN_PARAMS: a model whose time goes to per-op overhead more than to FLOPs."""
    modules = (model.unet, model.vae, *model.text_encoders)
    return sum(p.numel() for module in modules for p in module.parameters()) < FP16_WEIGHTS_MIN_PARAMS


def small_on_cpu(model, device: torch.device | str) -> bool:
    """Where the jit and one_thread levers apply. On SD-sized models Python's share of a step is
    under 1 % and a second thread halves the convolutions' time."""
    return torch.device(device).type == "cpu" and is_small(model)


def traces_unet(levers: Levers, model, device: torch.device | str) -> bool:
    """Whether the jit lever applies: a small model on the CPU, without a lever that changes the
    UNet's code (compile traces it its own way; int8 swaps its layers; bf16 autocasts). On an
    SD-sized model a frozen trace would also copy the fp16_weights lever's per-layer casts into
    fp32 constants: twice the memory."""
    return (levers.jit and small_on_cpu(model, device)
            and not (levers.compile or levers.int8 or levers.bf16))


def merge_tokens(unet: torch.nn.Module, device: torch.device, ratio: float = TOME_RATIO) -> None:
    """ToMe for SD (Bolya & Hoffman 2023, arXiv:2303.17604), through its authors' tomesd, as
    A1111 applies it: before each self-attention at the full latent resolution, `ratio` of the
    tokens are merged into their most similar neighbours, and the output is unmerged after it.
    Replaces any earlier ratio; 0 restores the plain UNet.

    The merge targets are the top-left token of each 2x2 cell (use_rand=False, like A1111): a
    random choice would draw from a generator that no seed controls."""
    import tomesd
    from diffusers.models.attention import BasicTransformerBlock

    tomesd.remove_patch(unet)
    if not ratio:
        return
    full_resolution = (*unet.down_blocks[0].modules(), *unet.up_blocks[-1].modules())
    if not any(isinstance(m, BasicTransformerBlock) for m in full_resolution):
        log.warning("the tome lever changes nothing on this model: it has no self-attention at "
                    "full latent resolution (like SDXL and the built-in model), where tome merges")
        return
    tomesd.apply_patch(unet, ratio=ratio, use_rand=False)
    # tomesd reads the latent's size in a hook on the UNet's forward, which the deepcache lever's
    # own pass never calls; conv_in runs on every pass, cached or not.
    info = unet._tome_info
    # Unused without random targets, but tomesd would otherwise fork the global RNG's state on
    # the first call, which torch.compile cannot trace.
    info["args"]["generator"] = torch.Generator(device)
    for hook in info["hooks"]:
        hook.remove()

    def note_size(module: torch.nn.Module, args: tuple) -> None:
        info["size"] = tuple(args[0].shape[2:])

    info["hooks"][:] = [unet.conv_in.register_forward_pre_hook(note_size)]


def release_free_memory() -> None:
    """Give the C heap's free pages back to the OS (glibc's malloc_trim).

    glibc keeps memory a process has freed for reuse, and after loading (converted copies of the
    weights) or the UNet's steps that is hundreds of MB still counted as resident: trimming before
    the VAE decode, the peak of a 512x512 SD1.5 image, cut it from 3,640 to 3,460 MB (see
    pipeline.TRIM_BEFORE_DECODE_LATENT_PIXELS). No library wraps this call; elsewhere than glibc
    (macOS, musl) it is a no-op."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


MADV_DONTNEED = 4  # <sys/mman.h> on Linux
PAGE_SIZE = 4096  # the unit of /proc/self/pagemap's entries on the machines this runs on
# /proc/self/pagemap's flag bits (Documentation/admin-guide/mm/pagemap.rst)
PAGE_FILE_OR_SHARED, PAGE_SWAPPED, PAGE_PRESENT = 1 << 61, 1 << 62, 1 << 63


def page_out(*modules: torch.nn.Module, tensors: Iterable[torch.Tensor] = ()) -> int:
    """Take the resting weights of these modules out of the process's resident memory, where they
    are clean pages of a mapped file: the checkpoint itself, whose tensors safetensors hands out
    as views of a memory map. The OS keeps those pages in its page cache, so the next call maps
    them back without reading the disk; meanwhile the memory is free for what runs (an SD1.5
    UNet's 1.7 GB during the VAE decode); `tensors`: more of them, outside the modules (the
    weights a LoRA merge set aside). Returns the bytes dropped.

    madvise(MADV_DONTNEED) by hand, as nothing in torch or the standard library drops pages of a
    mapping it did not create. On a private file mapping it would also discard pages written since
    (a copy made on write: a LoRA merged in place), so /proc/self/pagemap is read first and only
    pages of the file itself, or not resident, are dropped. Linux only; elsewhere, and for weights
    in memory of their own, it does nothing."""
    try:
        mapped = _file_mappings()
        with open("/proc/self/pagemap", "rb") as pagemap:
            libc = ctypes.CDLL(None, use_errno=True)
            dropped = 0
            every = [t for m in modules for t in (*m.parameters(), *m.buffers())] + list(tensors)
            for lo, hi in _page_ranges(every, mapped):
                pagemap.seek(lo // PAGE_SIZE * 8)
                flags = np.frombuffer(pagemap.read((hi - lo) // PAGE_SIZE * 8), dtype=np.uint64)
                present, swapped, of_file = ((flags & np.uint64(bit)) != 0
                                             for bit in (PAGE_PRESENT, PAGE_SWAPPED, PAGE_FILE_OR_SHARED))
                for start, end in _runs(~swapped & (~present | of_file)):
                    size = (end - start) * PAGE_SIZE
                    if libc.madvise(ctypes.c_void_p(lo + start * PAGE_SIZE), ctypes.c_size_t(size),
                                    MADV_DONTNEED) == 0:
                        dropped += size
            return dropped
    except (OSError, AttributeError, ValueError):  # not Linux, or /proc not readable
        return 0


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of every mapping of a file in this process, from /proc/self/maps."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields_ = line.split(maxsplit=5)
            if len(fields_) == 6 and fields_[5].startswith("/"):
                start, end = fields_[0].split("-")
                ranges.append((int(start, 16), int(end, 16)))
    return sorted(ranges)


def _page_ranges(tensors: list[torch.Tensor], mapped: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The whole pages the CPU tensors lie on, where they lie in a file mapping, merged."""
    import bisect

    starts = [start for start, _ in mapped]
    ranges = []
    for tensor in tensors:
        if tensor.device.type != "cpu" or not tensor.numel():
            continue
        begin = tensor.data_ptr()
        end = begin + (1 + sum((n - 1) * step for n, step in zip(tensor.shape, tensor.stride(),
                                                                 strict=True))) * tensor.element_size()
        i = bisect.bisect_right(starts, begin) - 1
        if i >= 0 and end <= mapped[i][1]:
            ranges.append((begin // PAGE_SIZE * PAGE_SIZE, -(-end // PAGE_SIZE) * PAGE_SIZE))
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each run of True in a 1-d boolean array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def compile_cache() -> Path:
    """Where Inductor keeps what it compiled between processes: sfumato's cache folder, not /tmp,
    which a reboot empties. With frozen weights only the C++ kernels (keyed by their source) are
    reused; the graph is compiled again in each process (~60 s for the built-in UNet)."""
    from sfumato.checkpoints import cache_folder

    return cache_folder() / "inductor"


def compile_unet(unet: torch.nn.Module, device: torch.device) -> None:
    """Compile the UNet's forward (only it: it runs steps x images times; the VAE once an image).

    On a CPU, Inductor's `freezing` treats the weights as constants, which lets oneDNN pre-pack
    the convolutions' weights once instead of on every call: most of the gain at small sizes.
    Frozen weights are constants of the compiled code, so after changing weights in place (a LoRA
    applied or removed) call this again: it compiles afresh from the eager forward."""
    import os

    import torch._inductor.config
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # Inductor writes its default (/tmp) into the variable on first use, so only that value, or
    # none, is replaced: a folder the user chose wins.
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache())
    if device.type == "cpu":
        # Process-wide, as Inductor reads it where torch.compile(options=...) does not reach (with
        # options it compiled plain aten convolutions). It only changes graphs compiled without
        # gradients, i.e. inference: a training step in the same process is unaffected.
        torch._inductor.config.freezing = True
    if vars(unet).pop("forward", None) is not None:  # compiled before: back to the class's eager forward
        torch.compiler.reset()  # and forget the code (and frozen weights) compiled then
    unet.forward = torch.compile(unet.forward, dynamic=False)


def quantize_linear_int8(module: torch.nn.Module) -> torch.nn.Module:
    """Weights of every nn.Linear stored in int8, activations quantized on the fly per batch."""
    # torch.ao's eager quantization is deprecated in favour of torchao, a package sfumato does not
    # otherwise need; it still works and its warning would only confuse users.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*deprecated")
        # inplace: children are swapped, the top module (its .config, .dtype) stays diffusers'
        return torch.ao.quantization.quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8,
                                                      inplace=True)


@contextlib.contextmanager
def compute_context(levers: Levers, device: torch.device | str = "cpu",
                    one_thread: bool = False) -> Iterator[None]:
    """The region the denoising loop runs in: bf16 autocast when that lever is on; one CPU thread
    when asked (see small_on_cpu), the previous count restored after."""
    with contextlib.ExitStack() as stack:
        if levers.bf16:
            stack.enter_context(torch.autocast(torch.device(device).type, dtype=torch.bfloat16))
        if one_thread:
            stack.enter_context(torch_threads(1))
        yield


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count, for a block. The built-in UNet's ops take tens of
    microseconds each on 16x16 latents, and handing each one to a second thread and waiting for it
    cost more than it saved: a 128x128 image took 0.51 s on one thread against 0.59 s on two
    (0.63 / 0.78 s without the jit lever), alternating in one process on this 2-core CPU. The
    latents then no longer depend on how many cores the machine has (kernels split sums by thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
