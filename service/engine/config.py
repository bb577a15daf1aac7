"""What an engine is told when it is built (`EngineConfig`), and what it tells of each iteration
(`EngineStats`, one value to one `on_stats` callback, which the service's metrics read).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class EngineConfig:
    max_context: int  # tokens a sequence may hold: prompt and completion
    eos_token_ids: frozenset[int] = frozenset()
    max_queued: int = 256  # requests waiting before new ones get QueueFull (a 429)
    max_batch_size: int = 16  # rows generated at once (the batched engine)
    max_prefill_tokens: int = 4096  # the most prompt work an iteration does (MAX_PREFILL_TOKENS)
    kv_cache: str = "dynamic"  # the running batch's cache: "dynamic" or "static" (choose_kv_cache)
    cuda_graphs: bool = True  # decode steps replayed from CUDA graphs (the static cache on CUDA)
    packed_steps: bool = True  # new prompts and chunks ride in the decode step's pass (packed.py)
    step_slowdown: float = 0.0  # PREFILL_STEP_SLOWDOWN: the time budget of a packed step (budget.py)
    overlap_masks: bool | None = None  # grammar masks during the forward pass (None: on CUDA only)
    # Tenants' shares of the batch (TENANTS_FILE): (tenant, weight, max_concurrent or None). With
    # two or more, admission is fair across them and each has a queue of max_queued of its own.
    shares: tuple[tuple[str, float, int | None], ...] = ()

    @classmethod
    def from_settings(cls, settings: Any, **values: Any) -> EngineConfig:
        """The engine's part of the service's Settings; `values` (the model's context and EOS
        ids, the KV cache chosen for it) complete or override it."""
        return cls(
            **{
                "max_queued": settings.max_queued_requests,
                "max_batch_size": settings.max_batch_size,
                "max_prefill_tokens": settings.max_prefill_tokens,
                "cuda_graphs": settings.cuda_graphs,
                "packed_steps": settings.packed_steps,
                "step_slowdown": settings.prefill_step_slowdown,
                **values,
            }
        )


@dataclass
class EngineStats:
    """What one iteration of the engine did (or, told apart, a change outside the loop: a
    request queued, a CUDA graph captured). Empty fields: nothing of that kind happened."""

    capacity: int = 1
    running: tuple[str, ...] | None = None  # the running requests' labels, when they changed
    waiting: tuple[str, ...] | None = None  # the waiting requests' labels (with `running`)
    batch_sizes: list[int] = field(default_factory=list)  # rows of each decode step
    phases: list[tuple[str, float]] = field(default_factory=list)  # (prefill, decode or packed; seconds)
    grammar_seconds: list[float] = field(default_factory=list)  # a grammar row's mask and accept
    slot_waits: list[float] = field(default_factory=list)  # seconds of each adapter-slot wait that ended
    slot_waiters: tuple[str, ...] | None = None  # labels waiting for an adapter slot, when they changed
    kv_cache: tuple[str, bool] | None = None  # (kind, CUDA graphs), when it is set or graphs go off
    captures: list[float] = field(default_factory=list)  # seconds of each CUDA graph capture

    def __bool__(self) -> bool:
        """Whether it tells anything (an empty tuple of labels is news: nothing runs now)."""
        changes = (self.running, self.slot_waiters, self.kv_cache)
        return any(c is not None for c in changes) or any(
            getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), list)
        )
