"""SIGTERM drains: /ready 503 at once, new requests 503, accepted streams complete, exit 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx

from tests.support import running_service


def test_sigterm_during_live_streams_completes_every_accepted_request(tiny, cache_dir, tmp_path):
    env = {"HOTSWAP_ADAPTER_DIR": str(tiny.adapter_dir), "HOTSWAP_CACHE_DIR": str(cache_dir)}
    flags = [
        "--model",
        str(tiny.base_dir),
        "--quantization",
        "fp32",
        "--device",
        "cpu",
        "--drain-timeout-seconds",
        "60",
    ]
    log = tmp_path / "server.log"
    results: dict[int, list[dict]] = {}
    started = threading.Barrier(5)

    with running_service(flags, env, log) as (url, proc):

        def stream(i: int) -> None:
            body = {
                "model": "alpha" if i % 2 else "beta",
                "prompt": f"x{i}",
                "max_tokens": 240,
                "ignore_eos": True,
                "stream": True,
                "stop": ["never-appears-xyz"],
            }
            frames: list[dict] = []
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                lines = r.iter_lines()
                first = next(lines)
                frames.append(json.loads(first[6:]))
                started.wait()
                for line in lines:
                    if line.startswith("data: ") and line != "data: [DONE]":
                        frames.append(json.loads(line[6:]))
                    elif line == "data: [DONE]":
                        frames.append({"done": True})
            results[i] = frames

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        started.wait(timeout=60)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        # While it drains, the server answers 503; the tiny model's streams can end first, and
        # then it is gone (refused). Either way nothing new is served after SIGTERM: asserting
        # a 503 alone raced the drain (a clean-clone CI run met the refusal once).
        try:
            assert httpx.get(f"{url}/ready", timeout=5).status_code == 503
            late = httpx.post(f"{url}/v1/completions", json={"model": "alpha", "prompt": "y"}, timeout=5)
            assert late.status_code == 503 and late.json()["error"]["type"] == "service_unavailable"
        except httpx.ConnectError:
            assert proc.wait(timeout=60) == 0  # the drain had ended: the server is gone
        for t in threads:
            t.join(timeout=120)
        assert proc.wait(timeout=60) == 0, log.read_text()

    assert sorted(results) == [0, 1, 2, 3]
    for frames in results.values():
        assert frames[-1] == {"done": True}
        finish = [f["choices"][0]["finish_reason"] for f in frames[:-1] if f.get("choices")]
        assert finish[-1] == "length"
        text = "".join(f["choices"][0]["text"] for f in frames[:-1] if f.get("choices"))
        assert text  # every accepted stream generated to its end
    assert "draining 4 in-flight requests" in log.read_text()
