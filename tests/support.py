"""Small helpers shared by test modules."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_service(
    flags: list[str], env: dict[str, str], log: Path, timeout: float = 300
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m service FLAGS` on a free port, ready; yields (base URL, process); stops it after."""
    port = free_port()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", *flags, "--port", str(port)],
            env={**os.environ, "HOTSWAP_ALLOW_IGNORE_EOS": "true", **env},  # the tests' long generations
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the service did not become ready:\n" + log.read_text()
            time.sleep(0.25)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def events(response) -> list:
    """The JSON chunks of an SSE response (checked to end with [DONE])."""
    body = response.text
    assert body.endswith("data: [DONE]\n\n")
    frames = body.split("\n\n")[:-1]
    assert all(f.startswith("data: ") for f in frames)
    return [json.loads(f[6:]) for f in frames[:-1]]


def failing(real, failures: dict, message: str):
    """`real`, except that its next `failures["left"]` calls raise RuntimeError(message)."""

    def call(*args, **kwargs):
        if failures["left"]:
            failures["left"] -= 1
            raise RuntimeError(message)
        return real(*args, **kwargs)

    return call
