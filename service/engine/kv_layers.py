"""The KV tensors as every part of the engine handles them: per layer, keys and values
[rows, heads, columns, dim], left-padded where rows of several lengths share a cache. The bottom
of the engine: it imports nothing of it.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

Layers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer, keys and values [rows, heads, columns, dim]


def cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the keys and values a DynamicCache holds."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Left-pad with zeros to `width` columns: the last dimension of a [rows, columns] mask, the
    third of [rows, heads, columns, dim] keys or values."""
    dim = -1 if tensor.dim() == 2 else -2
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def to_cache(layers: Layers) -> DynamicCache:
    """A DynamicCache holding these keys and values."""
    cache = DynamicCache()
    for index, (keys, values) in enumerate(layers):
        cache.update(keys, values, index)
    return cache


def stack_rows(rows: list[Layers]) -> tuple[DynamicCache, torch.Tensor]:
    """One left-padded cache of several one-row KVs (as a batched prefill leaves it), and its
    0/1 mask [rows, longest]: the rows join the running batch in one copy, not one each."""
    lengths = [layers[0][0].shape[2] for layers in rows]
    width = max(lengths)
    cache = DynamicCache()
    for index in range(len(rows[0])):
        keys, values = (torch.cat([pad_left(layers[index][kind], width) for layers in rows]) for kind in (0, 1))
        cache.update(keys, values, index)
    device = rows[0][0][0].device
    starts = torch.tensor([width - n for n in lengths], device=device)
    mask = (torch.arange(width, device=device)[None] >= starts[:, None]).long()
    return cache, mask
