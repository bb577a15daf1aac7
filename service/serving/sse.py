"""Server-sent events framing of OpenAI streams: `data: {json}\\n\\n` ... `data: [DONE]\\n\\n`."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from pydantic import BaseModel

from service.errors import HotswapError, StepFailed
from service.request_id import current_request_id
from service.serving.errors import http_error, to_body

log = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


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
