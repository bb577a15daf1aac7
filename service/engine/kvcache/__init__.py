"""The running batch's KV cache: the two caches, and which one a model and its settings get.

Both caches keep the rows in the order of the engine's running list and offer the same four
operations: `join` (add freshly prefilled rows), `decode` (one token for every row, each through
its own adapter), `retain` (drop the rows that finished) and `clear`.

- `PaddedKV` (padded.py): left-padded rows in a `DynamicCache`; any model, any device.
- `SlotKV` (slots.py): one preallocated slot per row, written in place, with each decode step
  replayed from a CUDA graph on CUDA.

Each row keeps its own positions in both, so neither padding nor slots change what it computes.
The policy (`choose_kv_cache`) is here: the static cache where it pays off (CUDA graphs) and
fits, the padded one otherwise, and a clear refusal when the static one is asked for a model
it cannot serve (sliding-window or mixed attention layers).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import torch
from transformers import DynamicCache

from service.engine.kvcache.padded import PaddedKV
from service.engine.kvcache.slots import GraphCaptureError, SlotKV, capture_unsupported, graphs_unavailable, kv_shape
from service.engine.prefix import not_full_attention
from service.engine.runner import ModelRunner, hidden_dtype

__all__ = [
    "GraphCaptureError",
    "KVCache",
    "make_kv_cache",
    "PaddedKV",
    "SlotKV",
    "capture_unsupported",
    "choose_kv_cache",
    "graphs_unavailable",
    "kv_shape",
    "static_kv_bytes",
    "static_kv_unsupported",
]

log = logging.getLogger(__name__)


class KVCache(Protocol):
    """What the engine asks of the running batch's cache (its rows in the running list's order)."""

    packable: bool  # pieces of joining prompts can ride in its decode steps (`step_packed`)
    graphs: bool  # its decode steps replay CUDA graphs

    def join(self, cache: DynamicCache, new_mask: torch.Tensor) -> None:
        """Add freshly prefilled rows (their cache and its 0/1 mask, left-padded) after the others."""
        ...

    def decode(self, tokens: list[int], positions: list[int], adapters: list[str | None]) -> torch.Tensor:
        """One token for every row, each through its own adapter: [rows, vocab] fp32 logits."""
        ...

    def step_packed(
        self, tokens: list[int], positions: list[int], adapters: list[str | None], pieces: list[Any]
    ) -> tuple[torch.Tensor, list]:
        """`decode` with pieces of joining prompts in the same pass (only where `packable`)."""
        ...

    def retain(self, keep: list[int]) -> list[int]:
        """Drop the other rows; the kept rows' old indices in their new order."""
        ...

    def clear(self) -> None: ...


def make_kv_cache(
    kind: str,
    runner: ModelRunner,
    rows: int,
    max_context: int,
    *,
    cuda_graphs: bool = True,
    lora_slots: int = 1,
    on_capture: Callable[[float], None] = lambda seconds: None,
    on_graphs_off: Callable[[], None] = lambda: None,
) -> KVCache:
    """The running batch's cache of `kind` ("static" or "dynamic"; choose_kv_cache picks)."""
    if kind == "dynamic":
        return PaddedKV(runner)
    if kind != "static":
        raise ValueError(f"kv_cache must be 'static' or 'dynamic', not {kind!r}")
    kv = SlotKV(
        runner,
        rows,
        max_context,
        cuda_graphs=cuda_graphs,
        lora_slots=lora_slots,
        on_capture=on_capture,
        on_graphs_off=on_graphs_off,
    )
    shape = kv_shape(runner.model.config)
    if shape is not None:
        kv.reserve(*shape, dtype=hidden_dtype(runner.model))
    return kv


def choose_kv_cache(settings: Any, runner: ModelRunner, max_context: int) -> str:
    """'static' or 'dynamic' for the batched engine, from `settings.kv_cache` (auto, static or
    dynamic; see Settings.kv_cache), `max_batch_size` and `cuda_graphs`."""
    model, device = runner.model, runner.device.type
    if settings.kv_cache == "dynamic":
        return "dynamic"
    reason = static_kv_unsupported(model.config, max_context)
    if reason:
        if settings.kv_cache == "static":
            raise ValueError(f"KV_CACHE=static: {reason}")
        log.info("KV cache: dynamic (the static cache cannot serve this model: %s)", reason)
        return "dynamic"
    need = static_kv_bytes(model.config, settings.max_batch_size, max_context, hidden_dtype(model))
    no_graphs = graphs_unavailable(runner, settings.cuda_graphs)
    if settings.kv_cache == "auto":
        if no_graphs:  # the static cache pays off through CUDA graphs (docs/benchmarks.md)
            if device == "cuda":
                log.info("KV cache: dynamic (no CUDA graphs: %s)", no_graphs)
            return "dynamic"
        free, _ = torch.cuda.mem_get_info()
        if need > free // 2:
            log.warning(
                "KV cache: dynamic, since a static one (%d rows x %d positions) needs %.1f GiB and "
                "%.1f GiB is free; set MAX_MODEL_LEN or MAX_BATCH_SIZE lower to get the static "
                "cache and CUDA graphs",
                settings.max_batch_size,
                max_context,
                need / 2**30,
                free / 2**30,
            )
            return "dynamic"
    log.info(
        "KV cache: static, %d rows x %d positions (%.2f GiB), %s",
        settings.max_batch_size,
        max_context,
        need / 2**30,
        f"no CUDA graphs ({no_graphs})" if no_graphs else "CUDA graphs",
    )
    return "static"


def static_kv_unsupported(config: Any, max_context: int | None = None) -> str | None:
    """Why the static KV cache cannot serve this model over `max_context` tokens (None: it can)."""
    text = getattr(config, "get_text_config", lambda: config)()
    if kv_shape(text) is None:
        return "the config does not give the cache's shape (layers, KV heads, head size)"
    reason = not_full_attention(text, max_context)
    return f"{reason}; use KV_CACHE=dynamic" if reason else None


def static_kv_bytes(config: Any, rows: int, positions: int, dtype: Any) -> int:
    """Bytes of the static KV cache for this many rows and positions (a config with a shape)."""
    shape = kv_shape(config)
    if shape is None:
        raise ValueError("the config does not give the cache's shape (layers, KV heads, head size)")
    layers, heads, head_dim = shape
    size = torch.empty((), dtype=dtype).element_size()
    return layers * 2 * rows * positions * heads * head_dim * size
