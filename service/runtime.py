"""Builds what a started service serves: base model, adapters, engine (the slow part of a start)."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from service.adapters.registry import AdapterRegistry
from service.base_model import load_base
from service.engine import Engine
from service.engine.batched import BatchedEngine
from service.engine.config import EngineConfig
from service.engine.kvcache import choose_kv_cache
from service.engine.model import LoRAModel
from service.engine.prefix import PrefixCache
from service.engine.prefix import unsupported as prefix_unsupported
from service.engine.residency import AdapterResidency
from service.engine.runner import ModelRunner
from service.engine.simple import SimpleEngine
from service.metrics import Metrics
from service.settings import Settings
from service.tenants import Tenants
from service.tenants import from_settings as tenants_from

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    engine: Engine
    tokenizer: Any
    registry: AdapterRegistry
    base_id: str
    max_context: int
    residency: AdapterResidency | None = None


def load_runtime(settings: Settings, metrics: Metrics, tenants: Tenants | None = None) -> Runtime:
    """Load the base once, validate the adapter packages (they load on first use, see
    `AdapterResidency`), and build the engine (not started). `tenants`: those the service
    authenticates (TENANTS_FILE as read once at build), whose shares the engine schedules."""
    base = load_base(
        settings.model,
        quantization=settings.quantization,
        device=settings.device,
        cache_dir=settings.cache_dir,
        served_id=settings.served_model_name,
    )
    registry = AdapterRegistry(
        settings.adapter_dir,
        base_id=base.source.served_id,
        base_fingerprint=base.source.fingerprint,
        download_dir=settings.cache_dir / "adapters",
        allowed_sources=settings.adapter_sources,
        max_bytes=settings.max_adapter_bytes,
    )
    registry.scan()
    lora = LoRAModel(base.model)  # the one owner of the served model (slots, runner, caches)
    residency = AdapterResidency(
        registry,
        lora,
        settings.max_resident_adapters,
        max_host=settings.max_cpu_adapters,
        loader=ThreadPoolExecutor(1, thread_name_prefix="hotswap-adapter-io"),
        on_load=metrics.observe_adapter_load,
        on_change=metrics.resident_adapters.set,
        on_evict=lambda name, tier: metrics.adapter_evictions.labels(name, tier).inc(),
        on_swap=metrics.observe_swap,
        on_bytes=lambda tier, nbytes: metrics.adapter_bytes.labels(tier).set(nbytes),
        min_rank=settings.max_lora_rank,
    )
    metrics.max_lora = settings.max_resident_adapters
    preload(residency, settings.pinned_adapters, settings.preload_adapters)
    log.info(
        "serving %s (fingerprint %s); adapters, loaded on first use: %s",
        base.source.served_id,
        base.source.fingerprint,
        [r.name for r in registry.ready()],
    )
    max_context = min(base.max_context, settings.max_model_len or base.max_context)
    runner = ModelRunner(lora, base.device)
    tenants = tenants if tenants is not None else tenants_from(settings)
    shares = tuple((t.id, t.weight, t.max_concurrent) for t in tenants.tenants)
    config = EngineConfig.from_settings(
        settings, max_context=max_context, eos_token_ids=base.eos_token_ids, shares=shares
    )
    if settings.engine == "batched":
        config = replace(config, kv_cache=choose_kv_cache(settings, runner, max_context))
        prefixes = None
        unsupported = prefix_unsupported(runner, max_context)
        if settings.prefix_cache_mb and unsupported:
            log.info("prefix reuse: off (%s)", unsupported)
        elif settings.prefix_cache_mb:
            prefixes = PrefixCache(
                settings.prefix_cache_mb << 20, on_lookup=metrics.observe_prefix, on_bytes=metrics.prefix_bytes.set
            )
        engine: Engine = BatchedEngine(
            runner, config, residency=residency, prefix_cache=prefixes, on_stats=metrics.observe_engine_stats
        )
        capture_at_start(engine, residency, metrics)
    else:
        engine = SimpleEngine(runner, config, residency=residency, on_stats=metrics.observe_engine_stats)
    return Runtime(engine, base.tokenizer, registry, base.source.served_id, max_context, residency)


def capture_at_start(engine: BatchedEngine, residency: AdapterResidency, metrics: Metrics) -> None:
    """With CUDA graphs, capture every decode step bucket now, so that no capture pauses the
    running streams later. The graphs belong to the model as it is: a model with no adapter
    yet becomes a PEFT model at its first one (and every graph would be captured again), so
    with none preloaded the first served adapter is loaded now (an evictable slot)."""
    kv = engine.kv_cache
    if not getattr(kv, "graphs", False):
        return
    if not residency.resident:
        first = next((r.name for r in residency.registry.ready()), None)
        if first is not None:
            log.info("CUDA graphs: loading %s now, so that the graphs are captured for the adapters' model", first)
            preload(residency, [], [first])
    count, seconds = kv.capture_all()
    metrics.cuda_graph_startup.set(seconds)
    log.info("CUDA graphs: captured %d decode step buckets at start in %.1f s", count, seconds)


def preload(residency: AdapterResidency, pinned: list[str], wanted: list[str]) -> None:
    """Pin and load the adapters the settings name, now (on the thread that loads the model):
    a name that is not served is a typo and fails the start."""
    served = {r.name for r in residency.registry.ready()}
    unknown = sorted(set(pinned + wanted) - served)
    if unknown:
        raise ValueError(f"PINNED_ADAPTERS / PRELOAD_ADAPTERS name adapters that are not served: {unknown}")
    for name in pinned:
        residency.pin(name)
    for name in dict.fromkeys(pinned + wanted):
        while not residency.ensure(name, busy=set()):  # the loader thread reads it
            residency.wait_for_reads()
    residency.preload_pending(set())  # the pins asked again; all resident now
    log.info("adapters resident at start: %s (pinned: %s)", residency.resident, sorted(residency.pinned))
