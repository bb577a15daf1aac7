"""`python -m service [--flags]`: start the OpenAI-compatible server (flags mirror HOTSWAP_* env)."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import time

import uvicorn

from service.settings import Settings

log = logging.getLogger("service")


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain on the first SIGTERM (issue #7).

    `/ready` turns 503 at once and new API requests get 503, while requests and streams already
    accepted run to completion, up to the drain timeout; then uvicorn shuts down and the process
    exits 0. A second signal (or SIGINT) stops at once, as plain uvicorn does.
    """

    def __init__(self, config: uvicorn.Config, state) -> None:
        super().__init__(config)
        self.state = state
        self.drain_timeout = config.timeout_graceful_shutdown or 0.0
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if sig != signal.SIGTERM or self.state.status != "ready" or self._loop is None:
            super().handle_exit(sig, frame)
            return
        self.state.status = "draining"
        log.info("SIGTERM: draining %d in-flight requests (up to %.0f s)", self.state.inflight, self.drain_timeout)
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))

    async def _drain(self) -> None:
        deadline = time.monotonic() + self.drain_timeout
        while self.state.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.state.inflight:
            log.warning("drain timeout: %d requests still in flight", self.state.inflight)
        self.should_exit = True


def main(argv: list[str] | None = None) -> int:
    settings = Settings(_cli_parse_args=sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from service.app import build_app
    from service.http_limits import deadline_protocol

    app = build_app(settings)
    server = DrainingServer(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            timeout_graceful_shutdown=settings.drain_timeout_seconds,
            http=deadline_protocol(settings.http_read_timeout_seconds, settings.http_write_timeout_seconds),
            timeout_keep_alive=settings.http_keepalive_seconds,
            limit_concurrency=settings.max_connections or None,
        ),
        app.state.hotswap,
    )
    failed: list[BaseException] = []

    def on_fatal(exc: BaseException) -> None:
        failed.append(exc)
        server.should_exit = True

    app.state.hotswap.on_fatal = on_fatal
    sockets = None
    if settings.admin_local_port:  # one server, two sockets: the public one and the pod-local one
        sockets = [server.config.bind_socket(), _loopback_socket(settings.admin_local_port)]
    server.run(sockets=sockets)
    return 1 if failed else 0


def _loopback_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.set_inheritable(True)
    return sock


if __name__ == "__main__":
    sys.exit(main())
