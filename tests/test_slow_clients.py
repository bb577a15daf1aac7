"""Slow clients cannot hold a connection (security review M2): a real server on the tiny model,
with short deadlines, and raw sockets that send half a request or stop reading."""

from __future__ import annotations

import json
import socket

import pytest

from tests.support import running_service

DEADLINE = 1.0


@pytest.fixture(scope="module")
def address(tiny, cache_dir, tmp_path_factory):
    env = {
        "HOTSWAP_ADAPTER_DIR": str(tiny.adapter_dir),
        "HOTSWAP_CACHE_DIR": str(cache_dir),
        "HOTSWAP_HTTP_READ_TIMEOUT_SECONDS": str(DEADLINE),
        "HOTSWAP_HTTP_WRITE_TIMEOUT_SECONDS": str(DEADLINE),
    }
    flags = ["--model", str(tiny.base_dir), "--quantization", "fp32", "--device", "cpu"]
    log = tmp_path_factory.mktemp("log") / "server.log"
    with running_service(flags, env, log) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        yield host, int(port), log


def closed_by_server(sock: socket.socket) -> bool:
    """Read until the server closes the connection (b""); a hang fails on the socket timeout."""
    sock.settimeout(60)  # bounds a hang only: the deadline is 1 s
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


@pytest.mark.parametrize(
    "sent",
    [
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n",  # headers never finished
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
        b"",  # a connection that says nothing
    ],
    ids=["half-headers", "half-body", "silent"],
)
def test_a_request_that_never_arrives_whole_is_closed(address, sent):
    with socket.create_connection(address[:2]) as sock:
        sock.sendall(sent)
        assert closed_by_server(sock)


def test_a_kept_alive_connection_gets_a_new_read_deadline(address):
    body = json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 1}).encode()
    request = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    with socket.create_connection(address[:2]) as sock:
        sock.sendall(request)
        sock.settimeout(60)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\n")  # and then nothing
        assert closed_by_server(sock)


def test_a_client_that_stops_reading_is_dropped(address):
    """A stream whose reader stalls (its receive window full) once blocked its writer forever;
    now the write deadline drops the connection: the stream never completes for that client."""
    import time

    body = json.dumps(
        {"model": "tiny", "prompt": ["x"] * 4, "n": 16, "max_tokens": 200, "stream": True, "logprobs": 5}
    ).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window that fills fast
    sock.connect(address[:2])
    with sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )  # and no reading, until the server says it dropped the connection
        deadline = time.monotonic() + 120  # bounds a hang only
        while "write deadline passed" not in address[2].read_text():
            assert time.monotonic() < deadline, "the stalled stream was never dropped"
            time.sleep(0.1)
        received = b""
        sock.settimeout(60)
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    assert b"[DONE]" not in received  # (what was buffered may arrive, or the reset first)
