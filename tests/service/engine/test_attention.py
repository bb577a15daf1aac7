"""Attention in float64 for prompt tokens on CPUs (service/engine/attention.py): a prompt's
attention gives the same bits whether it runs whole, as the rest after stored keys, or
left-padded in a batch; plain fp32 SDPA does not (the kernels sum in another order)."""

from __future__ import annotations

import pytest
import torch

from service.engine.attention import prompt_pass, wide, wide_sdpa


def qkv(tokens: int, heads: int = 9, kv_heads: int = 3, dim: int = 64, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, heads, tokens, dim, generator=generator),
        torch.randn(1, kv_heads, tokens, dim, generator=generator),
        torch.randn(1, kv_heads, tokens, dim, generator=generator),
    )


def causal(queries: int, keys: int) -> torch.Tensor:
    """The mask of the last `queries` positions over `keys` keys, [1, 1, queries, keys]."""
    return torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)[None, None]


def whole_and_rest(attend, tokens: int, stored: int) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = qkv(tokens)
    whole = attend(q, k, v, causal(tokens, tokens))[:, :, stored:]
    with prompt_pass():
        rest = attend(q[:, :, stored:], k, v, causal(tokens - stored, tokens))
    return whole, rest


def narrow(q, k, v, mask):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def widened(q, k, v, mask):
    return wide_sdpa(q, k, v, mask, enable_gqa=True)


@pytest.mark.parametrize(("tokens", "stored"), [(5, 4), (9, 8), (12, 4), (40, 36)])
def test_the_rest_of_a_prompt_after_stored_keys_gives_the_whole_prompts_bits(tokens, stored):
    whole, rest = whole_and_rest(widened, tokens, stored)
    assert torch.equal(whole, rest)
    assert whole.dtype == torch.float32


def test_plain_fp32_attention_does_not_which_is_why_prompts_run_wide():
    """The reason for the module: if this starts passing, fp32 SDPA became invariant here."""
    diffs = [(a - b).abs().max().item() for a, b in (whole_and_rest(narrow, 5, 4), whole_and_rest(narrow, 9, 8))]
    assert max(diffs) > 0


def test_left_padding_does_not_change_a_prompts_bits():
    q, k, v = qkv(7)
    alone = widened(q, k, v, causal(7, 7))
    pad = 3  # the row left-padded to 10 columns in a batch, its padding masked
    keys, values = (torch.cat([torch.zeros(1, 3, pad, 64), t], dim=2) for t in (k, v))
    mask = torch.cat([torch.zeros(1, 1, 7, pad, dtype=torch.bool), causal(7, 7)], dim=3)
    assert torch.equal(widened(q, keys, values, mask), alone)


def test_only_prompt_tokens_run_wide():
    one, many = torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 3, 8)
    assert wide(many) and not wide(one)  # a decode step's single query stays fp32
    with prompt_pass():
        assert wide(one)  # the rest of a prompt after stored keys
    assert not wide(one)
