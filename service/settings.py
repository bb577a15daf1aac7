"""All service settings: one pydantic-settings class.

Precedence: `python -m service` flags, then `HOTSWAP_*` environment variables, then the defaults
below. Values that would make the service unsafe or unusable are refused at start, naming the
setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_MODEL = "embedded:smollm2-135m-instruct"

Quantization = Literal["nf4", "int8", "bf16", "fp32"]
Device = Literal["auto", "cpu", "cuda"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="HOTSWAP_",
        extra="forbid",
        cli_kebab_case=True,
        cli_prog_name="python -m service",
        protected_namespaces=(),
    )

    model: str = Field(
        DEFAULT_MODEL,
        description="Base model: 'embedded:smollm2-135m-instruct', a hub id, a local Hugging Face "
        "directory, or 'dummy:<shape>' (random weights for benchmarks: tiny, llama-7b).",
    )
    served_model_name: str | None = Field(
        None, description="Id the base is served under in /v1/models; derived from --model if unset."
    )
    quantization: Quantization = Field("nf4", description="Base weights: nf4, int8, bf16 or fp32.")
    device: Device = Field("auto", description="cpu, cuda, or auto (cuda when available).")
    adapter_dir: Path = Field(Path("adapters"), description="Directory scanned for adapter packages.")
    cache_dir: Path = Field(Path("~/.cache/hotswap"), description="Converted and dummy checkpoints are cached here.")
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=1, le=65535, description="TCP port to bind.")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated API keys accepted as 'Authorization: Bearer <key>' on /v1/*; "
        "empty disables authentication.",
    )
    admin_api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated keys for the admin routes (/admin/*: adapter rescan and "
        "reload), separate from API_KEYS; empty disables the admin routes (403).",
    )
    tenants_file: Path | None = Field(
        None,
        description="Tenants YAML (docs/security.md, 'Tenants'): each tenant's API keys (SHA-256 "
        "digests or plain), the adapters it may use, its concurrency and per-minute limits, and "
        "the adapters it may load through the admin API. Unset: API_KEYS is one tenant that may "
        "use everything.",
    )
    api_docs: bool | None = Field(
        None,
        description="Serve /docs, /redoc and /openapi.json; unset: only when no API keys are set "
        "(they map every route, admin ones included, to anyone who can reach them).",
    )
    metrics_require_key: bool = Field(
        False, description="Require an API or admin key on /metrics (default: open, for Prometheus)."
    )
    engine: Literal["batched", "simple"] = Field(
        "batched",
        description="batched: continuous batching of mixed-adapter requests; simple: one "
        "request at a time (the reference the batched engine is tested against).",
    )
    max_batch_size: int = Field(16, ge=1, le=1024, description="Sequences the batched engine generates at once.")
    max_prefill_tokens: int = Field(
        4096,
        ge=1,
        description="Prompt tokens the batched engine prefills per iteration: new prompts together "
        "within it, and a longer prompt in chunks of it between decode steps (chunked prefill).",
    )
    packed_steps: bool = Field(
        True,
        description="New prompts, and chunks of long ones (chunked prefill), in the decode step's "
        "own forward pass, each token through its own adapter and attending to its own keys "
        "only, instead of a pass of their own that the running streams wait for. Where the model and KV cache "
        "allow: the dynamic cache, attention through transformers' interface, full attention "
        "without ALiBi, every adapter through the fused LoRA; elsewhere prompts are prefilled separately.",
    )
    prefill_step_slowdown: float = Field(
        1.75,
        ge=0,
        description="While streams run, a packed step that carries prompt tokens lasts about "
        "this many plain decode steps: the tokens it carries are sized to fit, from the step "
        "times measured as the engine runs, within MAX_PREFILL_TOKENS (0: MAX_PREFILL_TOKENS "
        "alone). Bounds running streams' inter-token latency while long prompts join, on any "
        "hardware; a joining prompt then takes about slowdown / (slowdown - 1) times its prefill time. "
        "The bound is per joining request: with n waiting to join, a step may carry n times more, "
        "so a backlog drains as fast as with no limit.",
    )
    kv_cache: Literal["auto", "static", "dynamic"] = Field(
        "auto",
        description="The batched engine's KV cache. static: one preallocated slot of "
        "MAX_MODEL_LEN positions per batch row, and on CUDA each decode step replayed from a "
        "CUDA graph; dynamic: a cache that grows with the batch (no reservation). auto: static "
        "where CUDA graphs can run (CUDA, CUDA_GRAPHS on, no 8-bit layers) and the reservation "
        "fits in half the free GPU memory, else dynamic.",
    )
    cuda_graphs: bool = Field(
        True, description="With the static KV cache on CUDA, replay decode steps from CUDA graphs."
    )
    max_model_len: int = Field(
        0,
        ge=0,
        description="Longest prompt + completion served, in tokens; 0: the model's context. "
        "The static KV cache reserves this many positions per batch row.",
    )
    default_max_tokens: int = Field(
        1024,
        ge=0,
        description="Completion budget of a chat request that sets neither max_completion_tokens "
        "nor max_tokens; 0: up to the context (OpenAI's default, minutes of a CPU). Completions "
        "keep OpenAI's default of 16.",
    )
    max_resident_adapters: int = Field(
        8,
        ge=1,
        le=1024,
        description="Adapters kept loaded on the base; the least recently used idle one is evicted.",
    )
    max_lora_rank: int = Field(
        0,
        ge=0,
        le=1024,
        description="Rank the adapter slots are built at, at least (an adapter of a lower rank is "
        "zero-padded); 0: the highest rank loaded so far. With CUDA graphs, set the highest rank "
        "you will serve: a later adapter of a higher rank rebuilds the slots, and every decode "
        "step graph is captured again under traffic.",
    )
    max_cpu_adapters: int | None = Field(
        None,
        ge=0,
        le=100_000,
        description="Adapters whose weights stay in host memory after leaving a device slot, so "
        "swapping one back in is a copy, not a disk read; unset: MAX_RESIDENT_ADAPTERS.",
    )
    preload_adapters: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated adapters loaded into device slots at start (evictable).",
    )
    pinned_adapters: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated adapters loaded at start and never evicted (at most "
        "MAX_RESIDENT_ADAPTERS - 1); the admin API pins and unpins at run time.",
    )
    adapter_sources: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated prefixes the load API may fetch adapters from, besides "
        "ADAPTER_DIR: local directories, hf://org/ (or hf://org/repo), s3://bucket/prefix/, "
        "gs://bucket/prefix/.",
    )
    max_adapter_bytes: int = Field(
        2 << 30, ge=1024, description="Largest adapter package (its three files) a load accepts."
    )
    adapter_gate: bool = Field(
        True,
        description="Gate every adapter version before it serves (at start, on rescan and load): it "
        "must change the base's outputs and reproduce its golden prompts (docs/adapters.md). false "
        "skips the gate, with a warning per version.",
    )
    canary_error_margin: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Roll a canary back automatically when its error rate exceeds the stable "
        "version's by more than this (e.g. 0.05); unset: only the admin rolls back.",
    )
    canary_min_requests: int = Field(
        20, ge=1, description="Canary requests needed before CANARY_ERROR_MARGIN may roll it back."
    )
    releases_file: Path | None = Field(
        None,
        description="Releases YAML (docs/adapters.md, 'Fleet-wide releases'): each adapter's stable "
        "source and optional canary with its share, mounted from a ConfigMap so every replica "
        "serves the same release. Read at start and whenever its content changes.",
    )
    releases_poll_seconds: float = Field(
        10.0, gt=0.0, le=3600.0, description="How often RELEASES_FILE is checked for a change."
    )
    admin_local_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Also listen on 127.0.0.1:PORT, where requests need no key (admin included): "
        "for a sidecar in the same pod, such as the lora-syncer, that sends none. 0: off.",
    )
    prefix_cache_mb: int = Field(
        256,
        ge=0,
        le=1 << 20,
        description="Memory for the keys and values of prompt prefixes, reused by later prompts on "
        "the same adapter version that start with the same tokens (4-token blocks); 0: off.",
    )
    max_queued_requests: int = Field(
        256, ge=1, le=100_000, description="Requests waiting for the engine before new ones get 429."
    )
    # What one request may ask for (security review H1): prompts x n sequences, and the sum of
    # their max_tokens. One request of 16 prompts x n 16 once filled the whole queue.
    max_request_sequences: int = Field(
        64, ge=1, le=100_000, description="Sequences (prompts x n) one request may ask for; more is a 400 naming n."
    )
    max_request_tokens: int = Field(
        131_072,
        ge=1,
        description="Sum of max_tokens over a request's sequences; more is a 400 naming max_tokens.",
    )
    # Slow clients (security review M2; service/http_limits.py).
    http_read_timeout_seconds: float = Field(
        30.0, ge=0, le=3600, description="Seconds a client has to send a request's headers and body; 0: no limit."
    )
    http_write_timeout_seconds: float = Field(
        60.0, ge=0, le=3600, description="Seconds a client may leave a full send buffer unread; 0: no limit."
    )
    http_keepalive_seconds: float = Field(
        5.0, gt=0, le=3600, description="Idle seconds before a kept-alive connection closes."
    )
    max_connections: int = Field(
        1024, ge=0, le=1_000_000, description="Open connections before new requests get 503; 0: no limit."
    )
    allow_ignore_eos: bool = Field(
        False, description="Accept the ignore_eos extension (for benchmarks: it generates exactly max_tokens)."
    )
    request_timeout_seconds: float = Field(
        600.0,
        gt=0,
        le=86400,
        description="A request still generating after this long is stopped: 504 before the "
        "response starts, an error event at the end of a started stream.",
    )
    max_request_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1024,
        le=1 << 30,
        description="Largest request body accepted; larger ones get 413.",
    )
    drain_timeout_seconds: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="On SIGTERM, seconds to let in-flight requests and streams finish before exit.",
    )
    guardrails: str | None = Field(
        None,
        description="Guardrails YAML (docs/guardrails.md): a file, 'default' for the bundled "
        "service/guardrails/default.yaml, or unset for no hooks.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")

    @field_validator(
        "api_keys", "admin_api_keys", "preload_adapters", "pinned_adapters", "adapter_sources", mode="before"
    )
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("api_keys", "admin_api_keys")
    @classmethod
    def _keys_are_strong(cls, keys: list[str]) -> list[str]:
        for key in keys:
            if len(key) < 16:
                raise ValueError("every API key must be at least 16 characters long")
        return keys

    @model_validator(mode="after")
    def _keys_are_usable(self) -> Settings:
        if self.metrics_require_key and not (self.api_keys or self.admin_api_keys or self.tenants_file):
            raise ValueError("metrics_require_key needs API_KEYS, ADMIN_API_KEYS or TENANTS_FILE")
        if set(self.api_keys) & set(self.admin_api_keys):
            raise ValueError("admin keys must differ from API keys")
        if len(set(self.pinned_adapters)) > self.max_resident_adapters - 1:
            raise ValueError(
                f"pinned_adapters: at most MAX_RESIDENT_ADAPTERS - 1 ({self.max_resident_adapters - 1}) can be "
                "pinned; one slot must stay free for the other adapters"
            )
        if self.admin_local_port and self.admin_local_port == self.port:
            raise ValueError("admin_local_port must differ from port")
        return self

    @field_validator("prefill_step_slowdown")
    @classmethod
    def _slowdown_above_one(cls, value: float) -> float:
        if 0 < value <= 1:
            raise ValueError("must be 0 (off) or above 1: a step carrying prompt tokens lasts longer than one without")
        return value

    @field_validator("cache_dir", "adapter_dir")
    @classmethod
    def _expand(cls, path: Path) -> Path:
        return path.expanduser()

    @field_validator("model")
    @classmethod
    def _model_not_empty(cls, model: str) -> str:
        if not model.strip():
            raise ValueError("must name a base model")
        return model.strip()
