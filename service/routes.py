"""HTTP routes: parse, resolve, hand over to serving, and nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from service.auth import require_admin_key, require_api_key, require_metrics_key
from service.errors import NotFoundError, RequestTimeoutError, ServiceUnavailableError
from service.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    ServiceStatus,
    TokenizeRequest,
    TokenizeResponse,
)
from service.serving.chat import ChatServing
from service.serving.completions import CompletionServing
from service.serving.generation import ServingContext
from service.serving.sse import DONE, error_body, sse
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
    return state.context


Context = Annotated[ServingContext, Depends(serving_context)]

api = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=_ERRORS)
ops = APIRouter()
# vLLM serves these at the root, not under /v1; they need an API key like /v1 does.
tokenizer = APIRouter(dependencies=[Depends(require_api_key)], responses=_ERRORS)
admin = APIRouter(prefix="/admin", dependencies=[Depends(require_admin_key)], responses=_ERRORS)


T = TypeVar("T")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that hung up; only metrics see it
DISCONNECT_POLL_SECONDS = 0.25


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | Response:
    """Run `work`; if the client hangs up first, or the request outlives its time limit, cancel
    it, which cancels its generations.

    Streams notice a disconnect when a write fails; a non-streaming request would otherwise
    generate to the end for nobody. A started stream gets the rest of its time limit.
    """
    limit = request.app.state.settings.request_timeout_seconds
    deadline = time.monotonic() + limit
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
        if done:
            result = task.result()
            if isinstance(result, AsyncIterator):
                return _until(result, deadline, limit)
            return result
        if await request.is_disconnected() or time.monotonic() > deadline:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            if time.monotonic() > deadline:
                raise RequestTimeoutError(f"the request took longer than {limit:g} s")
            return Response(status_code=CLIENT_CLOSED_REQUEST)


async def _until(stream: AsyncIterator[str], deadline: float, limit: float) -> AsyncIterator[str]:
    """A started SSE stream that ends with an OpenAI error event at the deadline."""
    loop_deadline = asyncio.get_running_loop().time() + (deadline - time.monotonic())
    async with contextlib.aclosing(stream):
        while True:
            try:
                async with asyncio.timeout_at(loop_deadline):  # same task: the stream can close
                    frame = await anext(stream)
            except StopAsyncIteration:
                return
            except TimeoutError:
                yield sse(error_body(RequestTimeoutError(f"the request took longer than {limit:g} s")))
                yield DONE
                return
            yield frame


def _respond(result: object) -> Response:
    if isinstance(result, Response):
        return result
    if isinstance(result, AsyncIterator):
        return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return JSONResponse(result.model_dump(mode="json"))


@api.post("/completions", response_model=CompletionResponse, responses=_STREAMS)
async def create_completion(body: CompletionRequest, request: Request, ctx: Context) -> Response:
    serving = CompletionServing(ctx)
    target = serving.resolve(body)
    request.state.adapter = target.label
    return _respond(await _unless_disconnected(request, serving.create(body, target)))


@api.post("/chat/completions", response_model=ChatCompletionResponse, responses=_STREAMS)
async def create_chat_completion(body: ChatCompletionRequest, request: Request, ctx: Context) -> Response:
    serving = ChatServing(ctx)
    target = serving.resolve(body)
    request.state.adapter = target.label
    return _respond(await _unless_disconnected(request, serving.create(body, target)))


def _model_cards(ctx: ServingContext) -> list[ModelCard]:
    cards = [ModelCard(id=ctx.base_id)]
    for record in ctx.registry.ready():
        manifest = record.manifest
        cards.append(
            ModelCard(
                id=record.name,
                parent=ctx.base_id,
                description=manifest.description,
                prompt_template=manifest.prompt_template,
                input_fields=[f.model_dump() for f in manifest.input_fields],
                output=manifest.output.model_dump(),
            )
        )
    return cards


@api.get("/models")
async def list_models(ctx: Context) -> ModelList:
    return ModelList(data=_model_cards(ctx))


@api.get("/models/{model_id:path}")
async def retrieve_model(model_id: str, ctx: Context) -> ModelCard:
    for card in _model_cards(ctx):
        if card.id == model_id:
            return card
    raise NotFoundError(f"the model {model_id!r} does not exist", param="model")


@tokenizer.post("/tokenize")
async def tokenize(body: TokenizeRequest, ctx: Context) -> TokenizeResponse:
    return TokenizerServing(ctx).tokenize(body)


@tokenizer.post("/detokenize")
async def detokenize(body: DetokenizeRequest, ctx: Context) -> DetokenizeResponse:
    return TokenizerServing(ctx).detokenize(body)


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
async def rescan_adapters(ctx: Context) -> JSONResponse:
    """Scan the adapter directory again: new packages are served, removed ones refused, and
    changed ones reload at their next use with no request running on them."""
    diff = ctx.registry.rescan()
    residency = getattr(ctx.engine, "residency", None)
    if residency is not None:
        residency.mark_stale(diff["changed"])
    return JSONResponse({**diff, "adapters": [r.as_dict() for r in ctx.registry.records()]})


@admin.post("/adapters/{name}/reload")
async def reload_adapter(name: str, ctx: Context) -> JSONResponse:
    """Re-validate one package and reload it at its next idle use."""
    diff = ctx.registry.rescan()
    record = next((r for r in ctx.registry.records() if r.name == name), None)
    if record is None:
        raise NotFoundError(f"the adapter {name!r} does not exist", param="name")
    residency = getattr(ctx.engine, "residency", None)
    if residency is not None:
        residency.mark_stale([name, *diff["changed"]])
    return JSONResponse(record.as_dict())


@ops.get(
    "/metrics",
    dependencies=[Depends(require_metrics_key)],
    response_class=PlainTextResponse,
    responses={401: {"model": ErrorResponse}},
)
async def metrics(request: Request) -> Response:
    m = request.app.state.hotswap.metrics
    return Response(m.render(), media_type=m.content_type)
