"""Prefix reuse: the KV of prompt prefixes already computed, for later prompts that share them.

Requests on one adapter share text: the adapter's template before its first input field, a
system prompt, a few-shot block. After each prefill the engine stores the prompt's keys and
values, cut to whole blocks of `BLOCK` tokens; a later prompt on the same adapter version that
starts with the same blocks prefills only the rest, after a copy of the stored ones.

Entries are keyed by the adapter version's engine key (`name@version`, "base" for the base) and
a hash chain over the blocks (each block's hash covers every block before it), so a hit needs
the same adapter version and the same tokens from the first one; the tokens are compared too,
so a hash collision cannot serve another prompt's KV. Nothing is ever shared across adapters or
versions. Memory is bounded by `max_bytes`, least recently used entries evicted first. At least
one token of every prompt is always computed, for the logits of its last position.

Models whose cache is not plain full attention (sliding windows, ALiBi biases built from the
mask) get no prefix reuse: `unsupported` says why.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from service.engine.kv_layers import cache_layers  # noqa: F401  (its callers' old home)
from service.names import BASE

BLOCK = 4  # tokens per block: the granularity of a hit (a short template prefix is one)


@dataclass
class _Entry:
    owner: str
    tokens: tuple[int, ...]
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, keys and values [1, heads, n, dim]
    nbytes: int
    keys: list[tuple[str, int]] = field(default_factory=list)  # its index entries


@dataclass(frozen=True)
class Hit:
    """A stored prefix for a prompt: its length and a fresh cache holding its KV."""

    length: int
    cache: Any


class PrefixCache:
    def __init__(
        self,
        max_bytes: int,
        *,
        on_lookup: Callable[[bool, int], None] | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ):
        self.max_bytes = max_bytes
        self._on_lookup = on_lookup or (lambda hit, tokens: None)  # (hit, tokens reused)
        self._on_bytes = on_bytes or (lambda nbytes: None)
        self._index: dict[tuple[str, int], tuple[_Entry, int]] = {}  # (owner, chain) -> entry, tokens
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # id -> entry, least recent first
        self.nbytes = 0

    @staticmethod
    def _chain(tokens: tuple[int, ...]) -> list[int]:
        """The hash chain of the whole blocks of `tokens`: element i covers blocks 0..i."""
        chain, value = [], 0
        for start in range(0, len(tokens) - len(tokens) % BLOCK, BLOCK):
            value = hash((value, tokens[start : start + BLOCK]))
            chain.append(value)
        return chain

    def lookup(self, owner: str, prompt: tuple[int, ...], make_cache: Callable[[], Any]) -> Hit | None:
        """The longest stored prefix of `prompt` (whole blocks, at least one token left to
        compute) for this adapter version, as a new cache; None on a miss."""
        usable = prompt[: len(prompt) - 1]  # the last token is always computed
        chain = self._chain(usable)
        for blocks in range(len(chain), 0, -1):
            found = self._index.get((owner, chain[blocks - 1]))
            if found is None:
                continue
            entry, length = found
            if entry.tokens[:length] != usable[:length]:
                continue  # a hash collision: not this prompt's prefix
            self._entries.move_to_end(id(entry))
            cache = make_cache()
            for layer, (keys, values) in enumerate(entry.layers):
                cache.update(keys[:, :, :length].clone(), values[:, :, :length].clone(), layer)
            self._on_lookup(True, length)
            return Hit(length, cache)
        self._on_lookup(False, 0)
        return None

    def store(self, owner: str, prompt: tuple[int, ...], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep the KV of `prompt`'s whole blocks (`layers`: per layer, keys and values covering
        at least those positions, [1, heads, positions, dim], copied here)."""
        chain = self._chain(prompt)
        if not chain or self.max_bytes <= 0:
            return
        length = len(chain) * BLOCK
        known = self._index.get((owner, chain[-1]))
        if known is not None and known[0].tokens[:length] == prompt[:length]:
            self._entries.move_to_end(id(known[0]))
            return  # this prefix is stored already
        # Sized from the shapes before anything is copied: a prompt larger than the whole cache
        # is never cloned (security review H3).
        nbytes = sum((k[:, :, :length].numel() + v[:, :, :length].numel()) * k.element_size() for k, v in layers)
        if nbytes > self.max_bytes:
            return
        kept = [(k[:, :, :length].clone(), v[:, :, :length].clone()) for k, v in layers]
        entry = _Entry(owner, prompt[:length], kept, nbytes)
        for blocks, value in enumerate(chain, start=1):
            entry.keys.append((owner, value))
            self._index[(owner, value)] = (entry, blocks * BLOCK)
        self._entries[id(entry)] = entry
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes:
            self._evict(next(iter(self._entries.values())))
        self._on_bytes(self.nbytes)

    def _evict(self, entry: _Entry) -> None:
        del self._entries[id(entry)]
        self.nbytes -= entry.nbytes
        for key in entry.keys:
            found = self._index.get(key)
            if found is not None and found[0] is entry:
                del self._index[key]

    def __len__(self) -> int:
        return len(self._entries)


def unsupported(runner: Any, max_context: int | None = None) -> str | None:
    """Why prefix reuse cannot serve this model (None: it can), for prompts and completions of
    at most `max_context` tokens (None: any length)."""
    if runner.mask_2d:
        return "ALiBi biases are built from the attention mask"
    return not_full_attention(runner.model.config, max_context)


def not_full_attention(config: Any, max_context: int | None = None) -> str | None:
    """Why the model's layers are not all full attention over sequences of `max_context` tokens
    (None: they are). A sliding window at least that long never slides: such layers compute
    what full attention does (Mistral-7B-v0.1, window 4096, served with MAX_MODEL_LEN <= 4096)."""
    config = getattr(config, "get_text_config", lambda: config)()
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    window = getattr(config, "sliding_window", None)
    if kinds - {"full_attention", "sliding_attention"}:
        return f"the model has layers other than full attention ({sorted(kinds)})"
    if not window and kinds == {"full_attention"}:
        return None
    if window and max_context is not None and window >= max_context:
        return None
    return (
        f"the model has sliding-window layers (window {window}) shorter than the context "
        f"({max_context}); MAX_MODEL_LEN at most {window} serves them as full attention"
    )


def owner(key: Any, tenant: str | None) -> str:
    """Whose stored prefixes a request may use: its tenant's, on its adapter version (`key`,
    None for the base). The tenant salts the key, as vLLM's `cache_salt` does: no tenant is
    served another's KV, nor learns from a hit (or a faster first token) what another sent."""
    name = str(key) if key is not None else BASE
    return name if tenant is None else f"{tenant}/{name}"
