"""Mixed-adapter LoRA for the engine's batches, in three tensor operations per layer.

PEFT's mixed-batch forward (`adapter_names=`) loops over the adapters present in a batch and,
for each, gathers its rows, runs its A and B and scatters the result back: the number of
operations per layer grows with the adapters present, and on small batches their overhead is
the cost (on CPU, LoRA nearly doubled a 16-row SmolLM2 decode step, docs/benchmarks.md). Here a
layer multiplies every row by the A matrices of all the batch's adapters stacked (one matmul),
zeroes, per row, the blocks of the other adapters (one multiply by a row mask), and applies the
stacked B matrices with the scalings folded in (one matmul, added to the base output). The
extra arithmetic (every row through every adapter's rank) is small next to the base layer.

Only plain LoRA on linear layers is fused; a layer with a LoRA variant (DoRA, aLoRA) or a LoRA
bias keeps PEFT's own path. The result equals PEFT's up to floating-point summation order
(tests/service/test_lora.py).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from peft.tuners.lora.layer import VARIANT_KWARG_KEYS

from service.engine import BASE_ADAPTER

_MAX_MASKS = 256  # cached row masks (one per batch composition and layer layout)


class FusedMixedLoRA:
    def __init__(self) -> None:
        self._installed_for: tuple | None = None
        self._stacks: dict[tuple[int, tuple[str, ...]], tuple] = {}
        self._masks: dict[tuple, torch.Tensor] = {}

    def install(self, model: Any) -> None:
        """Patch the model's LoRA layers, once per set of loaded adapters."""
        key = (id(model), tuple(model.peft_config))
        if key == self._installed_for:
            return
        from peft.tuners.lora import LoraLayer

        self._stacks.clear()
        self._masks.clear()
        for module in model.modules():
            if not isinstance(module, LoraLayer) or not isinstance(module.get_base_layer(), torch.nn.Linear):
                continue
            if getattr(module, "fan_in_fan_out", False):
                continue
            if "_hotswap_peft_mixed" not in module.__dict__:
                module._hotswap_peft_mixed = module._mixed_batch_forward  # PEFT's, for fallbacks
                module._mixed_batch_forward = partial(self._forward, module)
        self._installed_for = key

    def _forward(self, layer: Any, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any):
        present = tuple(sorted(set(adapter_names) - {BASE_ADAPTER}))
        own = tuple(a for a in present if a in layer.lora_A)
        if any(a in layer.lora_variant or layer.lora_bias.get(a, False) for a in own):
            return layer._hotswap_peft_mixed(x, *args, adapter_names=adapter_names, **kwargs)
        for key in VARIANT_KWARG_KEYS:  # aLoRA's per-call arguments; never for the base layer
            kwargs.pop(key, None)
        result = layer.base_layer(x, *args, **kwargs)
        if not own:
            return result
        stacked_a, stacked_b, blocks = self._stack(layer, own)
        mask = self._mask(adapter_names, blocks, stacked_a.shape[0], x.device, stacked_a.dtype)
        h = torch.matmul(x.to(stacked_a.dtype), stacked_a.t())  # [rows, (tokens,) sum of ranks]
        h = h * (mask if h.dim() == 2 else mask.unsqueeze(1))
        return result + torch.matmul(h, stacked_b.t()).to(result.dtype)

    def _stack(self, layer: Any, adapters: tuple[str, ...]) -> tuple:
        key = (id(layer), adapters)
        sources = tuple(layer.lora_A[n].weight for n in adapters) + tuple(layer.lora_B[n].weight for n in adapters)
        cached = self._stacks.get(key)
        # Holding the source parameters keeps their identity meaningful: a reloaded adapter has
        # new ones, and its stack is rebuilt.
        if cached is None or any(x is not y for x, y in zip(cached[3], sources, strict=True)):
            a = [layer.lora_A[n].weight for n in adapters]
            b = [layer.lora_B[n].weight * layer.scaling[n] for n in adapters]
            blocks, start = [], 0
            for name, weight in zip(adapters, a, strict=True):
                blocks.append((name, start, start + weight.shape[0]))
                start += weight.shape[0]
            cached = (torch.cat(a).detach(), torch.cat(b, dim=1).detach(), tuple(blocks), sources)
            self._stacks[key] = cached
        return cached[:3]

    def _mask(self, names: list[str], blocks: tuple, width: int, device, dtype) -> torch.Tensor:
        key = (tuple(names), blocks)
        mask = self._masks.get(key)
        if mask is None:
            if len(self._masks) >= _MAX_MASKS:
                self._masks.clear()
            mask = torch.zeros((len(names), width), dtype=dtype)
            spans = {name: (start, end) for name, start, end in blocks}
            for row, name in enumerate(names):
                if name in spans:
                    mask[row, spans[name][0] : spans[name][1]] = 1
            mask = self._masks[key] = mask.to(device)
        return mask
