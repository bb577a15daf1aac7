"""Mixed-adapter LoRA for the engine's batches, in three tensor operations per layer.

PEFT's mixed-batch forward (`adapter_names=`) loops over the adapters present in a batch and,
for each, gathers its rows, runs its A and B and scatters the result back: the number of
operations per layer grows with the adapters present, and on small batches their overhead is
the cost (on CPU, LoRA nearly doubled a 16-row SmolLM2 decode step, docs/benchmarks.md). Here a
layer multiplies every row by the A matrices of all the batch's adapters stacked (one matmul),
zeroes, per row, the blocks of the other adapters (one multiply by a row mask), and applies the
stacked B matrices with the scalings folded in (one matmul, added to the base output). The
extra arithmetic (every row through every adapter's rank) is small next to the base layer.

The runner does not pass `adapter_names` to PEFT, whose per-call setup walks every module and
hooks every LoRA layer: each LoRA layer's `forward` is replaced by one that reads the rows'
adapters from this object (`names`, set by the runner around its forward pass) and falls back
to PEFT's forward whenever `names` is unset. If any LoRA layer cannot be fused (not a linear
layer), the runner passes `adapter_names` as before. A layer with a LoRA variant (DoRA, aLoRA)
or a LoRA bias goes through PEFT's mixed-batch code. The result equals PEFT's up to floating-point summation order
(tests/service/test_lora.py).

For CUDA graphs (service/engine/kvcache.py) the routing must not create tensors while a graph is
captured or change them between replays by anything but an in-place copy: `route_static` stacks
every loaded adapter in every layer (a row of an adapter absent from the batch multiplies zeros)
and keeps one row-mask buffer per batch size and layer layout, rewritten in place before each
forward pass; `signature` changes whenever an adapter is loaded, removed or reloaded, which
invalidates the graphs captured over the old weights.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from peft.tuners.lora.layer import VARIANT_KWARG_KEYS

from service.engine import BASE_ADAPTER

_MAX_MASKS = 256  # cached row masks (one per batch composition and layer layout)


class FusedMixedLoRA:
    """One per model (`for_model`): the patched layers consult this object's `names`."""

    @classmethod
    def for_model(cls, model: Any) -> FusedMixedLoRA:
        fused = model.__dict__.get("_hotswap_fused_lora")
        if fused is None:
            fused = model.__dict__["_hotswap_fused_lora"] = cls()
        return fused

    def __init__(self) -> None:
        # The rows' adapters during a forward pass of the runner; None outside one. Set through
        # `route`, which also works out once per pass what every layer needs of them.
        self.names: tuple[str, ...] | None = None
        self._present: tuple[str, ...] = ()
        # Every LoRA layer of the model is fused: the runner may then skip PEFT's per-call
        # `adapter_names` machinery (a walk over all modules and a hook per layer, each call).
        self.complete = False
        self._installed_for: tuple | None = None
        self._stacks: dict[tuple[int, tuple[str, ...]], tuple] = {}
        self._masks: dict[tuple, torch.Tensor] = {}
        # Static routing (CUDA graphs): row masks rewritten in place, per (rows, layer layout).
        self._static = False
        self._static_masks: dict[tuple[int, tuple], torch.Tensor] = {}
        self._loaded: tuple[str, ...] = ()
        self._probes: dict[str, Any] = {}  # per adapter, one LoRA layer holding it

    def install(self, model: Any) -> None:
        """Patch the model's LoRA layers, once per set of loaded adapters."""
        key = (id(model), tuple(model.peft_config))
        if key == self._installed_for:
            return
        from peft.tuners.lora import LoraLayer

        self._stacks.clear()
        self._masks.clear()
        self._static_masks.clear()
        self._loaded = tuple(sorted(model.peft_config))
        self._probes = {}
        self.complete = True
        for module in model.modules():
            if not isinstance(module, LoraLayer):
                continue
            for name in module.lora_A:
                self._probes.setdefault(name, module)
            if not isinstance(module.get_base_layer(), torch.nn.Linear) or getattr(module, "fan_in_fan_out", False):
                self.complete = False
                continue
            if "_hotswap_peft_forward" not in module.__dict__:
                module._hotswap_peft_forward = module.forward  # PEFT's, used whenever names is None
                module.forward = partial(self._layer_forward, module)
        self._installed_for = key

    def route(self, names: list[str] | None) -> None:
        """Set the rows' adapters for the next forward pass (None after it)."""
        self.names = None if names is None else tuple(names)
        self._present = tuple(sorted(set(names or ()) - {BASE_ADAPTER}))
        self._static = False

    def route_static(self, names: list[str], *, fill: bool = True) -> None:
        """Route the next forward pass (captured or replayed) through every loaded adapter, with
        the rows' choice in the mask buffers, which are rewritten in place here (not while a
        graph is captured: `fill=False`, after warm-up passes with the same rows)."""
        unknown = set(names) - {BASE_ADAPTER} - set(self._loaded)
        if unknown:
            raise ValueError(f"adapters not loaded: {sorted(unknown)}")
        self.names = tuple(names)
        self._present = self._loaded
        self._static = True
        for (rows, blocks), buffer in self._static_masks.items():
            if fill and rows == len(names):
                buffer.copy_(self._row_mask(self.names, blocks, buffer.shape[1], buffer.device, buffer.dtype))

    def signature(self) -> tuple:
        """Changes whenever the loaded adapters or their weights do (a reload makes new ones)."""
        return self._installed_for, tuple(
            (name, id(self._probes[name].lora_A[name].weight) if name in self._probes else None)
            for name in self._loaded
        )

    def _layer_forward(self, layer: Any, x: torch.Tensor, *args: Any, **kwargs: Any):
        """A LoRA layer's forward: the fused mixed batch while the runner has set `names`."""
        names = self.names
        if names is None or "adapter_names" in kwargs or layer.disable_adapters or layer.merged:
            return layer._hotswap_peft_forward(x, *args, **kwargs)
        own = tuple(a for a in self._present if a in layer.lora_A)
        if any(a in layer.lora_variant or layer.lora_bias.get(a, False) for a in own):
            return layer._mixed_batch_forward(x, *args, adapter_names=list(names), **kwargs)
        for key in VARIANT_KWARG_KEYS:  # aLoRA's per-call arguments; never for the base layer
            kwargs.pop(key, None)
        result = layer.base_layer(x, *args, **kwargs)
        if not own:
            return result
        a_t, b_t, blocks = self._stack(layer, own)  # [in, ranks], [ranks, out]
        mask = self._mask(names, blocks, a_t.shape[1], x.device, a_t.dtype)
        h = torch.matmul(x.to(a_t.dtype), a_t)  # [rows, (tokens,) sum of ranks]
        h.mul_(mask if h.dim() == 2 else mask.unsqueeze(1))
        return result + torch.matmul(h, b_t).to(result.dtype)  # the base output is left untouched

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
            # Transposed views, not contiguous copies: with copies the BLAS path changed enough
            # that nf4 log-probabilities moved 0.31 nats from single-request generate
            # (tests/test_batched_smollm2.py's bound is 0.25).
            a_t = torch.cat(a).detach().t()
            b_t = torch.cat(b, dim=1).detach().t()
            cached = (a_t, b_t, tuple(blocks), sources)
            self._stacks[key] = cached
        return cached[:3]

    def _mask(self, names: tuple[str, ...], blocks: tuple, width: int, device, dtype) -> torch.Tensor:
        if not self._static:
            return self._row_mask(names, blocks, width, device, dtype)
        buffer = self._static_masks.get((len(names), blocks))
        if buffer is None:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("a LoRA row mask was first needed during CUDA graph capture")
            buffer = self._row_mask(names, blocks, width, device, dtype).clone()
            self._static_masks[(len(names), blocks)] = buffer
        return buffer

    def _row_mask(self, names: tuple[str, ...], blocks: tuple, width: int, device, dtype) -> torch.Tensor:
        key = (names, blocks)
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
