"""Server-sent events framing of OpenAI streams: `data: {json}\\n\\n` ... `data: [DONE]\\n\\n`, and their deadline."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import TypeVar

from pydantic import BaseModel

from service.errors import HotswapError, RequestTimeoutError, StepFailed
from service.request_id import current_request_id
from service.serving.errors import http_error, to_body

log = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"
T = TypeVar("T")


@dataclass(frozen=True)
class Deadline:
    """When a request must be answered by (`time.monotonic()`), and the limit it comes from."""

    at: float
    limit: float

    @classmethod
    def after(cls, limit: float) -> Deadline:
        return cls(time.monotonic() + limit, limit)

    @property
    def passed(self) -> bool:
        return time.monotonic() > self.at

    def error(self) -> RequestTimeoutError:
        return RequestTimeoutError(f"the request took longer than {self.limit:g} s")


def within(chunks: AsyncIterator[T], deadline: Deadline | None) -> AsyncIterator[T]:
    """A stream's chunks until `deadline`, where it raises RequestTimeoutError: the stream's own
    framing turns that into its error event (chat's `data:` error, Responses' `event: error`)."""
    return chunks if deadline is None else _until(chunks, deadline)


async def _until(chunks: AsyncIterator[T], deadline: Deadline) -> AsyncIterator[T]:
    loop_deadline = asyncio.get_running_loop().time() + (deadline.at - time.monotonic())
    try:
        while True:
            try:
                async with asyncio.timeout_at(loop_deadline):  # same task: the stream can close
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise deadline.error() from None
            yield chunk
    finally:
        if isinstance(chunks, AsyncGenerator):
            await chunks.aclose()


def error_body(exc: HotswapError) -> dict:
    """The OpenAI error body of `exc`; a 500's cause goes to the log under the request id."""
    request_id = current_request_id()
    if http_error(exc).internal:
        log.error("request %s failed: %s", request_id, exc.message)
    return to_body(exc, request_id)


def sse(payload: BaseModel | dict) -> str:
    body = payload.model_dump(mode="json") if isinstance(payload, BaseModel) else payload
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def framed(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    """Frame chunks; an error after the stream started is sent as an OpenAI error event."""
    try:
        async for chunk in chunks:
            yield sse(chunk)
    except HotswapError as exc:
        yield sse(error_body(exc))
    except Exception as exc:  # the response has started: the status can no longer change
        log.exception("request %s: stream failed", current_request_id())
        yield sse(to_body(StepFailed(f"stream failed: {type(exc).__name__}"), current_request_id()))
    yield DONE
