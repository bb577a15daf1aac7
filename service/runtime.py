"""Builds what a started service serves: base model, adapters, engine (the slow part of a start)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from service.adapters.registry import AdapterRegistry
from service.adapters.residency import AdapterResidency
from service.base_model import load_base
from service.engine import Engine
from service.engine.runner import ModelRunner
from service.engine.batched import BatchedEngine
from service.engine.simple import SimpleEngine
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    engine: Engine
    tokenizer: Any
    registry: AdapterRegistry
    base_id: str
    max_context: int


def load_runtime(settings: Settings, metrics: Metrics) -> Runtime:
    """Load the base once, validate the adapter packages (they load on first use, see
    `AdapterResidency`), and build the engine (not started)."""
    base = load_base(
        settings.model,
        quantization=settings.quantization,
        device=settings.device,
        cache_dir=settings.cache_dir,
        served_id=settings.served_model_name,
    )
    registry = AdapterRegistry(
        settings.adapter_dir, base_id=base.source.served_id, base_fingerprint=base.source.fingerprint
    )
    registry.scan()
    residency = AdapterResidency(
        registry,
        base.model,
        settings.max_resident_adapters,
        on_load=metrics.observe_adapter_load,
        on_change=metrics.resident_adapters.set,
        on_evict=lambda name: metrics.adapter_evictions.labels(name).inc(),
    )
    metrics.max_lora = settings.max_resident_adapters
    log.info(
        "serving %s (fingerprint %s); adapters, loaded on first use: %s",
        base.source.served_id, base.source.fingerprint, [r.name for r in registry.ready()],
    )
    common = dict(
        eos_token_ids=base.eos_token_ids,
        max_context=base.max_context,
        max_queued=settings.max_queued_requests,
        on_state=metrics.observe_engine,
        on_step=metrics.batch_size.observe,
        residency=residency,
    )
    runner = ModelRunner(base.model, base.device)
    if settings.engine == "batched":
        engine: Engine = BatchedEngine(
            runner, max_batch_size=settings.max_batch_size,
            max_prefill_tokens=settings.max_prefill_tokens, **common,
        )
    else:
        engine = SimpleEngine(runner, **common)
    return Runtime(engine, base.tokenizer, registry, base.source.served_id, base.max_context)
