"""A short soak at twice the capacity (the full one is `python -m bench.soak`, docs/reliability.md)."""

from __future__ import annotations

import asyncio

from bench.soak import soak
from tests.support import running_service


def test_overload_loses_nothing_and_never_answers_5xx(tiny, cache_dir, tmp_path):
    env = {"HOTSWAP_ADAPTER_DIR": str(tiny.adapter_dir), "HOTSWAP_CACHE_DIR": str(cache_dir)}
    flags = [
        "--model",
        str(tiny.base_dir),
        "--quantization",
        "fp32",
        "--device",
        "cpu",
        "--max-batch-size",
        "2",
        "--max-queued-requests",
        "2",
        "--guardrails",
        "default",
    ]
    with running_service(flags, env, tmp_path / "server.log") as (url, _):
        result = asyncio.run(soak(url, "tiny", ["alpha", "beta"], clients=8, seconds=6, max_tokens=24))
    outcomes = result["outcomes"]
    assert result["lost"] == 0 and result["server_errors"] == 0, outcomes
    assert outcomes["ok"] > 0 and outcomes["rejected"] > 0, outcomes  # it was really overloaded
