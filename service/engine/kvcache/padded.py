"""`PaddedKV`: the running batch's rows, left-padded in a transformers `DynamicCache`.

A joining request's cache is padded (or the batch's is) when it joins, rows are dropped with
`batch_select_indices` when they leave, and columns that became padding in every row are cut
off. Every step grows every layer's tensors by one column (a copy of the whole cache).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from service.engine.packed import Piece
from service.engine.prefix import cache_layers, pad_left
from service.engine.runner import ModelRunner


class PaddedKV:
    """Left-padded rows in a DynamicCache that grows by one column a step."""

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
        if self._cache is None:
            self._cache, self._mask = cache, new_mask
            return
        width = max(self._mask.shape[1], new_mask.shape[1])
        self._mask = torch.cat([pad_left(self._mask, width), pad_left(new_mask, width)], dim=0)
        for running, joining in zip(self._cache.layers, cache.layers, strict=True):
            running.keys = torch.cat([pad_left(running.keys, width), pad_left(joining.keys, width)])
            running.values = torch.cat([pad_left(running.values, width), pad_left(joining.values, width)])

    def decode(self, tokens: list[int], positions: list[int], adapters: list[str | None]) -> torch.Tensor:
        mask = torch.cat([self._mask, self._mask.new_ones((len(tokens), 1))], dim=1)
        logits = self.runner.decode_batch(tokens, self._cache, mask, positions, adapters)
        self._mask = mask
        return logits

    def step_packed(
        self, tokens: list[int], positions: list[int], adapters: list[str | None], pieces: list[Piece]
    ) -> tuple[torch.Tensor, list]:
        """`decode` with `pieces` of joining prompts in the same forward pass (packed.py): the
        logits of each row's token, then of each piece's last [rows + pieces, vocab], and each
        piece's KV."""
        running = cache_layers(self._cache) if tokens else None
        mask = self._mask if tokens else None
        logits, grown, done = self.runner.step_packed(running, mask, tokens, positions, adapters, pieces)
        if grown is not None:
            for layer, (keys, values) in zip(self._cache.layers, grown, strict=True):
                layer.keys, layer.values = keys, values
            self._mask = torch.cat([self._mask, self._mask.new_ones((len(tokens), 1))], dim=1)
        return logits, done

    def retain(self, keep: list[int]) -> list[int]:
        """Drop the other rows, then the columns that are padding in every remaining row; return
        the kept rows' old indices in their new order (unchanged here)."""
        if not keep:
            self.clear()
            return keep
        index = torch.tensor(keep, device=self.runner.device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        lead = int(self._mask.argmax(dim=1).min())  # first valid column of the earliest row
        if lead:
            self._mask = self._mask[:, lead:]
            for layer in self._cache.layers:
                layer.keys = layer.keys[..., lead:, :]
                layer.values = layer.values[..., lead:, :]
        return keep

    def clear(self) -> None:
        self._cache = self._mask = None
