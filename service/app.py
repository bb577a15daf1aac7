"""The app factory: `build_app(settings, runtime=None)`.

Nothing heavy happens at import or in the factory. The lifespan starts loading the base model
and adapters in a worker thread, so `/health` answers at once and `/ready` turns 200 when the
engine runs. Given a `runtime` (tests, embedding), the app serves it as it is.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import __version__
from service.adapters.desired import read as read_releases
from service.errors import HotswapError, InvalidRequestError, NotFoundError, RateLimited, RequestTooLargeError
from service.guardrails import GuardrailConfigError, Guardrails
from service.guardrails import load as load_guardrails
from service.metrics import Metrics
from service.names import BASE
from service.request_id import HEADER as REQUEST_ID_HEADER
from service.request_id import RequestIdMiddleware
from service.runtime import Runtime, load_runtime
from service.serving.adapters import AdapterServing, ReleasesWatch
from service.serving.context import ServingContext
from service.serving.errors import HTTPStatusError, error_code, http_error, to_body
from service.serving.sse import error_body
from service.settings import Settings
from service.tenants import RateLimits, Tenants, retry_after
from service.tenants import from_settings as tenants_from

log = logging.getLogger(__name__)

Status = Literal["starting", "ready", "draining", "stopping", "failed"]


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    status: Status = "starting"
    context: ServingContext | None = None
    error: str | None = None
    inflight: int = 0  # API requests accepted and not yet answered to the last byte
    compute: ThreadPoolExecutor | None = None  # loads the model, then runs the engine loop
    rate_limits: RateLimits | None = None  # the tenants' per-minute buckets
    tenants: Tenants | None = None  # TENANTS_FILE, read once: auth and the engine's shares agree
    releases: ReleasesWatch | None = None  # RELEASES_FILE: re-read whenever it changes
    watching: asyncio.Task | None = None  # the RELEASES_FILE poll, once ready
    # Called when the start fails; `python -m service` makes the server exit non-zero.
    on_fatal: Callable[[BaseException], None] = lambda exc: None

    def serve(self, runtime: Runtime, guardrails: Guardrails) -> ServingContext:
        self.context = ServingContext(
            engine=runtime.engine,
            tokenizer=runtime.tokenizer,
            registry=runtime.registry,
            base_id=runtime.base_id,
            max_context=runtime.max_context,
            metrics=self.metrics,
            guardrails=guardrails,
            default_max_tokens=self.settings.default_max_tokens,
            max_request_sequences=self.settings.max_request_sequences,
            max_request_tokens=self.settings.max_request_tokens,
            allow_ignore_eos=self.settings.allow_ignore_eos,
            rate_limits=self.rate_limits,
            quantization=self.settings.quantization,
            gate=self.settings.adapter_gate,
        )
        return self.context


async def _start(state: ServiceState, runtime: Runtime | None) -> None:
    try:
        guardrails = load_guardrails(state.settings.guardrails)  # a bad config fails fast
        compute = None
        if runtime is None:
            # One thread loads the model and then runs the engine: torch's CPU thread pool
            # belongs to the thread that first computes (see WorkerEngine.start).
            compute = state.compute = ThreadPoolExecutor(1, thread_name_prefix="hotswap-compute")
            loop = asyncio.get_running_loop()
            runtime = await loop.run_in_executor(compute, load_runtime, state.settings, state.metrics, state.tenants)
        check_adapters_named(guardrails, runtime)
        await runtime.engine.start(compute)  # None: the engine makes its own thread
        context = state.serve(runtime, guardrails)
        await AdapterServing(context).gate_all()  # before any request: the status is "starting"
        if state.releases is not None:  # a new pod serves the fleet's release before its first request
            await state.releases.sync(context)
            every = state.settings.releases_poll_seconds
            state.watching = asyncio.create_task(state.releases.watch(context, every))
        state.status = "ready"
        log.info("ready: serving %s", runtime.base_id)
    except Exception as exc:
        state.status, state.error = "failed", f"{type(exc).__name__}: {exc}"
        log.error("start failed: %s", state.error, exc_info=exc)
        state.on_fatal(exc)


def check_adapters_named(guardrails: Guardrails, runtime: Runtime) -> None:
    """A guardrail section for an adapter that is not served is a typo, not a no-op."""
    served = {BASE, *(record.name for record in runtime.registry.ready())}
    unknown = sorted(set(guardrails.adapters) - served)
    if unknown:
        raise GuardrailConfigError(f"{guardrails.source}: adapters {unknown} are not served; served: {sorted(served)}")


def _lifespan(runtime: Runtime | None):
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state: ServiceState = app.state.hotswap
        starting = asyncio.create_task(_start(state, runtime))
        yield
        state.status = "stopping"
        tasks = [t for t in (starting, state.watching) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if state.context is not None:
            await state.context.engine.stop()
        if state.compute is not None:
            state.compute.shutdown(wait=False)

    return lifespan


# ------------------------------------------------------------------------------------------------
# Errors: one place maps every failure to an OpenAI-shaped body.


RETRY_AFTER_SECONDS = "1"  # overload and drain are short-lived: come back soon (or elsewhere)


def _error_response(exc: HotswapError) -> JSONResponse:
    status = http_error(exc).status
    headers = {"Retry-After": RETRY_AFTER_SECONDS} if status in (429, 503) else None
    if isinstance(exc, RateLimited):  # the tenant's bucket says when
        headers = {"Retry-After": retry_after(exc.retry_after)}
    return JSONResponse(error_body(exc), status_code=status, headers=headers)


def _rejection_reason(exc: HotswapError) -> str | None:
    """Refusals counted in hotswap_rejected_requests_total{reason}; None for ordinary errors."""
    http, code = http_error(exc), error_code(exc)
    if http.status in (413, 429, 503) or code == "content_policy_violation":
        return code or http.type
    return None


def _validation_param(loc: tuple) -> str | None:
    """`("body", "messages", 0, "role")` -> "messages.0.role"; pydantic's union-branch tags
    (`str`, `list[int]`, `function-after[...]`) are dropped."""
    parts = [str(p) for p in loc[1:] if not (isinstance(p, str) and ("[" in p or p in _TAGS))]
    return ".".join(parts) or None


_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HotswapError)
    async def hotswap_error(request: Request, exc: HotswapError) -> JSONResponse:
        reason = _rejection_reason(exc)
        if reason is not None:
            request.app.state.hotswap.metrics.rejected.labels(reason).inc()
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = (first.get("ctx") or {}).get("param")  # a body-wide check that names its field
        if param is not None:
            return _error_response(InvalidRequestError(first["msg"], param=param))
        if first.get("type") == "json_invalid" or tuple(first.get("loc", ())) == ("body",):
            return _error_response(InvalidRequestError(f"the request body is invalid: {first['msg']}"))
        param = _validation_param(tuple(first["loc"]))
        message = first["msg"].removeprefix("Value error, ")
        return _error_response(InvalidRequestError(f"{param}: {message}", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return _error_response(NotFoundError(f"no route {request.url.path}", code="not_found"))
        return _error_response(HTTPStatusError(str(exc.detail), exc.status_code))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette calls this from its outermost middleware, past RequestIdMiddleware's
        # header: the id is set here again.
        request_id = request.state.request_id
        log.error("request %s: unhandled error on %s", request_id, request.url.path, exc_info=exc)
        # Logged above with its traceback: the body is built directly, not logged a second time.
        body = to_body(HotswapError(f"{type(exc).__name__}: {exc}"), request_id)
        return JSONResponse(body, status_code=500, headers={REQUEST_ID_HEADER: request_id})


# ------------------------------------------------------------------------------------------------
# Request metrics, counted after the last byte (streams included).

_COUNTED_PATHS = {
    "/v1/completions": "completions",
    "/v1/chat/completions": "chat_completions",
    "/v1/responses": "responses",
}


class RequestMetricsMiddleware:
    """Counts API requests after their last byte, and how many are in flight (for the drain)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, state: ServiceState):
        self.app, self.metrics, self.state = app, metrics, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = _COUNTED_PATHS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500
        self.state.inflight += 1

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            self.state.inflight -= 1
            labels = scope.get("state", {})
            adapter, seconds = labels.get("adapter", "none"), time.perf_counter() - started
            self.metrics.requests.labels(endpoint, adapter, str(status)).inc()
            self.metrics.request_duration.labels(endpoint, adapter).observe(seconds)
            if labels.get("version"):
                self._count_version(adapter, labels, status >= 500 or labels.get("failed", False), seconds)

    def _count_version(self, adapter: str, labels: dict, failed: bool, seconds: float) -> None:
        """Per-version metrics, and the canary's automatic rollback (CANARY_ERROR_MARGIN)."""
        version, role = labels["version"], labels.get("role") or "stable"
        self.metrics.version_requests.labels(adapter, version, role, "error" if failed else "ok").inc()
        self.metrics.version_latency.labels(adapter, version, role).observe(seconds)
        context, settings = self.state.context, self.state.settings
        if context is None:
            return
        dropped = context.registry.observe(
            adapter, role, failed, margin=settings.canary_error_margin, min_requests=settings.canary_min_requests
        )
        if dropped is not None:
            canary, reason = dropped
            self.metrics.rollbacks.labels(adapter, "automatic").inc()
            self.metrics.canary_traffic.labels(adapter, canary).set(0)
            logging.getLogger("hotswap.audit").warning("hotswap rollback %s (canary %s): %s", adapter, canary, reason)


class BodyLimitMiddleware:
    """413 for request bodies over `max_bytes`: by Content-Length before reading, or while
    reading a chunked body, so an oversized upload is never buffered whole."""

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: Metrics):
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", ())).get(b"content-length")
        too_large = RequestTooLargeError(f"the request body exceeds {self.max_bytes} bytes")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            self.metrics.rejected.labels("request_too_large").inc()
            await _error_response(too_large)(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                self.metrics.rejected.labels("request_too_large").inc()
                # FastAPI turns other exceptions raised while reading the body into a 400.
                raise HTTPException(413, detail=too_large.message)
            return message

        await self.app(scope, counted, send)


def build_app(settings: Settings | None = None, runtime: Runtime | None = None) -> FastAPI:
    from service.routes import admin, api, lora, ops, tokenizer

    settings = settings or Settings()
    docs = settings.api_docs if settings.api_docs is not None else not (settings.api_keys or settings.tenants_file)
    app = FastAPI(
        title="hotswap",
        version=__version__,
        lifespan=_lifespan(runtime),
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.settings = settings
    app.state.tenants = tenants_from(settings)  # a bad TENANTS_FILE fails here, before the model loads
    app.state.rate_limits = RateLimits()
    app.state.hotswap = ServiceState(settings=settings, rate_limits=app.state.rate_limits, tenants=app.state.tenants)
    if settings.releases_file is not None:
        read_releases(settings.releases_file)  # a bad RELEASES_FILE fails here too
        app.state.hotswap.releases = ReleasesWatch(settings.releases_file)
    app.include_router(api)
    app.include_router(ops)
    app.include_router(admin)
    app.include_router(lora)
    app.include_router(tokenizer)
    _install_error_handlers(app)
    app.add_middleware(RequestMetricsMiddleware, metrics=app.state.hotswap.metrics, state=app.state.hotswap)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes, metrics=app.state.hotswap.metrics)
    app.add_middleware(RequestIdMiddleware)  # outermost: every response carries the id
    return app
