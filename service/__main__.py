"""`python -m service [--flags]`: start the OpenAI-compatible server (flags mirror HOTSWAP_* env)."""

from __future__ import annotations

import logging
import sys

import uvicorn

from service.settings import Settings


def main(argv: list[str] | None = None) -> int:
    settings = Settings(_cli_parse_args=sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from service.app import build_app

    app = build_app(settings)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            timeout_graceful_shutdown=settings.drain_timeout_seconds,
        )
    )
    failed: list[BaseException] = []

    def on_fatal(exc: BaseException) -> None:
        failed.append(exc)
        server.should_exit = True

    app.state.hotswap.on_fatal = on_fatal
    server.run()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
