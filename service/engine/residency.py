"""Adapter residency: device slots, a host-memory tier, pins, and disk reads off the engine thread.

Three tiers, each keyed by an adapter version's key (`AdapterKey`, see the registry), so two
versions of one name are two adapters here and nothing of one is ever used for the other:

- **device slots** (`MAX_RESIDENT_ADAPTERS`): PEFT adapters named `slot0`, `slot1`... on the base.
  A slot is made once, PEFT-wrapping the model's layers for it (slow); after that, swapping an
  adapter into it copies its A and B matrices into the slot's in place (zero padded to the
  slot's rank; the adapter's own scaling set per layer), some sixty times faster
  (docs/benchmarks.md). Adapters PEFT must load itself (DoRA, a LoRA bias, embedding or conv layers,
  `modules_to_save`) rebuild their slot for them. In-place copies keep every tensor's identity,
  so CUDA graphs captured over the LoRA pool (service/engine/lora.py) stay valid across swaps.
- **host memory** (`MAX_CPU_ADAPTERS`): the weights of recently used versions, parsed and (on
  CUDA) pinned, least recently used dropped first; a swap-in from here reads no disk.
- **disk**: the registered package, read on a loader thread (never the engine's) and checked
  against its version hash. While it is read, requests for it wait; the rest of the batch runs.

Only the engine's worker thread calls `ensure` and `slot`, between model steps, so a load or an
eviction never runs beside a forward pass, and an adapter that a running sequence uses is never
evicted. Pinned adapters (`PINNED_ADAPTERS`, the admin API) are never evicted; at least one slot
always stays unpinned.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from typing import Any

import torch

from service.adapters.registry import AdapterRegistry
from service.engine.host_copy import HostCopy, lora_layers
from service.engine.model import LoRAModel
from service.errors import AdapterUnavailable, HotswapError
from service.names import AdapterKey

log = logging.getLogger(__name__)


@dataclass
class _Slot:
    name: str  # the PEFT adapter name
    key: AdapterKey | None = None  # the adapter version it holds
    exact: bool = False  # built by PEFT for one adapter that cannot be copied (DoRA...)
    # Per LoRA layer: (rank, in, out) of the slot's matrices.
    shape: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    used: float = 0.0

    def fits(self, copy: HostCopy) -> bool:
        if self.exact or copy.layers is None:
            return False
        return all(
            module in self.shape
            and self.shape[module][0] >= a.shape[0]
            and self.shape[module][1:] == (a.shape[1], b.shape[0])
            for module, (a, b, _) in copy.layers.items()
        )


class AdapterResidency:
    def __init__(
        self,
        registry: AdapterRegistry,
        model: Any,
        max_resident: int,
        *,
        max_host: int | None = None,
        pinned: list[str] | tuple[str, ...] = (),
        loader: Executor | None = None,
        on_load: Callable[[str, str, float], None] | None = None,
        on_change: Callable[[int], None] | None = None,
        on_evict: Callable[[str, str], None] | None = None,
        on_swap: Callable[[str, str, float], None] | None = None,
        on_bytes: Callable[[str, int], None] | None = None,
        min_rank: int = 0,
    ):
        if max_resident < 1:
            raise ValueError("max_resident must be at least 1")
        self.registry = registry
        # The served model's owner, shared with the runner: the slots are its PEFT adapters.
        self.lora = model if isinstance(model, LoRAModel) else LoRAModel.of(model)
        self.max_resident = max_resident
        self.max_host = max_resident if max_host is None else max_host
        self._loader = loader  # None: disk reads on the calling thread (tests, tools)
        self._on_load = on_load or (lambda name, result, seconds: None)  # a disk read
        self._on_change = on_change or (lambda count: None)
        self._on_evict = on_evict or (lambda name, tier: None)  # tier: device or host
        self._on_swap = on_swap or (lambda name, source, seconds: None)  # source: host or disk
        self._on_bytes = on_bytes or (lambda tier, nbytes: None)
        self._slots: list[_Slot] = []
        self._where: dict[AdapterKey, _Slot] = {}  # key -> its slot
        self._host: OrderedDict[AdapterKey, HostCopy] = OrderedDict()  # least recently used first
        self._reading: dict[AdapterKey, Future] = {}  # key -> its disk read on the loader thread
        self._failed: dict[AdapterKey, HotswapError] = {}  # key -> why its read failed (told once)
        self._lock = threading.Lock()  # host tier and reads: the loader thread writes them
        self._pinned: set[str] = set()
        self._wanted: deque[str] = deque()  # names to make resident when a slot is free
        self.ready = threading.Event()  # set when a disk read finishes (wakes an idle engine)
        self.on_want = lambda: None  # the engine's: wake it when idle, to preload
        self._layers: dict[str, Any] = {}  # module path -> LoRA layer, once the model is a PeftModel
        self._max_rank = min_rank  # slots are built at the highest rank seen, and at least this
        for name in pinned:
            self.pin(name)

    @property
    def model(self) -> Any:
        """The model the slots live on (a PeftModel from the first load on)."""
        return self.lora.model

    # --- what the engine calls (its worker thread) -------------------------------------------

    def key(self, adapter: AdapterKey | str) -> AdapterKey:
        """The key of a version: as given, or a bare name's current version."""
        key = AdapterKey.of(adapter)
        return key if key.version is not None else self.registry.version(key).key

    def slot(self, key: AdapterKey | str) -> str:
        """The PEFT adapter name that holds a resident key."""
        return self._where[self.key(key)].name

    @property
    def resident(self) -> list[str]:
        """Adapter names on the device, least recently used first."""
        return [key.name for key, s in sorted(self._where.items(), key=lambda item: item[1].used)]

    def ensure(self, adapter: AdapterKey | str, busy: set[AdapterKey] | set[str]) -> bool:
        """Make `adapter` (a key, or a name for its current version) resident on the device;
        False while it must wait: its weights are being read from disk, or every slot holds an
        adapter in use or pinned. `busy`: keys that running sequences use (a bare name: all of
        its versions).

        Raises AdapterUnavailable when the package cannot be loaded (the error names why)."""
        key = self.key(adapter)
        slot = self._where.get(key)
        if slot is not None:
            slot.used = time.monotonic()
            return True
        copy = self._host_copy(key)
        if copy is None:
            return False
        slot = self._free_slot(busy)
        if slot is None and len(self._slots) >= self.max_resident:
            return False
        started = time.perf_counter()
        self._install(copy, slot)
        self._on_swap(key.name, "disk" if copy.fresh else "host", time.perf_counter() - started)
        copy.fresh = False
        return True

    def resolve(self, adapter: AdapterKey | str) -> AdapterKey:
        """`key`, or the bare key when the name has no current version (ensure then says why)."""
        try:
            return self.key(adapter)
        except HotswapError:
            return AdapterKey.of(adapter)

    def tier(self, key: AdapterKey) -> str:
        """Where a version is, for admission: resident, host (its weights are in host memory, or
        are read on the calling thread), disk (a read must start) or loading."""
        state = self.state(key)
        if state == "cached" or (state == "registered" and self._loader is None):
            return "host"
        return {"registered": "disk"}.get(state, state)

    def fetch(self, key: AdapterKey) -> None:
        """Start reading the version from disk; raises why, if its last read failed."""
        self._host_copy(key)

    def slots_view(self, busy: set[AdapterKey]) -> tuple[int, frozenset[AdapterKey]]:
        """(slots empty or not made yet, resident keys no `busy` row uses and not pinned): what
        admissions this iteration may put a newly wanted adapter in."""
        free = sum(s.key is None for s in self._slots) + self.max_resident - len(self._slots)
        return free, frozenset(key for key, _ in self._idle(busy))

    def _idle(self, busy: set[AdapterKey] | set[str]) -> list[tuple[AdapterKey, _Slot]]:
        """The resident versions no `busy` row uses (a bare key: any version of its name) and
        not pinned, with their slots."""
        used = {AdapterKey.of(b) for b in busy}
        names = {key.name for key in used if key.version is None}
        return [
            (key, s)
            for key, s in self._where.items()
            if key not in used and key.name not in names and not self.is_pinned(key)
        ]

    def preload_pending(self, busy: set[AdapterKey] | set[str]) -> None:
        """Swap in what pins and the preload list asked for, as slots allow (engine thread)."""
        for _ in range(len(self._wanted)):
            name = self._wanted.popleft()
            try:
                if name not in self.registry or not self.ensure(name, busy):
                    self._wanted.append(name)
                    return
            except HotswapError as exc:
                log.error("preloading adapter %r failed: %s", name, exc)

    # --- tiers --------------------------------------------------------------------------------

    def _host_copy(self, key: AdapterKey) -> HostCopy | None:
        """The key's host copy; None while it is read from disk (on the loader thread)."""
        with self._lock:
            copy = self._host.get(key)
            if copy is not None:
                self._host.move_to_end(key)
                return copy
            if key in self._failed:
                raise self._failed.pop(key)
            if key in self._reading:
                return None
            if self._loader is not None:
                self._reading[key] = self._loader.submit(self._read, key)
                return None
        self._read(key)
        with self._lock:
            if key in self._failed:
                raise self._failed.pop(key)
            return self._host[key]

    def _read(self, key: AdapterKey) -> None:
        started = time.perf_counter()
        name = key.name
        try:
            config, tensors = self.registry.read_package(key)
            copy = HostCopy.parse(key, config, tensors, pin=self._pin_memory())
        except Exception as exc:  # corrupt tensors, a changed file, I/O: refuse this version only
            reason = str(exc) if isinstance(exc, HotswapError) else f"cannot be loaded: {exc}"
            log.error("adapter %s refused: %s", key, reason)
            self.registry.mark_failed(key, reason)
            self._on_load(name, "error", time.perf_counter() - started)
            with self._lock:
                self._failed[key] = AdapterUnavailable(f"the adapter {name!r} is not available: {reason}")
                self._reading.pop(key, None)
            self.ready.set()
            return
        self._on_load(name, "ok", time.perf_counter() - started)
        with self._lock:
            self._host[key] = copy
            self._reading.pop(key, None)
            self._trim_host()
        self.ready.set()
        if self._wanted:  # a preload waited for this read: an idle engine must look again
            self.on_want()

    def _trim_host(self) -> None:
        """Drop least recently used host copies beyond MAX_CPU_ADAPTERS (lock held). The newest
        stays even with MAX_CPU_ADAPTERS 0: it is on its way into a slot."""
        while len(self._host) > max(self.max_host, 1):
            key, _ = self._host.popitem(last=False)
            self._on_evict(key.name, "host")
        self._on_bytes("host", sum(c.nbytes for c in self._host.values()))

    def _pin_memory(self) -> bool:
        device = getattr(self.model, "device", torch.device("cpu"))
        return torch.device(device).type == "cuda"

    # --- slots --------------------------------------------------------------------------------

    def _free_slot(self, busy: set[AdapterKey] | set[str]) -> _Slot | None:
        """An empty slot, else the slot to evict: not in use and not pinned, an adapter that was
        replaced or unloaded first, then the least recently used. None: make a new slot if the
        limit allows, else wait."""
        empty = next((s for s in self._slots if s.key is None), None)
        if empty is not None:
            return empty
        if len(self._slots) < self.max_resident:
            return None
        idle = self._idle(busy)
        if not idle:
            return None
        key, victim = min(idle, key=lambda item: (self.registry.current(item[0]), item[1].used))
        log.info("adapter %s evicted from its slot (least recently used)", key)
        self._on_evict(key.name, "device")
        del self._where[key]
        victim.key = None
        return victim

    def is_pinned(self, key: AdapterKey) -> bool:
        """Pins hold a name's current version only: a replaced version leaves its slot."""
        return key.name in self._pinned and self.registry.current(key)

    def _install(self, copy: HostCopy, slot: _Slot | None) -> None:
        """Put `copy` in `slot` (None: a new slot): an in-place copy when it fits, else PEFT
        (re)builds the slot for it."""
        if slot is not None and slot.fits(copy):
            self._copy_into(copy, slot)
        else:
            slot = self._build(copy, slot)
        slot.key, slot.used = copy.key, time.monotonic()
        self._where[copy.key] = slot
        self._on_change(len(self._where))
        self._on_bytes("device", sum(self._slot_bytes(s) for s in self._slots))

    def _copy_into(self, copy: HostCopy, slot: _Slot) -> None:
        layers = copy.layers
        assert layers is not None  # slot.fits(copy): plain A and B per layer
        with torch.no_grad():
            for module, (rank, _, _) in slot.shape.items():
                layer = self._layers[module]
                a_slot, b_slot = layer.lora_A[slot.name].weight, layer.lora_B[slot.name].weight
                held = layers.get(module)
                if held is None:  # the adapter leaves this layer alone
                    a_slot.zero_()
                    b_slot.zero_()
                    continue
                a, b, scaling = held
                r = a.shape[0]
                a_slot[:r].copy_(a, non_blocking=True)
                b_slot[:, :r].copy_(b, non_blocking=True)
                if r < rank:
                    a_slot[r:].zero_()
                    b_slot[:, r:].zero_()
                layer.scaling[slot.name] = scaling

    def _build(self, copy: HostCopy, slot: _Slot | None) -> _Slot:
        """A slot made by PEFT for this adapter (slow: it wraps layers). A copyable adapter gets
        a slot at the highest rank seen so far, so later adapters fit it."""
        from peft import LoraConfig, PeftModel, set_peft_model_state_dict

        index = self._slots.index(slot) if slot is not None else len(self._slots)
        name = f"slot{index}" if slot is None else f"slot{index}_{time.monotonic_ns()}"
        config = LoraConfig.from_peft_type(**copy.config)
        config.inference_mode = True
        exact = copy.layers is None
        if not exact:
            self._max_rank = max(self._max_rank, copy.rank)
            config.r, config.rank_pattern, config.alpha_pattern = self._max_rank, {}, {}
        if self.lora.peft:
            self.model.add_adapter(name, config)
        else:
            self.lora.model = PeftModel(self.model, config, adapter_name=name)
        self.model.eval()
        self.model.requires_grad_(False)
        if slot is not None:  # a new one first, then the old: PEFT keeps one adapter at least
            self.model.delete_adapter(slot.name)
        self._layers = lora_layers(self.model)
        fresh = _Slot(name, exact=exact)
        fresh.shape = {
            module: (layer.lora_A[name].out_features, layer.lora_A[name].in_features, layer.lora_B[name].out_features)
            for module, layer in self._layers.items()
            if name in layer.lora_A
        }
        if exact:
            set_peft_model_state_dict(self.model, copy.tensors, adapter_name=name)
        else:
            self._copy_into(copy, fresh)
        if slot is None:
            self._slots.append(fresh)
        else:
            self._slots[index] = fresh
        rank = max((r for r, _, _ in fresh.shape.values()), default=0)
        log.info("adapter slot %s built for %s (rank %d)", name, copy.key, rank)
        return fresh

    def _slot_bytes(self, slot: _Slot) -> int:
        return sum(
            layer.lora_A[slot.name].weight.nbytes + layer.lora_B[slot.name].weight.nbytes
            for layer in self._layers.values()
            if slot.name in layer.lora_A
        )

    # --- what the admin API calls (any thread) ------------------------------------------------

    def pin(self, name: str) -> None:
        """Never evict `name` (every version of it) and make it resident soon."""
        if name not in self._pinned and len(self._pinned) >= self.max_resident - 1:
            raise ValueError(
                f"at most {self.max_resident - 1} adapters can be pinned with MAX_RESIDENT_ADAPTERS "
                f"{self.max_resident} (one slot must stay free for the others)"
            )
        self._pinned.add(name)
        self.want(name)

    def unpin(self, name: str) -> None:
        self._pinned.discard(name)

    @property
    def pinned(self) -> set[str]:
        return set(self._pinned)

    def wait_for_reads(self, timeout: float = 0.05) -> None:
        """Sleep until a disk read ends (or `timeout`): for a caller with nothing else to do."""
        self.ready.wait(timeout)
        self.ready.clear()

    def want(self, name: str) -> None:
        """Load `name` into a slot at the engine's next iteration (preload)."""
        self._wanted.append(name)
        self.ready.set()
        self.on_want()

    def state(self, key: AdapterKey | str) -> str:
        """Where a version is: resident (device), cached (host), loading (disk), registered."""
        key = AdapterKey.of(key)
        if key in self._where:
            return "resident"
        with self._lock:
            if key in self._host:
                return "cached"
            if key in self._reading:
                return "loading"
        return "registered"
