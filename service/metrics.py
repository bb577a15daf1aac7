"""Every Prometheus instrument of the service, prefix `hotswap_`, units in the names.

Each app gets its own CollectorRegistry (no global state: tests build many apps). The `adapter`
label is bounded by the registry: an adapter name, "base", or "none" for requests rejected
before an adapter was resolved.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from service.engine.config import EngineStats
from service.names import BASE
from service.tenants import Tenant

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "hotswap_requests",
            "HTTP API requests by endpoint, adapter and status code.",
            ["endpoint", "adapter", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "hotswap_request_duration_seconds",
            "Time from request to last byte of the response.",
            ["endpoint", "adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "hotswap_time_to_first_token_seconds",
            "Time from request to the first generated token.",
            ["adapter"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "hotswap_inter_token_latency_seconds",
            "Time between a request's consecutive tokens.",
            ["adapter"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.cancelled = Counter(
            "hotswap_cancelled_requests",
            "Generations stopped because the client went away.",
            ["adapter"],
            registry=r,
        )
        self.batch_size = Histogram(
            "hotswap_batch_size",
            "Sequences in each decode step of the engine.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.prompt_tokens = Counter("hotswap_prompt_tokens", "Prompt tokens processed.", ["adapter"], registry=r)
        self.generation_tokens = Counter("hotswap_generation_tokens", "Tokens generated.", ["adapter"], registry=r)
        self.queue_depth = Gauge("hotswap_queue_depth", "Requests waiting for the engine.", registry=r)
        self.adapter_loads = Counter(
            "hotswap_adapter_loads",
            "Adapter reads from disk into host memory (off the engine thread), by result.",
            ["adapter", "result"],
            registry=r,
        )
        self.adapter_load_duration = Histogram(
            "hotswap_adapter_load_duration_seconds",
            "Time to read an adapter package from disk and check its version hash.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.adapter_swaps = Counter(
            "hotswap_adapter_swaps",
            "Adapters swapped into a device slot, by where the weights came from (host, disk).",
            ["adapter", "source"],
            registry=r,
        )
        self.adapter_swap_duration = Histogram(
            "hotswap_adapter_swap_seconds",
            "Time to put an adapter's weights into a device slot (engine thread), by source.",
            ["source"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
            registry=r,
        )
        self.adapter_evictions = Counter(
            "hotswap_adapter_evictions",
            "Adapters evicted to make room (least recently used), from a device slot or host memory.",
            ["adapter", "tier"],
            registry=r,
        )
        self.adapter_bytes = Gauge(
            "hotswap_adapter_bytes", "Bytes of adapter weights held, by tier (device, host).", ["tier"], registry=r
        )
        self.adapter_slot_waiting = Gauge(
            "hotswap_adapter_slot_waiting_requests",
            "Requests waiting for their adapter to reach a device slot (read or swapped in).",
            ["adapter"],
            registry=r,
        )
        self.adapter_slot_wait = Histogram(
            "hotswap_adapter_slot_wait_seconds",
            "How long a request waited for its adapter's device slot.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.prefix_lookups = Counter(
            "hotswap_prefix_cache_lookups",
            "Prefills that looked for a stored prompt prefix, by result (hit, miss).",
            ["result"],
            registry=r,
        )
        self.prefix_tokens = Counter(
            "hotswap_prefix_cache_reused_tokens", "Prompt tokens whose KV came from the prefix cache.", registry=r
        )
        self.prefix_bytes = Gauge("hotswap_prefix_cache_bytes", "Bytes of KV the prefix cache holds.", registry=r)
        # Per tenant (TENANTS_FILE): the label set is the file's tenants, never a request's word.
        self.tenant_requests = Counter(
            "hotswap_tenant_requests", "Requests admitted past the tenant's rate limits.", ["tenant"], registry=r
        )
        self.tenant_tokens = Counter(
            "hotswap_tenant_tokens",
            "Tokens of the tenant's requests, by kind (prompt, completion).",
            ["tenant", "kind"],
            registry=r,
        )
        self.tenant_limited = Counter(
            "hotswap_tenant_rate_limited",
            "Requests refused with 429 for the tenant's limit (requests, tokens, queue).",
            ["tenant", "limit"],
            registry=r,
        )
        # Per adapter version (canary releases): the labels are served versions, 16 hex digits.
        self.version_requests = Counter(
            "hotswap_adapter_version_requests",
            "Requests answered by each adapter version, by role (stable, canary) and outcome (ok, error).",
            ["adapter", "version", "role", "outcome"],
            registry=r,
        )
        self.version_latency = Histogram(
            "hotswap_adapter_version_request_duration_seconds",
            "Time from request to last byte, per adapter version and role.",
            ["adapter", "version", "role"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.version_tokens = Counter(
            "hotswap_adapter_version_tokens",
            "Tokens per adapter version and role, by kind (prompt, completion).",
            ["adapter", "version", "role", "kind"],
            registry=r,
        )
        self.canary_traffic = Gauge(
            "hotswap_adapter_canary_traffic",
            "The canary version's share of its adapter's requests.",
            ["adapter", "version"],
            registry=r,
        )
        self.gate_checks = Counter(
            "hotswap_adapter_gate_checks",
            "Adapter versions checked by the load gate, by outcome (passed, refused, skipped).",
            ["adapter", "outcome"],
            registry=r,
        )
        self.rollbacks = Counter(
            "hotswap_adapter_rollbacks",
            "Rollbacks, by trigger (admin, automatic, file).",
            ["adapter", "trigger"],
            registry=r,
        )
        self.release_syncs = Counter(
            "hotswap_release_file_syncs",
            "Readings of RELEASES_FILE acted on, by outcome (applied, failed: a step failed, invalid).",
            ["outcome"],
            registry=r,
        )
        self.release_steps = Counter(
            "hotswap_release_steps",
            "Steps taken towards RELEASES_FILE, by action (stable, canary, traffic, promote, drop) and "
            "outcome (done, failed, skipped).",
            ["adapter", "action", "outcome"],
            registry=r,
        )
        self.resident_adapters = Gauge("hotswap_resident_adapters", "Adapters loaded on the base model.", registry=r)
        self.running = Gauge("hotswap_running_requests", "Requests the engine is generating for now.", registry=r)
        self.batch_utilization = Gauge(
            "hotswap_batch_utilization_ratio",
            "Running sequences over the engine's batch capacity (0-1).",
            registry=r,
        )
        # Mirrors vLLM's vllm:lora_requests_info, which the Gateway API Inference Extension's
        # model-server protocol reads to route a request to a replica holding its adapter.
        self.lora_requests_info = Gauge(
            "hotswap_lora_requests_info",
            "Adapters of running and waiting requests (comma-separated labels); value: update time.",
            ["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
            registry=r,
        )
        self.max_lora = 0
        self.rejected = Counter(
            "hotswap_rejected_requests",
            "Requests refused before generation, by reason.",
            ["reason"],
            registry=r,
        )

        self.engine_step = Histogram(
            "hotswap_engine_step_seconds",
            "Engine thread time per iteration phase: prefill (admitted prompts, and chunks of long "
            "prompts in passes of their own), decode (one step of the running batch) or packed (a "
            "decode step that also carries chunks of long prompts). Its sums against wall time say "
            "where the time goes.",
            ["phase"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.cuda_graph_startup = Gauge(
            "hotswap_cuda_graph_startup_seconds",
            "Time the start took to capture every decode step bucket in a CUDA graph (0: none).",
            registry=r,
        )
        self.cuda_graph_capture = Histogram(
            "hotswap_cuda_graph_capture_seconds",
            "Time to capture a decode step in a CUDA graph under traffic (the running sequences "
            "wait meanwhile); the start captures every bucket, so this stays empty unless the "
            "model's structure changes later (see MAX_LORA_RANK).",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.kv_cache_info = Gauge(
            "hotswap_engine_kv_cache_info",
            "The batched engine's KV cache (static or dynamic) and whether it replays CUDA graphs; value 1.",
            ["kv_cache", "cuda_graphs"],
            registry=r,
        )

        self.guardrail_actions = Counter(
            "hotswap_guardrail_actions",
            "Guardrail hook actions (redact, block, flag, retry, error).",
            ["stage", "hook", "action"],
            registry=r,
        )
        # Structured outputs (docs/structured-outputs.md).
        self.grammar_compile = Histogram(
            "hotswap_grammar_compile_seconds",
            "Time to compile a new response_format or adapter schema.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.grammar_cache = Counter(
            "hotswap_grammar_cache_lookups",
            "Grammar cache lookups by result (hit or miss).",
            ["result"],
            registry=r,
        )
        self.grammar_mask = Histogram(
            "hotswap_grammar_mask_seconds",
            "Per constrained row and step, on the step's critical path: "
            "applying its token mask (computed during the forward pass) and advancing the grammar.",
            buckets=(0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01),
            registry=r,
        )

    def observe_adapter_load(self, adapter: str, result: str, seconds: float) -> None:
        self.adapter_loads.labels(adapter, result).inc()
        if result == "ok":
            self.adapter_load_duration.observe(seconds)

    def observe_prefix(self, hit: bool, tokens: int) -> None:
        self.prefix_lookups.labels("hit" if hit else "miss").inc()
        self.prefix_tokens.inc(tokens)

    def observe_swap(self, adapter: str, source: str, seconds: float) -> None:
        self.adapter_swaps.labels(adapter, source).inc()
        self.adapter_swap_duration.labels(source).observe(seconds)

    def observe_slot_wait(self, waiting: list[str], seconds: float | None) -> None:
        """Who waits for a slot now (labels), and a finished wait's length."""
        self.adapter_slot_waiting.clear()
        for adapter in set(waiting):
            self.adapter_slot_waiting.labels(adapter).set(waiting.count(adapter))
        if seconds is not None:
            self.adapter_slot_wait.observe(seconds)

    def observe_engine(self, running: list[str], waiting: list[str], capacity: int) -> None:
        """Engine state after each change: queue, running count, adapters in flight."""
        self.queue_depth.set(len(waiting))
        self.running.set(len(running))
        self.batch_utilization.set(len(running) / capacity if capacity else 0.0)
        # Only adapters count here: the protocol's lists name LoRA adapters, never the base.
        adapters = lambda names: ",".join(sorted(set(names) - {BASE}))  # noqa: E731
        self.lora_requests_info.clear()
        self.lora_requests_info.labels(adapters(running), adapters(waiting), str(self.max_lora)).set_to_current_time()

    def observe_engine_stats(self, stats: EngineStats) -> None:
        """What one engine iteration did (or a change outside its loop): every engine metric."""
        if stats.running is not None:
            self.observe_engine(list(stats.running), list(stats.waiting or ()), stats.capacity)
        for rows in stats.batch_sizes:
            self.batch_size.observe(rows)
        for phase, seconds in stats.phases:
            self.engine_step.labels(phase).observe(seconds)
        for seconds in stats.grammar_seconds:
            self.grammar_mask.observe(seconds)
        for seconds in stats.slot_waits:
            self.adapter_slot_wait.observe(seconds)
        if stats.slot_waiters is not None:
            self.observe_slot_wait(list(stats.slot_waiters), None)
        if stats.kv_cache is not None:
            self.observe_kv_cache(*stats.kv_cache)
        for seconds in stats.captures:
            self.cuda_graph_capture.observe(seconds)

    def observe_kv_cache(self, kv_cache: str, cuda_graphs: bool) -> None:
        self.kv_cache_info.clear()
        self.kv_cache_info.labels(kv_cache, str(cuda_graphs).lower()).set(1)

    def render(self, reader: Tenant | None = None) -> bytes:
        """The exposition: whole for the admin key (`reader` None), else without what tells of
        other tenants' prompts and traffic (security review M3): no prefix-cache series, no
        in-flight adapter names, tenant series of the reader's own tenant only, and adapter
        series of the adapters it may use."""
        if reader is None:
            return generate_latest(self.registry)
        return generate_latest(_TenantView(self.registry, reader))


_HIDDEN = ("hotswap_prefix_cache_", "hotswap_lora_requests_info", "hotswap_adapter_slot_waiting")


class _TenantView:
    """The registry as one tenant may read it (Metrics.render)."""

    def __init__(self, registry: CollectorRegistry, reader: Tenant):
        self.registry, self.reader = registry, reader

    def collect(self):
        for family in self.registry.collect():
            if family.name.startswith(_HIDDEN):
                continue
            family.samples = [s for s in family.samples if self._shown(s.labels)]
            yield family

    def _shown(self, labels: dict[str, str]) -> bool:
        if "tenant" in labels and labels["tenant"] != self.reader.id:
            return False
        adapter = labels.get("adapter")
        return adapter is None or adapter in (BASE, "none") or self.reader.may_use(adapter)
