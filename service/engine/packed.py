"""Packed steps: the running rows' decode tokens and pieces of joining prompts in one forward pass.

A joining prompt, or a chunk of a long one, prefilled in a forward pass of its own costs the
pass's fixed part on top of the decode step it comes with: on a CPU with a 4-bit base that part
is most of a small pass (bitsandbytes dequantizes every weight; docs/benchmarks.md), and the
running streams waited for it at every join and every chunk. Here the tokens of every row and
piece go through the model as one sequence of a one-row batch, so the linear layers run once, on
real tokens only, each token through its own adapter (the fused LoRA's per-token routing).

Attention is the one place where the tokens must stay apart. The pass's cache (`PackedCache`)
appends each token's new keys and values to its owner's own KV (a running row's cache column,
or the piece's KV after its past), and the attention (`packed_attention`, registered with
transformers as "hotswap_packed" and selected for the pass) runs per owner on that KV: one
batched call for the running rows, as a decode step does, and one causal call per piece. No
query scores another owner's keys and nothing is copied into a shared layout. Positions are
each token's own, so nothing a row computes changes.

Models whose attention goes through transformers' attention interface
(`_supports_attention_backend`) with full attention and no ALiBi can be packed; the engine
prefills the others' chunks in passes of their own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface, DynamicCache

from service.engine.attention import attention_configs, prompt_pass, wide_sdpa
from service.engine.kv_layers import Layers

Grow = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
ATTENTION = "hotswap_packed"
_active = threading.local()  # the PackedCache of the pass running on this thread


@dataclass
class Piece:
    """Prompt tokens joining a packed step: `ids` at positions `start`, `start + 1`, ...; `past`
    holds the KV of the prompt's first `start` tokens (None when `start` is 0)."""

    ids: list[int]
    start: int
    adapter: str | None
    past: Layers | None = None


class PackedCache(DynamicCache):
    """A packed pass's cache: `update` appends each owner's new keys and values to the owner's
    own KV and hands the pass's new ones back (packed_attention reads the owners' KV)."""

    def __init__(
        self,
        running: Layers | None,
        running_mask: torch.Tensor | None,
        pieces: list[Piece],
        device: torch.device,
        grow: Grow | None = None,
    ):
        """`grow(layer, keys, values)` appends the rows' new column to their cache of that layer
        and returns it whole (default: a concatenation into new tensors)."""
        super().__init__()
        self.rows = 0 if running is None else running[0][0].shape[0]
        self.running: Layers = list(running) if running is not None else []  # empty: no rows
        self.grow = grow or self._concatenated
        self.pieces = [dict(enumerate(p.past or ())) for p in pieces]  # per piece: layer -> its KV
        self.sizes = [len(p.ids) for p in pieces]
        self.starts = [p.start for p in pieces]
        if (
            self.rows and running_mask is not None
        ):  # [rows, 1, 1, columns + 1]: each row's valid columns and its new token
            mask = torch.cat([running_mask, running_mask.new_ones((self.rows, 1))], dim=1).bool()
            self.row_mask = mask[:, None, None, :]
        self.piece_masks = [
            # query i of a piece (position start + i) sees its past and its own tokens up to i
            torch.arange(start + size, device=device)[None] <= torch.arange(start, start + size, device=device)[:, None]
            for start, size in zip(self.starts, self.sizes, strict=True)
        ]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        rows = self.rows
        if rows:
            # the rows' tokens come first: [1, heads, rows, dim] -> [rows, heads, 1, dim]
            new = [s[0, :, :rows].transpose(0, 1).unsqueeze(2) for s in (key_states, value_states)]
            self.running[layer_idx] = self.grow(layer_idx, new[0], new[1])
        start = rows
        for own, size in zip(self.pieces, self.sizes, strict=True):
            new = [s[:, :, start : start + size] for s in (key_states, value_states)]
            past = own.get(layer_idx)
            if past is not None:
                own[layer_idx] = (torch.cat([past[0], new[0]], dim=2), torch.cat([past[1], new[1]], dim=2))
            else:
                own[layer_idx] = (new[0].contiguous(), new[1].contiguous())
            start += size
        return key_states, value_states

    def _concatenated(
        self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        old_keys, old_values = self.running[layer_idx]
        return torch.cat([old_keys, keys], dim=2), torch.cat([old_values, values], dim=2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # every token's position is given: the model needs no offset from the cache

    def results(self) -> tuple[Layers | None, list[Layers]]:
        """The running rows' caches a column longer, and each piece's KV (past, then tokens)."""
        return self.running if self.rows else None, [[own[i] for i in range(len(own))] for own in self.pieces]


def packed_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of a packed pass, per owner on its own KV (query [1, heads, tokens, dim]);
    returns [1, tokens, heads, dim] as transformers' attention functions do."""
    cache: PackedCache = _active.cache
    layer: int = module.layer_idx  # type: ignore[assignment]  # transformers sets it on every attention module
    gqa = query.shape[1] != key.shape[1]
    out = query.new_empty((1, query.shape[2], query.shape[1], query.shape[3]))
    rows = cache.rows
    if rows:
        keys, values = cache.running[layer]
        q = query[0, :, :rows].transpose(0, 1).unsqueeze(2)  # [rows, heads, 1, dim]
        o = wide_sdpa(q, keys, values, cache.row_mask, scale=scaling, enable_gqa=gqa)
        out[0, :rows] = o[:, :, 0]
    start = rows
    for index, size in enumerate(cache.sizes):
        keys, values = cache.pieces[index][layer]
        q = query[:, :, start : start + size]
        mask = cache.piece_masks[index]
        with prompt_pass():  # as the piece's own prefill would (attention.py)
            o = wide_sdpa(q, keys, values, mask, scale=scaling, enable_gqa=gqa)
        out[:, start : start + size] = o.transpose(1, 2)
        start += size
    return out, None


AttentionInterface.register(ATTENTION, packed_attention)


@contextmanager
def packed_pass(model: Any, cache: PackedCache) -> Iterator[PackedCache]:
    """The model's attention is `packed_attention` over `cache` meanwhile (on this thread)."""
    configs = attention_configs(model.config)
    saved = [c._attn_implementation for c in configs]
    for config in configs:
        config._attn_implementation = ATTENTION
    _active.cache = cache
    try:
        yield cache
    finally:
        for config, implementation in zip(configs, saved, strict=True):
            config._attn_implementation = implementation
        _active.cache = None


def inputs(
    tokens: list[int], positions: list[int], adapters: list[str | None], pieces: list[Piece], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, list[str | None], torch.Tensor]:
    """A packed pass's input ids and positions [1, tokens], the adapter of each token, and the
    tokens whose logits are wanted (each row's, then each piece's last)."""
    rows = len(tokens)
    ids = list(tokens) + [t for p in pieces for t in p.ids]
    position = list(positions) + [p.start + k for p in pieces for k in range(len(p.ids))]
    keep = list(range(rows))
    end = rows
    for piece in pieces:
        end += len(piece.ids)
        keep.append(end - 1)
    return (
        torch.tensor([ids], device=device),
        torch.tensor([position], device=device),
        list(adapters) + [p.adapter for p in pieces for _ in p.ids],
        torch.tensor(keep, device=device),
    )


def supported(model: Any) -> bool:
    """Whether the model's attention goes through transformers' attention interface, which a
    packed pass replaces (Falcon and BLOOM have their own), as plain scaled dot products:
    packed_attention has no logit soft-capping (Gemma 2; sliding-window models such as
    gpt-oss, with attention sinks, are refused earlier, by `prefix.unsupported`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base.config, "get_text_config", lambda: base.config)()
    if getattr(config, "attn_logit_softcapping", None):
        return False
    return bool(getattr(base, "_supports_attention_backend", False))
