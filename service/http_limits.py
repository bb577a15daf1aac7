"""Deadlines for slow clients, in uvicorn's h11 protocol (security review M2).

uvicorn bounds neither how long a client may take to send a request's headers and body nor how
long a response may wait on a client that stopped reading: a connection that never finished
its headers (slowloris) stayed open for good, and a stream whose reader stalled (a TCP zero
window) blocked its writer forever while the engine generated into memory. Both hold a file
descriptor and, in numbers, take the service down. This protocol adds:

- a read deadline: from the connection's start (or the end of the previous response, on a
  kept-alive connection) until the request's body is complete, READ_TIMEOUT_SECONDS;
- a write deadline: once the transport's buffer is full, the client must read some of it
  within WRITE_TIMEOUT_SECONDS;

and closes the connection at either. Closing it is a disconnect to the app: a running
generation is cancelled at the engine's next step. The connection cap is uvicorn's own
`limit_concurrency` (MAX_CONNECTIONS: a 503 beyond it). A fronting proxy with its own limits
is still the first line (docs/security.md).
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


def deadline_protocol(read_timeout: float, write_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with these deadlines (seconds; 0: none)."""

    class DeadlineProtocol(H11Protocol):
        _read_timer: asyncio.TimerHandle | None = None
        _write_timer: asyncio.TimerHandle | None = None
        _armed_after: object = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_read()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self._read_timer is not None and self._read_whole():
                self._read_timer.cancel()
                self._read_timer = None

        def _read_whole(self) -> bool:
            """Whether the request the read deadline is for has arrived whole (a new cycle,
            since the deadline was armed after the last, whose body is complete)."""
            cycle = self.cycle
            return cycle is not None and cycle is not self._armed_after and not cycle.more_body

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_read()  # the next request on this connection gets its own deadline

        def pause_writing(self) -> None:
            super().pause_writing()
            if write_timeout and self._write_timer is None:
                self._write_timer = self.loop.call_later(write_timeout, self._timed_out, "write")

        def resume_writing(self) -> None:
            super().resume_writing()
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None

        def _arm_read(self) -> None:
            self._armed_after = self.cycle  # the request before the one this deadline is for
            if self._read_timer is not None:
                self._read_timer.cancel()
            self._read_timer = self.loop.call_later(read_timeout, self._timed_out, "read") if read_timeout else None

        def _disarm(self) -> None:
            for timer in (self._read_timer, self._write_timer):
                if timer is not None:
                    timer.cancel()
            self._read_timer = self._write_timer = None

        def _timed_out(self, what: str) -> None:
            if self.transport.is_closing():
                return
            if what == "read" and self._read_whole():
                return  # read whole meanwhile
            log.warning("closing a connection from %s: %s deadline passed", self.client, what)
            self.transport.abort()  # close() would wait for the unread buffer to drain

    return DeadlineProtocol
