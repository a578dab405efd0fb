"""Prompts -> Conditioning: the CLIP tokenizer, 75-token chunks, attention weights, CLIP encoders.

Follows A1111 (modules/sd_hijack_clip.py) so that the same prompt gives the same conditioning:
a prompt of any length is cut into chunks of 75 tokens, each encoded on its own as
BOS + tokens + EOS + padding (77 tokens), and the chunks are concatenated along the sequence.
"""

from __future__ import annotations

import functools
import gzip
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from sfumato.denoiser import Conditioning
from sfumato.errors import ParamError
from sfumato.prompt import BREAK, parse_weighted

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

FAMILIES = ("sd1", "sd2", "sdxl")
CHUNK_LENGTH = 75  # prompt tokens per chunk; BOS and EOS make it 77
MODEL_MAX_LENGTH = CHUNK_LENGTH + 2
COMMA_BACKTRACK = 20  # A1111's default: a chunk may end at a comma up to 20 tokens back
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
MERGE_COUNT = 49152 - 256 - 2  # OpenAI's simple_tokenizer keeps this many merges: 49408 tokens


@functools.lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """CLIP's vocabulary, built from the BPE merges file as OpenAI's simple_tokenizer builds it."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    data = resources.files("sfumato").joinpath("data", "tokenizer", BPE_FILE).read_bytes()
    # Split off only the lines used (line 0 is a header): the file has 262k merges, CLIP keeps 49k.
    lines = gzip.decompress(data).decode("utf-8").split("\n", MERGE_COUNT + 1)[1 : MERGE_COUNT + 1]
    merges = tuple([tuple(line.split()) for line in lines])
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def load_clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """The CLIP tokenizer, offline, from the shipped BPE file.

    pad_token: "<|endoftext|>" for SD1 and SDXL's first encoder, "!" for SD2 and SDXL's second.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=MODEL_MAX_LENGTH
    )


@dataclass
class Chunk:
    """Up to 75 prompt tokens with their weights; BOS, EOS and padding are added at encoding."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def _weighted_tokens(tokenizer, prompt: str) -> list[tuple[int, float] | None]:
    """The prompt's tokens with their attention weights; None where a BREAK starts a new chunk."""
    parsed = parse_weighted(prompt)
    # verbose=False: no warning that the prompt is longer than 77 tokens; chunking handles that.
    ids = tokenizer(
        [text for text, _ in parsed], add_special_tokens=False, padding=False, truncation=False,
        verbose=False,
    )["input_ids"]
    out: list[tuple[int, float] | None] = []
    for piece_ids, piece in zip(ids, parsed, strict=True):
        out += [None] if piece == BREAK else [(token, piece[1]) for token in piece_ids]
    return out


def _split_at_last_comma(chunk: Chunk, comma: int) -> tuple[Chunk, Chunk]:
    """A full chunk ends after its last comma if that is near the end; the rest moves on."""
    positions = [i for i, token in enumerate(chunk.tokens) if token == comma]
    if not positions or len(chunk.tokens) - positions[-1] > COMMA_BACKTRACK:
        return chunk, Chunk()
    cut = positions[-1] + 1
    return (
        Chunk(chunk.tokens[:cut], chunk.weights[:cut]),
        Chunk(chunk.tokens[cut:], chunk.weights[cut:]),
    )


def tokenize_prompt(tokenizer, prompt: str) -> list[Chunk]:
    """Split a prompt into chunks of at most 75 weighted tokens (at least one chunk)."""
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    chunks: list[Chunk] = []
    current = Chunk()
    for item in _weighted_tokens(tokenizer, prompt):
        if item is None:
            chunks.append(current)
            current = Chunk()
            continue
        token, weight = item
        if len(current.tokens) == CHUNK_LENGTH:
            # A comma itself may end the full chunk: it then opens the next one, as in A1111.
            full, current = (
                (current, Chunk()) if token == comma else _split_at_last_comma(current, comma)
            )
            chunks.append(full)
        current.tokens.append(token)
        current.weights.append(weight)
    if current.tokens or not chunks:
        chunks.append(current)
    return chunks


def chunk_ids(tokenizer, chunk: Chunk) -> tuple[list[int], list[float]]:
    """77 token ids (BOS, tokens, EOS, padding) and 77 weights (1 outside the prompt tokens)."""
    padding = CHUNK_LENGTH - len(chunk.tokens)
    ids = [tokenizer.bos_token_id, *chunk.tokens, tokenizer.eos_token_id]
    ids += [tokenizer.pad_token_id] * padding
    weights = [1.0, *chunk.weights] + [1.0] * (padding + 1)
    return ids, weights


def apply_weights(hidden: Tensor, weights: Tensor) -> Tensor:
    """Scale each token's hidden state by its weight, then restore each prompt's mean.

    A1111's "Original" emphasis. A1111 takes the mean over the whole batch; we take it per
    prompt so that a prompt's conditioning does not depend on what it is batched with (the two
    agree for one prompt). Computed in float32: a mean over 77*768 values in fp16 is too coarse.
    Prompts without weights are returned untouched, not divided by their own mean.
    """
    weighted = (weights != 1).any(dim=1)
    if not weighted.any():
        return hidden
    h = hidden.float()
    original_mean = h.mean(dim=(1, 2), keepdim=True)
    h = h * weights[:, :, None].to(h)
    h = h * (original_mean / h.mean(dim=(1, 2), keepdim=True))
    return torch.where(weighted[:, None, None], h.to(hidden.dtype), hidden)


def _final_layer_norm(encoder) -> torch.nn.Module:
    # transformers 5 moved it from CLIPTextModel.text_model onto CLIPTextModel itself.
    return getattr(encoder, "text_model", encoder).final_layer_norm


class TextEncoder:
    """The model's tokenizer(s) and CLIP text encoder(s), turning prompts into Conditioning."""

    def __init__(self, tokenizers: list, encoders: list, family: str):
        if family not in FAMILIES:
            raise ValueError(f"unknown model family {family!r}; allowed: {', '.join(FAMILIES)}")
        expected = 2 if family == "sdxl" else 1
        if len(tokenizers) != expected or len(encoders) != expected:
            raise ValueError(
                f"family {family!r} needs {expected} tokenizer(s) and encoder(s), "
                f"got {len(tokenizers)} and {len(encoders)}"
            )
        self.tokenizers = tokenizers
        self.encoders = encoders
        self.family = family

    def check_clip_skip(self, clip_skip: int) -> None:
        layers = min(e.config.num_hidden_layers for e in self.encoders)
        if not 1 <= clip_skip <= layers:
            raise ParamError(f"clip_skip must be between 1 and {layers} for this model, got {clip_skip}")

    def _select_layer(self, encoder, input_ids: Tensor, clip_skip: int) -> tuple[Tensor, Tensor | None]:
        """Hidden states of the layer the UNet expects, and the projected pooled output if any."""
        out = encoder(input_ids=input_ids, output_hidden_states=True)
        if self.family == "sdxl":
            # SDXL was trained on the penultimate layer without the final layer norm. A1111 ignores
            # clip skip for SDXL (its default setting), and so do we, so that images match.
            hidden = out.hidden_states[-2]
        else:
            # hidden_states[-1] is the last layer before the final layer norm, so clip_skip=1
            # gives exactly last_hidden_state.
            hidden = _final_layer_norm(encoder)(out.hidden_states[-clip_skip])
        return hidden, getattr(out, "text_embeds", None)

    def _encode_with(self, tokenizer, encoder, prompts: list[str], clip_skip: int
                     ) -> tuple[Tensor, Tensor | None]:
        """(b, 77*k, d) hidden states of one encoder, and its pooled output for the first chunk."""
        chunked = [tokenize_prompt(tokenizer, p) for p in prompts]
        # Every prompt gets as many chunks as the longest, so the batch stacks (A1111 pads the
        # same way: an empty chunk encodes the empty string).
        count = max(len(chunks) for chunks in chunked)
        parts, pooled = [], None
        for k in range(count):
            rows = [chunk_ids(tokenizer, chunks[k] if k < len(chunks) else Chunk())
                    for chunks in chunked]
            input_ids = torch.tensor([ids for ids, _ in rows], device=encoder.device)
            weights = torch.tensor([w for _, w in rows], device=encoder.device)
            hidden, projected = self._select_layer(encoder, input_ids, clip_skip)
            parts.append(apply_weights(hidden, weights))
            pooled = projected if k == 0 else pooled
        return torch.cat(parts, dim=1), pooled

    def encode(self, prompts: list[str], clip_skip: int = 1) -> Conditioning:
        """Encode prompts (LoRA tags already removed) into one batch of conditioning.

        clip_skip=1 uses the last layer, 2 the one before (then the final layer norm), as A1111.
        """
        if not prompts:
            raise ValueError("encode needs at least one prompt")
        self.check_clip_skip(clip_skip)
        # Batches often repeat a prompt (batch size > 1): encode each distinct prompt once.
        unique = list(dict.fromkeys(prompts))
        rows = [unique.index(p) for p in prompts]
        # no_grad rather than inference_mode: training code feeds these tensors into autograd.
        with torch.no_grad():
            outputs = [self._encode_with(t, e, unique, clip_skip)
                       for t, e in zip(self.tokenizers, self.encoders, strict=True)]
        dtype = outputs[0][0].dtype
        hidden = torch.cat([h.to(dtype) for h, _ in outputs], dim=-1)[rows]
        pooled = outputs[-1][1][rows] if self.family == "sdxl" else None
        return Conditioning(hidden=hidden, pooled=pooled, time_ids=None)
