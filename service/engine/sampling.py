"""Per-request sampling and log-probabilities over one row of logits (pure torch, no model)."""

from __future__ import annotations

import random

import torch

from service.engine import SamplingParams, TokenLogprob


def make_generator(seed: int | None, device: str | torch.device) -> torch.Generator:
    """A generator of the request's own: `seed` makes its samples reproducible across runs."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed % (2**63) if seed is not None else random.getrandbits(63))
    return generator


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Pick the next token from a 1-D row of logits: greedy at temperature 0, else top-p."""
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprob(logprobs: torch.Tensor, token_id: int, top_k: int) -> TokenLogprob:
    """The model's log-probability of `token_id`, with the `top_k` most likely alternatives.

    Log-probabilities are of the raw model distribution (before temperature and top-p), as
    OpenAI and vLLM report them.
    """
    top: tuple[tuple[int, float], ...] = ()
    if top_k > 0:
        values, indices = torch.topk(logprobs, top_k)
        # A grammar's mask leaves fewer than top_k possible tokens: the impossible ones are not
        # alternatives (and -inf is no JSON number).
        top = tuple((i, v) for i, v in zip(indices.tolist(), values.tolist(), strict=True) if v != float("-inf"))
    return TokenLogprob(token_id=token_id, logprob=float(logprobs[token_id]), top=top)
