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

Two layouts of the stacked weights. The pool (below) stacks every loaded adapter once, and is
what the runner uses whenever every adapter fits it (no LoRA variant or bias): its memory is
fixed and a swap rewrites one slot in place. Otherwise each batch's own composition is stacked,
and the stacks of the 16 most recent compositions are kept.

For CUDA graphs (service/engine/kvcache/slots.py) the routing must not create tensors while a graph is
captured, nor change them between replays by anything but an in-place copy. The POOL layout runs
every layer through an adapter pool (`_Pool`): per LoRA layer, one A and one B buffer with a
fixed slot (of the pool's rank, zero-padded) for each resident adapter, and one row mask per row
count, rewritten in place before each pass. Loading, evicting or reloading an adapter copies its
weights into a slot, or zeroes it, in place: captured graphs stay valid. Only a change of
structure (a newly wrapped layer, a higher rank, more adapters than slots) rebuilds the pool and
bumps `pool_version`, which the graphs are keyed on. Adapters with a LoRA variant or bias cannot
be pooled (`graph_ready` is False): their steps run eagerly.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import Any

import torch
from peft.tuners.lora.layer import VARIANT_KWARG_KEYS

from service.engine import PEFT_BASE
from service.engine.attention import wide_products

_MAX_MASKS = 256  # cached row masks (one per batch composition and layer layout)
# Batch compositions (sets of adapters present) whose stacked A and B are kept. Each holds a
# copy of its adapters' weights, and a fleet's batches pass through many compositions: without
# a bound they grew without end (gigabytes over 100 adapters). Least recently used out.
_MAX_STACK_SETS = 16


class Layout(Enum):
    """Which stacked weights a pass reads."""

    STACKS = "stacks"  # the batch's own composition of adapters, stacked (the last 16 kept)
    POOL = "pool"  # every loaded adapter in one fixed pool, a row mask per pass (CUDA graphs)


@dataclass(frozen=True)
class LoRARouting:
    """One forward pass's routing, set in one call (`FusedMixedLoRA.route`) and read by every
    patched layer: each row's adapter (PEFT_BASE for the base), or each token's in a packed pass."""

    names: tuple[str, ...]
    layout: Layout = Layout.STACKS
    per_token: bool = False  # one row whose tokens each have their own adapter (packed.py)
    fill: bool = True  # POOL: rewrite the row mask (False while a CUDA graph is captured)


class FusedMixedLoRA:
    """One per model, owned by its `LoRAModel` (service/engine/model.py): the patched layers
    read the routing of the pass (`route`); nothing else writes this object's state."""

    def __init__(self, slots: int = 1) -> None:
        self._routing: LoRARouting | None = None  # the runner's pass's; None outside one
        self._present: tuple[str, ...] = ()
        # Every LoRA layer of the model is fused: the runner may then skip PEFT's per-call
        # `adapter_names` machinery (a walk over all modules and a hook per layer, each call).
        self.complete = False
        self._installed_for: tuple | None = None
        self._stacks: dict[tuple[int, tuple[str, ...]], tuple] = {}  # (layer, composition) -> stack
        self._stack_sets: OrderedDict[tuple[str, ...], None] = OrderedDict()  # compositions, LRU
        self._masks: dict[tuple, torch.Tensor] = {}
        # The adapter pool's row masks, one per row count (fixed buffers a CUDA graph reads).
        self._static_masks: dict[int, torch.Tensor] = {}
        self._loaded: tuple[str, ...] = ()
        self._probes: dict[str, Any] = {}  # per adapter, one LoRA layer holding it
        self._lora_layers: list[Any] = []
        # Adapters the pool holds before it must grow: at least the device slots
        # (MAX_RESIDENT_ADAPTERS, from LoRAModel), so that loads never change its shape.
        self.pool_slots = slots
        self._pool: _Pool | None = None
        self._pool_synced: tuple | None = None
        self._graph_ready = False
        self.pool_version = 0
        self._plain_for: tuple | None = None
        self._plain_now = False

    def install(self, model: Any) -> None:
        """Patch the model's LoRA layers, once per set of loaded adapters."""
        key = (id(model), tuple(model.peft_config))
        if key == self._installed_for:
            return
        from peft.tuners.lora import LoraLayer

        self._stacks.clear()
        self._stack_sets.clear()
        self._masks.clear()
        self._loaded = tuple(sorted(model.peft_config))
        self._probes = {}
        self._lora_layers = []
        self.complete = True
        for module in model.modules():
            if not isinstance(module, LoraLayer):
                continue
            self._lora_layers.append(module)
            for name in module.lora_A:
                self._probes.setdefault(name, module)
            if not isinstance(module.get_base_layer(), torch.nn.Linear) or getattr(module, "fan_in_fan_out", False):
                self.complete = False
                continue
            if "_hotswap_peft_forward" not in module.__dict__:
                module._hotswap_peft_forward = module.forward  # PEFT's, used whenever names is None
                module.forward = partial(self._layer_forward, module)
        self._installed_for = key

    @property
    def names(self) -> tuple[str, ...] | None:
        """The adapters of the pass running now (None outside one)."""
        return self._routing.names if self._routing is not None else None

    @property
    def packed(self) -> bool:
        return self._routing is not None and self._routing.per_token

    def route(self, routing: LoRARouting | None) -> None:
        """Set the next forward pass's routing (None after it): what every layer needs of it
        is worked out once here. The pool's row mask is rewritten in place (a captured graph
        reads it), except with `fill=False` while a graph is captured after warm-up passes with
        the same rows, when nothing may be copied or made."""
        self._routing = routing
        if routing is None:
            return
        if routing.layout is Layout.STACKS:
            self._present = tuple(sorted(set(routing.names) - {PEFT_BASE}))
            if self._present:
                self._remember(self._present)
            return
        unknown = set(routing.names) - {PEFT_BASE} - set(self._loaded)
        if unknown:
            self._routing = None
            raise ValueError(f"adapters not loaded: {sorted(unknown)}")
        if routing.fill:
            self._fill_mask(routing.names)

    def _remember(self, composition: tuple[str, ...]) -> None:
        """Keep the stacks of the most recent compositions only."""
        if composition in self._stack_sets:
            self._stack_sets.move_to_end(composition)
            return
        self._stack_sets[composition] = None
        while len(self._stack_sets) > _MAX_STACK_SETS:
            old, _ = self._stack_sets.popitem(last=False)
            self._stacks = {k: v for k, v in self._stacks.items() if k[1] != old}

    def _fill_mask(self, names: tuple[str, ...]) -> None:
        if not self.sync_pool() or self._pool is None:
            self._routing = None
            raise RuntimeError("static LoRA routing cannot serve adapters with a LoRA variant or bias")
        mask = self._static_masks.get(len(names))
        if mask is None:
            # A buffer of its own: the pool's masks are a cache, and this one is rewritten.
            with torch.inference_mode(False):  # rewritten in place later, in and out of it
                mask = self._static_masks[len(names)] = self._pool.row_mask(names).clone()
        else:
            mask.copy_(self._pool.row_mask(names))

    @property
    def compositions(self) -> tuple[tuple[str, ...], ...]:
        """The adapter compositions whose stacks are kept, least recently used first."""
        return tuple(self._stack_sets)

    @property
    def stacked(self) -> set[tuple[str, ...]]:
        """The compositions that have a stacked layer now (never more than `compositions`)."""
        return {composition for _, composition in self._stacks}

    def static_mask(self, rows: int) -> torch.Tensor:
        """The row mask the statically routed pass of `rows` rows reads (a fixed buffer)."""
        return self._static_masks[rows]

    def signature(self) -> tuple:
        """Changes whenever the loaded adapters or their weights do: a reload makes new tensors,
        a swap into a slot rewrites them in place (which bumps their version counter)."""
        return self._installed_for, tuple(
            (name, _identity(self._probes[name].lora_A[name].weight) if name in self._probes else None)
            for name in self._loaded
        )

    def sync_pool(self) -> bool:
        """Bring the pool in line with the loaded adapters, in place where the structure allows
        (else a new pool and `pool_version`). Returns whether the static routing can serve every
        loaded adapter: False with a LoRA variant or bias, or a layer that is not fused."""
        signature = self.signature()
        if signature == self._pool_synced:
            return self._graph_ready
        self._graph_ready = self._plain()
        if not self._graph_ready:
            self._pool_synced = signature
            return False
        # Every LoRA layer, also those no loaded adapter uses now (PEFT keeps the wrapper after
        # `delete_adapter`): evicting an adapter must not change the pool's structure.
        layers = self._lora_layers
        weights = [layer.lora_A[n].weight for layer in layers for n in layer.lora_A]
        rank = max((w.shape[0] for w in weights), default=1)
        dtype = torch.float32 if not weights else weights[0].dtype
        for weight in weights:  # the widest adapter dtype: no adapter computes below its own
            dtype = torch.promote_types(dtype, weight.dtype)
        device = weights[0].device if weights else next((x.get_base_layer().weight.device for x in layers), None)
        device = torch.device(device or "cpu")
        pool = self._pool
        if pool is None or not pool.fits(layers, rank, len(self._loaded), dtype):
            slots = max(self.pool_slots, len(self._loaded), pool.slots if pool else 0)
            rank = max(rank, pool.rank if pool else 0)
            pool = self._pool = _Pool(layers, slots, rank, dtype, device)
            self._static_masks.clear()
            self.pool_version += 1
        pool.update(self._loaded)
        self._pool_synced = signature
        return True

    def plain(self) -> bool:
        """Whether every loaded adapter runs through the fused layers alone (no layer left to
        PEFT, no LoRA variant or bias): what static routing and packed steps need."""
        signature = self.signature()
        if signature != self._plain_for:
            self._plain_for, self._plain_now = signature, self._plain()
        return self._plain_now

    def _plain(self) -> bool:
        return self.complete and not any(
            name in layer.lora_variant or layer.lora_bias.get(name, False)
            for layer in self._lora_layers
            for name in layer.lora_A
        )

    def _layer_forward(self, layer: Any, x: torch.Tensor, *args: Any, **kwargs: Any):
        """A LoRA layer's forward: the fused mixed batch while the runner has set `names`."""
        routing = self._routing
        if routing is None or "adapter_names" in kwargs or layer.disable_adapters or layer.merged:
            return layer._hotswap_peft_forward(x, *args, **kwargs)
        names = routing.names
        if routing.layout is Layout.POOL:  # every slot, the row mask picks (graph_ready: no variants)
            for key in VARIANT_KWARG_KEYS:
                kwargs.pop(key, None)
            result = layer.base_layer(x, *args, **kwargs)
            assert self._pool is not None  # route() synced it for this layout
            a_t, b_t = self._pool.buffers[id(layer)]  # the pool spans every LoRA layer
            mask = self._static_masks[len(names)]
        else:
            own = tuple(a for a in self._present if a in layer.lora_A)
            if any(a in layer.lora_variant or layer.lora_bias.get(a, False) for a in own):
                return layer._mixed_batch_forward(x, *args, adapter_names=list(names), **kwargs)
            for key in VARIANT_KWARG_KEYS:  # aLoRA's per-call arguments; never for the base layer
                kwargs.pop(key, None)
            result = layer.base_layer(x, *args, **kwargs)
            if not own:
                return result
            a_t, b_t, blocks = self._stack(layer, own, self._present)  # [in, ranks], [ranks, out]
            mask = self._row_mask(names, blocks, a_t.shape[1], x.device, a_t.dtype)
        if wide_products(x):  # a prompt's products: the same bits whatever shares the pass (attention.py)
            a_t, b_t, mask = a_t.double(), b_t.double(), mask.double()
        h = torch.matmul(x.to(a_t.dtype), a_t)  # [rows, (tokens,) ranks]
        if routing.per_token:  # one row, a mask row per token: [1, tokens, ranks] or [tokens, ranks]
            h.mul_(mask)
        elif h.dim() == 3:
            h.mul_(mask.unsqueeze(1))
        elif h.shape[0] == mask.shape[0]:
            h.mul_(mask)
        else:  # tokens flattened into rows, row-major (OPT's MLP): [rows * tokens, ranks]
            h.view(mask.shape[0], -1, h.shape[-1]).mul_(mask.unsqueeze(1))
        return result + torch.matmul(h, b_t).to(result.dtype)  # the base output is left untouched

    def _stack(self, layer: Any, adapters: tuple[str, ...], composition: tuple[str, ...]) -> tuple:
        """The layer's A and B of `adapters` (those of the batch's `composition` it has), stacked."""
        key = (id(layer), composition)
        weights = tuple(layer.lora_A[n].weight for n in adapters) + tuple(layer.lora_B[n].weight for n in adapters)
        sources = tuple(_identity(w) for w in weights)
        cached = self._stacks.get(key)
        # A reloaded adapter has new parameters, a swapped one rewritten ones (the same tensors
        # at a new version): either way, its stack is rebuilt.
        if cached is None or cached[3] != sources:
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
            cached = (a_t, b_t, tuple(blocks), sources, weights)  # holding them keeps ids unique
            self._stacks[key] = cached
        return cached[:3]

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


def _identity(weight: torch.Tensor) -> tuple[int, int]:
    """A parameter's identity and its in-place version: equal only for the same values (a held
    reference keeps the id from being reused; see the callers)."""
    return id(weight), weight._version


class _Pool:
    """Per LoRA layer, A [in, slots * rank] and B [slots * rank, out] (scaling folded in), one
    slot per resident adapter, zero where an adapter has a lower rank or skips the layer."""

    def __init__(self, layers: list[Any], slots: int, rank: int, dtype: torch.dtype, device: torch.device):
        self.layers, self.slots, self.rank, self.dtype = layers, slots, rank, dtype
        self.structure = tuple(id(layer) for layer in layers)
        # Plain tensors even when made during an inference-mode forward pass (the runner's): the
        # pool is rewritten in place later, also outside inference mode (CUDA graph capture).
        with torch.inference_mode(False):
            self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {
                id(layer): (
                    torch.zeros((layer.in_features, slots * rank), dtype=dtype, device=device),
                    torch.zeros((slots * rank, layer.out_features), dtype=dtype, device=device),
                )
                for layer in layers
            }
        self.assigned: dict[str, int] = {}  # adapter -> slot
        self._copied: dict[str, tuple] = {}  # adapter -> the parameters its slot holds
        self._masks: dict[tuple[str, ...], torch.Tensor] = {}

    def fits(self, layers: list[Any], rank: int, adapters: int, dtype: torch.dtype) -> bool:
        return (
            self.structure == tuple(id(layer) for layer in layers)
            and rank <= self.rank
            and adapters <= self.slots
            and dtype == self.dtype
        )

    def update(self, loaded: tuple[str, ...]) -> None:
        """Free the slots of unloaded adapters, give new ones a free slot, copy changed weights."""
        self._masks.clear()
        for name in [n for n in self.assigned if n not in loaded]:
            self._write(self.assigned.pop(name), None)
            self._copied.pop(name, None)
        free = sorted(set(range(self.slots)) - set(self.assigned.values()))
        for name in loaded:
            if name not in self.assigned:
                self.assigned[name] = free.pop(0)
            weights = tuple(layer.lora_A[name].weight for layer in self.layers if name in layer.lora_A)
            sources = (tuple(_identity(w) for w in weights), weights)  # held: ids stay unique
            if self._copied.get(name, (None,))[0] != sources[0]:
                self._write(self.assigned[name], name)
                self._copied[name] = sources

    def _write(self, slot: int, name: str | None) -> None:
        start, end = slot * self.rank, (slot + 1) * self.rank
        with torch.no_grad():
            for layer in self.layers:
                a_t, b_t = self.buffers[id(layer)]
                a_t[:, start:end].zero_()
                b_t[start:end].zero_()
                if name is None or name not in layer.lora_A:
                    continue
                a = layer.lora_A[name].weight  # [rank, in]
                b = layer.lora_B[name].weight * layer.scaling[name]  # [out, rank]
                a_t[:, start : start + a.shape[0]].copy_(a.t())
                b_t[start : start + a.shape[0]].copy_(b.t())

    def row_mask(self, names: tuple[str, ...]) -> torch.Tensor:
        """[rows, slots * rank]: ones over each row's adapter's slot (none for the base)."""
        mask = self._masks.get(names)
        if mask is None:
            if len(self._masks) >= _MAX_MASKS:
                self._masks.clear()
            a_t = next(iter(self.buffers.values()))[0]
            host = torch.zeros((len(names), self.slots * self.rank), dtype=a_t.dtype)
            for row, name in enumerate(names):
                if name in self.assigned:
                    slot = self.assigned[name]
                    host[row, slot * self.rank : (slot + 1) * self.rank] = 1
            mask = self._masks[names] = host.to(a_t.device)
        return mask
