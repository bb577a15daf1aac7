"""Attention in float64 on CPUs: an answer that does not depend on what ran before it.

The engine computes one prompt position in several ways: in a whole prefill, after a stored
prefix (service/engine/prefix.py), in a left-padded batch, packed beside other rows. Each gives
the same attention up to the order of its floating-point sums, and PyTorch's CPU attention
kernels sum in an order that depends on the query count and the padding: about 1e-7 relative
in fp32. On its own that is harmless. But bitsandbytes' 4-bit kernel on CPUs with AVX512-BF16
or AMX (picked at the first eval-mode forward, backends/cpu/ops.py `gemv_4bit`) rounds every
activation to bf16 before its matmul, and a difference of one fp32 unit in an attention output
flips that rounding now and then: 0.15-0.44 in the logits of SmolLM2 between a whole prefill
and one after a stored prefix, enough to change a greedy token (issue 29, docs/architecture.md).
That kernel itself gives each row the same bits whatever the row count (measured).

So on CPUs the attention of prompt tokens runs in float64 and is rounded back to the model's
dtype. The orders of summation still differ, by about 1e-16 relative, and the rounding to fp32
absorbs that except when an fp64 result lies within 1e-16 of an fp32 rounding boundary (about
2^-29 per element): a whole prefill, a prefill after a stored prefix, a chunked or a packed one
then give the same bits. A prompt pass is one with several query tokens, or a rest of one
token after KV computed before (`prompt_pass`, set by the runner). Decode steps (one query
token per row) keep fp32: there the casts of the whole KV cost 0.65x at 16 rows x 512 tokens,
and a decode step computes a row the same way whatever ran before; only a left-padded batch
shared with other rows rounds differently (batch variance, docs/architecture.md). The cost of
fp64 prompts is in docs/benchmarks.md. GPUs keep their fused kernels: bf16 end to end, and
batch-variant.

`WIDE` is registered with transformers' attention interface (and its SDPA masks);
`use_wide_attention` switches a model to it where its attention goes through that interface.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

WIDE = "hotswap_sdpa_fp64"
_state = threading.local()  # `prompt`, `products`: what this thread's pass computes (below)


@contextmanager
def _flagged(name: str) -> Iterator[None]:
    """`_state.<name>` is true meanwhile, on this thread (nested uses restore it)."""
    saved = getattr(_state, name, False)
    setattr(_state, name, True)
    try:
        yield
    finally:
        setattr(_state, name, saved)


def prompt_pass() -> contextlib.AbstractContextManager[None]:
    """The forward passes meanwhile (on this thread) compute prompt tokens: their attention is
    wide even for a single query token (the rest of a prompt after a stored prefix)."""
    return _flagged("prompt")


def wide(query: torch.Tensor) -> bool:
    """Whether attention for these queries [batch, heads, tokens, dim] runs in float64."""
    return query.device.type == "cpu" and (query.shape[-2] > 1 or getattr(_state, "prompt", False))


def prompt_tokens_in_pass() -> contextlib.AbstractContextManager[None]:
    """A pass that carries prompt tokens beside decode rows (a packed step): its LoRA products
    are wide (`wide_products`); its attention decides per owner (packed_attention)."""
    return _flagged("products")


def wide_products(x: torch.Tensor) -> bool:
    """Whether the fused LoRA's products for these rows run in float64: in passes that compute
    prompt tokens, on a CPU. They are the one fp32 product whose rows round by the row count
    (MKL, for small counts) and whose output a bf16 kernel rounds next: a prompt prefilled
    beside other rows stored KV that a lone prefill would not give, and a later request that
    reused it answered differently (the history property test caught it on SmolLM2)."""
    return x.device.type == "cpu" and (getattr(_state, "prompt", False) or getattr(_state, "products", False))


def _wide(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """float64 for a floating tensor (an additive mask, a position bias); booleans as they are."""
    if tensor is None or not tensor.is_floating_point():
        return tensor
    return tensor.double()


def wide_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention`, for prompt tokens on a CPU in float64 (`wide`)."""
    if not wide(query):
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, scale=scale, enable_gqa=enable_gqa
        )
    out = F.scaled_dot_product_attention(
        query.double(), key.double(), value.double(), attn_mask=_wide(attn_mask), scale=scale, enable_gqa=enable_gqa
    )
    return out.to(query.dtype)


def wide_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention function, for prompt tokens on a CPU in float64 (`wide`),
    returned in the query's dtype."""
    if not wide(query):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if "position_bias" in kwargs:
        kwargs["position_bias"] = _wide(kwargs["position_bias"])
    out, weights = sdpa_attention_forward(
        module, query.double(), key.double(), value.double(), _wide(attention_mask), dropout, scaling, **kwargs
    )
    return out.to(query.dtype), weights


AttentionInterface.register(WIDE, wide_attention)
AttentionMaskInterface.register(WIDE, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def attention_configs(config: Any) -> list[Any]:
    """The configs whose `_attn_implementation` a model's layers read: its own, and its text
    model's where it has one (multimodal wrappers), each once."""
    text = getattr(config, "get_text_config", lambda: None)()
    return list({id(c): c for c in (config, text) if c is not None}.values())


def use_wide_attention(model: Any, device: torch.device) -> bool:
    """On a CPU, switch the model's SDPA attention to `WIDE`; returns whether it now runs so.
    Models with attention of their own (Falcon, BLOOM, GPT-2's eager path) keep it."""
    if device.type != "cpu":
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "_supports_attention_backend", False):
        return False
    configs = attention_configs(base.config)
    if any(getattr(c, "_attn_implementation", None) not in ("sdpa", WIDE) for c in configs):
        return False
    for config in configs:
        config._attn_implementation = WIDE
    return True
