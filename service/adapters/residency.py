"""Adapter residency: adapters load on first use and stay, least recently used evicted first.

Only the engine's worker thread calls `ensure`, between model steps, so a load or an eviction
never runs beside a forward pass, and an adapter that a running sequence uses is never evicted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from service.adapters.registry import AdapterRegistry

log = logging.getLogger(__name__)


class AdapterResidency:
    def __init__(
        self,
        registry: AdapterRegistry,
        model: Any,
        max_resident: int,
        *,
        on_load: Callable[[str, str, float], None] | None = None,
        on_change: Callable[[int], None] | None = None,
        on_evict: Callable[[str], None] | None = None,
    ):
        if max_resident < 1:
            raise ValueError("max_resident must be at least 1")
        self.registry = registry
        self.model = model  # becomes a PeftModel at the first load
        self.max_resident = max_resident
        self._on_load = on_load
        self._on_change = on_change or (lambda count: None)
        self._on_evict = on_evict or (lambda name: None)
        self._lru: OrderedDict[str, float] = OrderedDict()  # name -> last use
        self._stale: set[str] = set()  # changed on disk: reload when next idle (admin rescan)
        self._stale_lock = threading.Lock()

    def mark_stale(self, names: list[str]) -> None:
        """Reload these packages at their next use with no running sequence (any thread)."""
        with self._stale_lock:
            self._stale.update(n for n in names if n in self._lru)

    def _reload(self, name: str) -> None:
        """Replace a resident adapter's weights with the package now on disk (it is idle)."""
        with self._stale_lock:
            self._stale.discard(name)
        keeper = None
        if len(self._lru) == 1:  # PEFT keeps one adapter on a PeftModel: hold a placeholder
            keeper = f"{name}__reloading"  # "." is not allowed in module names
            self.model.load_adapter(str(self.registry.get(name, param="adapter").path), adapter_name=keeper)
        self.model.delete_adapter(name)
        del self._lru[name]
        try:
            self.model = self.registry.load(self.model, name, self._on_load)
            self._lru[name] = time.monotonic()
        finally:
            if keeper is not None:
                self.model.delete_adapter(keeper)
            self._on_change(len(self._lru))
        log.info("adapter %r reloaded from disk", name)

    @property
    def resident(self) -> list[str]:
        """Loaded adapters, least recently used first."""
        return list(self._lru)

    def ensure(self, name: str, busy: set[str]) -> bool:
        """Make `name` resident; False while every slot holds an adapter in use (try again later).

        Raises NotFoundError when the package cannot be loaded (it is then marked failed).
        """
        if name in self._lru and name not in busy and name in self._stale:
            self._reload(name)
        if name in self._lru:
            self._lru.move_to_end(name)
            self._lru[name] = time.monotonic()
            return True
        victim = None
        if len(self._lru) >= self.max_resident:
            victim = next((n for n in self._lru if n not in busy), None)
            if victim is None:
                return False
        # Load first, evict after: PEFT keeps at least one adapter on a PeftModel.
        self.model = self.registry.load(self.model, name, self._on_load)
        self._lru[name] = time.monotonic()
        if victim is not None:
            self.model.delete_adapter(victim)
            del self._lru[victim]
            log.info("adapter %r evicted (least recently used) for %r", victim, name)
            self._on_evict(victim)
        self._on_change(len(self._lru))
        return True
