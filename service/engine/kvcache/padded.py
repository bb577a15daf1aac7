"""`PaddedKV`: the running batch's rows, left-padded in a transformers `DynamicCache`.

A joining request's cache is padded (or the batch's is) when it joins, rows are dropped with
`batch_select_indices` when they leave, and columns that became padding in every row are cut
off. Every step adds one column to every layer. transformers' `DynamicLayer` does that with a
concatenation, a copy of the whole cache per step, a fifth of a CPU step beside a long row
(docs/benchmarks.md). Here the layers
keep spare columns after their last (`SpareLayer`, an eighth more), so a step writes its column
in place, and the cache is copied only when the rows change (a join, a leave) or the spare runs
out.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from service.engine.kv_layers import cache_layers, pad_left
from service.engine.packed import Piece
from service.engine.runner import ModelRunner


def cache_grower(cache: DynamicCache):
    """A packed step's `grow`: append the rows' new column to their cache's layer in place."""

    def grow(layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return cache.layers[layer].update(keys, values)

    return grow


class PaddedKV:
    """Left-padded rows in a DynamicCache that grows by one column a step."""

    packable = True  # pieces of joining prompts ride in its decode steps (step_packed)
    graphs = False

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # [rows, cache length], 0 on left padding

    def join(self, cache: DynamicCache, new_mask: torch.Tensor) -> None:
        """Add freshly prefilled rows (their cache and mask, left-padded) after the running ones."""
        lead = int(new_mask.argmax(dim=1).min())  # columns that are padding in every new row
        if lead:
            new_mask = new_mask[:, lead:]
            for layer in cache.layers:
                layer.keys = layer.keys[..., lead:, :]
                layer.values = layer.values[..., lead:, :]
        if self._cache is None or self._mask is None:
            cache.layers = [SpareLayer.adopt(layer) for layer in cache.layers]
            self._cache, self._mask = cache, new_mask
            return
        width = max(self._mask.shape[1], new_mask.shape[1])
        self._mask = torch.cat([pad_left(self._mask, width), pad_left(new_mask, width)], dim=0)
        for running, joining in zip(self._cache.layers, cache.layers, strict=True):
            running.keys = torch.cat([pad_left(running.keys, width), pad_left(joining.keys, width)])
            running.values = torch.cat([pad_left(running.values, width), pad_left(joining.values, width)])

    def decode(self, tokens: list[int], positions: list[int], adapters: list[str | None]) -> torch.Tensor:
        cache, mask = self._batch()
        mask = torch.cat([mask, mask.new_ones((len(tokens), 1))], dim=1)
        logits = self.runner.decode_batch(tokens, cache, mask, positions, adapters)
        self._mask = mask
        return logits

    def _batch(self) -> tuple[DynamicCache, torch.Tensor]:
        """The running rows' cache and mask (the engine steps and retains only when rows run)."""
        if self._cache is None or self._mask is None:
            raise RuntimeError("the KV cache holds no rows")
        return self._cache, self._mask

    def step_packed(
        self, tokens: list[int], positions: list[int], adapters: list[str | None], pieces: list[Piece]
    ) -> tuple[torch.Tensor, list]:
        """`decode` with `pieces` of joining prompts in the same forward pass (packed.py): the
        logits of each row's token, then of each piece's last [rows + pieces, vocab], and each
        piece's KV."""
        if not tokens:
            logits, _, done = self.runner.step_packed(None, None, tokens, positions, adapters, pieces)
            return logits, done
        cache, mask = self._batch()
        logits, grown, done = self.runner.step_packed(
            cache_layers(cache), mask, tokens, positions, adapters, pieces, cache_grower(cache)
        )
        if grown is not None:  # the rows' layers grew themselves, through cache_grower
            self._mask = torch.cat([mask, mask.new_ones((len(tokens), 1))], dim=1)
        return logits, done

    def retain(self, keep: list[int]) -> list[int]:
        """Drop the other rows, then the columns that are padding in every remaining row; return
        the kept rows' old indices in their new order (unchanged here)."""
        if not keep:
            self.clear()
            return keep
        cache, mask = self._batch()
        index = torch.tensor(keep, device=self.runner.device)
        cache.batch_select_indices(index)
        mask = self._mask = mask[index]
        lead = int(mask.argmax(dim=1).min())  # first valid column of the earliest row
        if lead:
            self._mask = mask[:, lead:]
            for layer in cache.layers:
                layer.keys = layer.keys[..., lead:, :]
                layer.values = layer.values[..., lead:, :]
        return keep

    def clear(self) -> None:
        self._cache = self._mask = None


class SpareLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are the first columns of buffers with spare ones
    after them: `update` writes new columns into the spare in place. The layer holds its
    buffers, so nothing else can see the spare; when its keys are replaced from outside (rows
    joined, left or cut), they are no longer a view of the buffer, and the next update copies
    them into a new one."""

    keys: torch.Tensor
    values: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def adopt(cls, layer: DynamicLayer) -> DynamicLayer:
        """The layer as a SpareLayer (its tensors untouched); other kinds (sliding) as they are."""
        if type(layer) is not DynamicLayer:
            return layer
        spare = cls()
        spare.__dict__.update(layer.__dict__)
        return spare

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized or self.keys.numel() == 0:
            return super().update(key_states, value_states, *args, **kwargs)
        keys, values = self._buffers or (None, None)
        self.keys, keys = _extend(self.keys, keys, key_states)
        self.values, values = _extend(self.values, values, value_states)
        self._buffers = keys, values
        return self.keys, self.values


def _extend(view: torch.Tensor, buffer: torch.Tensor | None, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`view` [rows, heads, columns, dim] with `new` columns after its own: in place when `view`
    is the first columns of `buffer` and the spare holds them, else in a new buffer with an
    eighth more columns spare (at least 32): at most 12.5% more KV memory where memory is
    short (a GPU whose static cache did not fit), and a copy every eighth of the length in
    steps rather than one every step. Returns the longer view and its buffer."""
    length, added = view.shape[-2], new.shape[-2]
    in_place = (
        buffer is not None
        and view.data_ptr() == buffer.data_ptr()
        and view.stride() == buffer.stride()
        and view.shape[:-2] == buffer.shape[:-2]
        and length + added <= buffer.shape[-2]
    )
    if buffer is None or not in_place:
        size = length + added + max(32, (length + added) // 8)
        buffer = view.new_empty((*view.shape[:-2], size, view.shape[-1]))
        buffer[..., :length, :] = view
    buffer[..., length : length + added, :] = new
    return buffer[..., : length + added, :], buffer
