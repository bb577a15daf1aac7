"""HTTP routes: parse, resolve, hand over to serving, and nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from service.auth import admin_scope, require_admin_key, require_api_key, require_metrics_key, require_quota, tenant_of
from service.errors import NotFoundError, ServiceUnavailableError
from service.protocol import ChatCompletionRequest, CompletionRequest
from service.protocol_objects import (
    ChatCompletionResponse,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    ServiceStatus,
)
from service.protocol_responses import ResponseObject, ResponsesRequest
from service.protocol_vllm import (
    CanaryTraffic,
    DetokenizeRequest,
    DetokenizeResponse,
    LoadLoRAAdapterRequest,
    TokenizeRequest,
    TokenizeResponse,
    UnloadLoRAAdapterRequest,
)
from service.serving.adapters import AdapterServing, ReleasesWatch
from service.serving.chat import ChatServing
from service.serving.completions import CompletionServing
from service.serving.context import ServingContext, Target
from service.serving.responses import ResponsesServing, to_chat
from service.serving.sse import Deadline
from service.serving.tokenization import TokenizerServing

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 429, 500, 503, 504)}
# Completions answer JSON, or server-sent events when the request sets `stream`.
# Each event's `data` is a JSON chunk of the response's shape, or the final "[DONE]".
_STREAMS = {
    200: {
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "properties": {"data": {"type": "string"}},
                    "required": ["data"],
                }
            }
        }
    }
}


def serving_context(request: Request) -> ServingContext:
    state = request.app.state.hotswap
    if state.status == "draining":
        raise ServiceUnavailableError("the service is shutting down; retry on another replica")
    if state.context is None:
        raise ServiceUnavailableError(f"the service is {state.status}; retry shortly")
    return state.context.for_tenant(tenant_of(request))


Context = Annotated[ServingContext, Depends(serving_context)]

api = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=_ERRORS)
ops = APIRouter()
# vLLM serves these at the root, not under /v1; they need an API key like /v1 does.
tokenizer = APIRouter(dependencies=[Depends(require_api_key)], responses=_ERRORS)
admin = APIRouter(prefix="/admin", dependencies=[Depends(require_admin_key)], responses=_ERRORS)
# vLLM's adapter endpoints live under /v1 but change the server: they need the admin key.
lora = APIRouter(prefix="/v1", dependencies=[Depends(require_admin_key)], responses=_ERRORS)


T = TypeVar("T")
audit = logging.getLogger("hotswap.audit")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that hung up; only metrics see it
DISCONNECT_POLL_SECONDS = 0.25


Create = Callable[[Callable[[Target], None], Deadline], Awaitable[object]]  # serving's create(on_target, deadline)


async def _generate(request: Request, create: Create) -> Response:
    """A generating route: serving's `create(on_target, deadline)` within the request's time
    limit, answered with the version that served it."""
    deadline = Deadline.after(request.app.state.settings.request_timeout_seconds)
    return _respond(await _unless_disconnected(request, create(_labelled(request), deadline), deadline), request)


async def _unless_disconnected(request: Request, work: Awaitable[T], deadline: Deadline) -> T | Response:
    """Run `work`; if the client hangs up first, or the request outlives its time limit, cancel
    it, which cancels its generations.

    Streams notice a disconnect when a write fails; a non-streaming request would otherwise
    generate to the end for nobody. A started stream gets the rest of its time limit (serving
    ends it with the API's error event at `deadline`).
    """
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
        if done:
            return task.result()
        if await request.is_disconnected() or deadline.passed:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if deadline.passed:
                raise deadline.error()
            return Response(status_code=CLIENT_CLOSED_REQUEST)


VERSION_HEADER = "X-Adapter-Version"


def _respond(result: object, request: Request) -> Response:
    """The response, saying which adapter version answered (X-Adapter-Version)."""
    version = getattr(request.state, "version", None)
    headers = {VERSION_HEADER: version} if version else {}
    if isinstance(result, Response):
        result.headers.update(headers)
        return result
    if isinstance(result, AsyncIterator):
        headers["Cache-Control"] = "no-cache"
        return StreamingResponse(_watched(result, request), media_type="text/event-stream", headers=headers)
    return JSONResponse(result.model_dump(mode="json"), headers=headers)


async def _watched(frames: AsyncIterator[str], request: Request) -> AsyncIterator[str]:
    """A stream's frames; one that ends in an error event (chat's and completions' `data:`
    error, Responses' `event: error`) counts as a failed request (the status is 200 by then),
    for the per-version metrics and the canary's automatic rollback."""
    async with contextlib.aclosing(frames):
        async for frame in frames:
            if frame.startswith(('data: {"error"', "event: error\n")):
                request.state.failed = True
            yield frame


def _labelled(request: Request) -> Callable[[Target], None]:
    """Told the resolved model: the request's metrics are labelled with it and its version."""

    def label(target: Target) -> None:
        request.state.adapter = target.label
        request.state.version = target.version
        request.state.role = target.role

    return label


def _audit(request: Request, action: str, target: str, outcome: str = "ok") -> None:
    """One line per admin action: who (a key's id or a tenant, never the key), what, on what."""
    audit.info("%s %s %s: %s", getattr(request.state, "actor", "?"), action, target, outcome)


async def _audited(request: Request, action: str, target: str, work: Awaitable[T]) -> T:
    try:
        result = await work
    except Exception as exc:
        _audit(request, action, target, f"refused ({type(exc).__name__}: {exc})")
        raise
    _audit(request, action, target)
    return result


Quota = [Depends(require_quota)]  # the generating routes spend the tenant's requests per minute


@api.post("/completions", response_model=CompletionResponse, responses=_STREAMS, dependencies=Quota)
async def create_completion(body: CompletionRequest, request: Request, ctx: Context) -> Response:
    return await _generate(request, partial(CompletionServing(ctx).create, body))


@api.post("/chat/completions", response_model=ChatCompletionResponse, responses=_STREAMS, dependencies=Quota)
async def create_chat_completion(body: ChatCompletionRequest, request: Request, ctx: Context) -> Response:
    return await _generate(request, partial(ChatServing(ctx).create, body))


@api.post("/responses", response_model=ResponseObject, responses=_STREAMS, dependencies=Quota)
async def create_response(body: ResponsesRequest, request: Request, ctx: Context) -> Response:
    """OpenAI's Responses API, stateless: the conversation comes whole in `input`."""
    return await _generate(request, partial(ResponsesServing(ctx, body).create, to_chat(body)))


@api.get("/models")
async def list_models(ctx: Context) -> ModelList:
    return ModelList(data=AdapterServing(ctx).cards())


@api.get("/models/{model_id:path}")
async def retrieve_model(model_id: str, ctx: Context) -> ModelCard:
    for card in AdapterServing(ctx).cards():
        if card.id == model_id:
            return card
    raise NotFoundError(f"the model {model_id!r} does not exist", param="model")


# vLLM answers a successful load or unload in plain text; errors are JSON as everywhere.
_TEXT = {200: {"description": "Success", "content": {"text/plain": {"schema": {"type": "string"}}}}}


@lora.post("/load_lora_adapter", response_model=None, responses=_TEXT)
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request, ctx: Context) -> Response:
    """vLLM's: fetch, check and serve an adapter (`load_inplace`: a new version of a served
    name; running requests finish on theirs)."""
    admin_scope(request, body.lora_name)
    target = f"{body.lora_name} from {body.lora_path}"
    return PlainTextResponse(await _audited(request, "load", target, AdapterServing(ctx).load(body)))


@lora.post("/unload_lora_adapter", response_model=None, responses=_TEXT)
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request, ctx: Context) -> Response:
    """vLLM's: stop serving an adapter; running requests on it finish."""
    admin_scope(request, body.lora_name)
    return PlainTextResponse(await _audited(request, "unload", body.lora_name, AdapterServing(ctx).unload(body)))


@tokenizer.post("/tokenize")
async def tokenize(body: TokenizeRequest, ctx: Context) -> TokenizeResponse:
    return await ctx.offload(TokenizerServing(ctx).tokenize, body)  # CPU work: off the event loop


@tokenizer.post("/detokenize")
async def detokenize(body: DetokenizeRequest, ctx: Context) -> DetokenizeResponse:
    return await ctx.offload(TokenizerServing(ctx).detokenize, body)


@tokenizer.get("/tokenizer_info")
async def tokenizer_info(ctx: Context) -> JSONResponse:
    return JSONResponse(TokenizerServing(ctx).info())


_STATUS = {200: {"model": ServiceStatus}, 503: {"model": ServiceStatus}}


@ops.get("/health", responses=_STATUS)
async def health(request: Request) -> JSONResponse:
    """Liveness: the process answers, and neither the start nor the engine has failed."""
    state = request.app.state.hotswap
    ok = state.status != "failed" and (state.context is None or state.context.engine.healthy)
    return JSONResponse({"status": state.status if ok else "failed"}, status_code=200 if ok else 503)


@ops.get("/ready", responses=_STATUS)
async def ready(request: Request) -> JSONResponse:
    """Readiness: model, adapters and engine are up and the service is not draining."""
    state = request.app.state.hotswap
    ok = state.status == "ready" and state.context is not None and state.context.engine.healthy
    return JSONResponse({"status": state.status}, status_code=200 if ok else 503)


@admin.post("/adapters/rescan")
async def rescan_adapters(request: Request, ctx: Context) -> JSONResponse:
    """Scan the adapter directory again: new packages are served, removed ones refused, and a
    changed one is a new version (new requests get it; running ones finish on theirs)."""
    admin_scope(request, None)
    diff = await _audited(request, "rescan", "the adapter directory", AdapterServing(ctx).rescan())
    return JSONResponse({**diff, "adapters": [r.as_dict() for r in ctx.registry.records()]})


@admin.post("/adapters/{name}/reload")
async def reload_adapter(name: str, request: Request, ctx: Context) -> JSONResponse:
    """Re-validate the adapter directory; this adapter's new version, if any, serves next."""
    admin_scope(request, None)
    await _audited(request, "reload", name, AdapterServing(ctx).rescan())
    record = next((r for r in ctx.registry.records() if r.name == name), None)
    if record is None:
        raise NotFoundError(f"the adapter {name!r} does not exist", param="name")
    return JSONResponse(record.as_dict())


@admin.post("/adapters/{name}/promote")
async def promote_adapter(name: str, request: Request, ctx: Context) -> ModelCard:
    """The canary becomes the stable version: every new request gets it at once."""
    admin_scope(request, name)
    return await _audited(request, "promote", name, _now(AdapterServing(ctx).promote, name))


@admin.post("/adapters/{name}/rollback")
async def rollback_adapter(name: str, request: Request, ctx: Context) -> ModelCard:
    """Drop the canary, or with none return to the version the last promotion or in-place load
    replaced: new requests get the old version at once; running ones finish on theirs."""
    admin_scope(request, name)
    return await _audited(request, "rollback", name, _now(AdapterServing(ctx).rollback, name))


@admin.post("/adapters/{name}/traffic")
async def set_canary_traffic(name: str, body: CanaryTraffic, request: Request, ctx: Context) -> ModelCard:
    """Change the canary's share of the name's requests."""
    admin_scope(request, name)
    target = f"{name} to {body.traffic:g}"
    return await _audited(request, "traffic", target, _now(AdapterServing(ctx).traffic, name, body.traffic))


@admin.get("/releases")
async def releases_status(request: Request) -> JSONResponse:
    """RELEASES_FILE on this replica: the reading acted on last, and what each step did."""
    admin_scope(request, None)
    return JSONResponse(_releases(request).status())


@admin.post("/releases/sync")
async def sync_releases(request: Request, ctx: Context) -> JSONResponse:
    """Act on RELEASES_FILE now, even if it has not changed: retries the steps that failed."""
    admin_scope(request, None)
    watch = _releases(request)
    status = await _audited(request, "sync", str(watch.path), watch.sync(ctx, force=True))
    return JSONResponse(status)


def _releases(request: Request) -> ReleasesWatch:
    watch = request.app.state.hotswap.releases
    if watch is None:
        raise NotFoundError("no releases file on this replica: set RELEASES_FILE", code="not_found")
    return watch


@admin.post("/adapters/{name}/pin")
async def pin_adapter(name: str, request: Request, ctx: Context) -> ModelCard:
    """Keep the adapter in a device slot: loaded now, never evicted."""
    admin_scope(request, name)
    return await _audited(request, "pin", name, _now(AdapterServing(ctx).pin, name, True))


@admin.post("/adapters/{name}/unpin")
async def unpin_adapter(name: str, request: Request, ctx: Context) -> ModelCard:
    """Let the adapter be evicted again when its slot is wanted."""
    admin_scope(request, name)
    return await _audited(request, "unpin", name, _now(AdapterServing(ctx).pin, name, False))


async def _now(fn: Callable[..., T], *args: object) -> T:
    return fn(*args)


@ops.get(
    "/metrics",
    dependencies=[Depends(require_metrics_key)],
    response_class=PlainTextResponse,
    responses={401: {"model": ErrorResponse}},
)
async def metrics(request: Request) -> Response:
    """Whole for the admin key; else as the reader's tenant may see it (Metrics.render)."""
    m = request.app.state.hotswap.metrics
    return Response(m.render(request.state.metrics_reader), media_type=m.content_type)
