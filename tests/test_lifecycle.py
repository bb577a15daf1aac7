"""The adapter fleet through a real server (`python -m service`, tiny model): vLLM's load and
unload endpoints, versions, reloads under streaming load, pins, the pod-local admin port."""

from __future__ import annotations

import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.support import free_port, running_service

ADMIN = "admin-key-0123456789abcdef"
USER = "user-key-0123456789abcdef"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def fleet(tiny, cache_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    shutil.copytree(tiny.adapter_dir, root / "adapters")
    shelf = root / "shelf"
    shutil.copytree(tiny.adapter_dir / "alpha", shelf / "v1")
    shutil.copytree(tiny.adapter_dir / "beta", shelf / "v2")  # other weights: other greedy text
    manifest = json.loads((shelf / "v2" / "hotswap.json").read_text())
    (shelf / "v2" / "hotswap.json").write_text(json.dumps({**manifest, "name": "alpha"}))
    local_port = free_port()
    flags = ["--model", str(tiny.base_dir), "--quantization", "fp32", "--device", "cpu"]
    env = {
        "HOTSWAP_ADAPTER_DIR": str(root / "adapters"),
        "HOTSWAP_CACHE_DIR": str(cache_dir),
        "HOTSWAP_ADMIN_API_KEYS": ADMIN,
        "HOTSWAP_API_KEYS": USER,
        "HOTSWAP_ADAPTER_SOURCES": str(shelf),
        "HOTSWAP_ADMIN_LOCAL_PORT": str(local_port),
        "HOTSWAP_MAX_RESIDENT_ADAPTERS": "2",
        "HOTSWAP_MAX_CPU_ADAPTERS": "2",
    }
    with running_service(flags, env, root / "server.log") as (url, _):
        yield url, f"http://127.0.0.1:{local_port}", shelf


def admin(url, path, body, key=ADMIN):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}{path}", json=body, headers=headers, timeout=60)


def complete(url, model, stream=False):
    body = {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {USER}"}
    if not stream:
        r = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)
        return r.status_code, (r.json()["choices"][0]["text"] if r.status_code == 200 else r.json())
    text = ""
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text += chunk["choices"][0]["text"]
    return 200, text


def card(url, name):
    r = httpx.get(f"{url}/v1/models/{name}", headers={"Authorization": f"Bearer {USER}"}, timeout=10)
    return r.status_code, r.json()


def test_vllm_load_and_unload_shapes(fleet):
    url, local, shelf = fleet
    body = {"lora_name": "shelf-a", "lora_path": str(shelf / "v1")}
    assert admin(url, "/v1/load_lora_adapter", body, key=None).status_code == 401
    assert admin(url, "/v1/load_lora_adapter", body, key=USER).status_code == 401  # an API key is not admin
    r = admin(url, "/v1/load_lora_adapter", {**body, "base_model_name": "tiny-base"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "base_model_name"
    r = admin(url, "/v1/load_lora_adapter", body)
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'shelf-a' added successfully."
    assert r.headers["content-type"].startswith("text/plain")
    r = admin(url, "/v1/load_lora_adapter", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name" and "load_inplace" in r.text
    r = admin(url, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/etc"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path" and "not an allowed" in r.text
    r = admin(url, "/v1/load_lora_adapter", {"lora_name": "shelf-a"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"

    status, model = card(url, "shelf-a")
    # no host path; the load gate ran the version, so it is in memory already
    assert status == 200 and model["root"] == "adapters/v1" and model["state"] in ("resident", "cached")
    assert len(model["version"]) == 16 and model["parent"] and model["pinned"] is False
    assert complete(url, "shelf-a")[0] == 200
    assert card(url, "shelf-a")[1]["state"] == "resident"

    r = admin(url, "/v1/unload_lora_adapter", {"lora_name": "shelf-a"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'shelf-a' removed successfully."
    status, error = complete(url, "shelf-a")
    assert status == 404 and error["error"]["param"] == "model"
    r = admin(url, "/v1/unload_lora_adapter", {"lora_name": "shelf-a"})
    assert r.status_code == 404 and r.json()["error"]["message"] == "The lora adapter 'shelf-a' cannot be found."

    # The pod-local port: no key needed (a sidecar such as the lora-syncer sends none).
    assert admin(local, "/v1/load_lora_adapter", body, key=None).status_code == 200
    assert httpx.get(f"{local}/v1/models", timeout=10).status_code == 200
    assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401  # the public one still asks


def test_reloads_under_streaming_load_never_mix_versions(fleet):
    url, _, shelf = fleet
    assert admin(url, "/v1/load_lora_adapter", {"lora_name": "live", "lora_path": str(shelf / "v1")}).status_code == 200
    old = complete(url, "live")[1]
    version = {"old": card(url, "live")[1]["version"]}
    swap = {"lora_name": "live", "lora_path": str(shelf / "v2"), "load_inplace": True}
    assert admin(url, "/v1/load_lora_adapter", swap).status_code == 200
    new = complete(url, "live")[1]
    version["new"] = card(url, "live")[1]["version"]
    assert old != new and version["old"] != version["new"]

    # Two more adapters compete for the two device slots, so slots are swapped all the time:
    # a slot whose adapter serves a running stream must never be rewritten under it.
    expected = {"live": {old, new}, "alpha": {complete(url, "alpha")[1]}, "beta": {complete(url, "beta")[1]}}
    stop = threading.Event()

    def client(i):
        model = ["live", "alpha", "beta", "live"][i % 4]
        seen = []
        while not stop.is_set() or not seen:
            status, text = complete(url, model, stream=True)
            seen.append((model, text))
        return seen

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(client, i) for i in range(16)]
        for i in range(10):  # ten reloads while 16 clients stream
            path = shelf / ("v1" if i % 2 == 0 else "v2")
            r = admin(url, "/v1/load_lora_adapter", {**swap, "lora_path": str(path)})
            assert r.status_code == 200, r.text
        stop.set()
        texts = [t for f in futures for t in f.result()]
    wrong = [(model, text) for model, text in texts if text not in expected[model]]
    assert not wrong, wrong  # each "live" response all old or all new; the others untouched
    assert len(texts) >= 16


def test_pins_keep_an_adapter_resident(fleet):
    url, _, _ = fleet
    r = admin(url, "/admin/adapters/alpha/pin", None)
    assert r.status_code == 200 and r.json()["pinned"] is True
    assert _eventually(lambda: card(url, "alpha")[1]["state"] == "resident")
    r = admin(url, "/admin/adapters/beta/pin", None)  # MAX_RESIDENT_ADAPTERS 2: one pin at most
    assert r.status_code == 400 and "at most 1" in r.json()["error"]["message"]
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert 'hotswap_adapter_swaps_total{adapter="alpha"' in metrics
    assert 'hotswap_adapter_bytes{tier="device"}' in metrics
    assert admin(url, "/admin/adapters/alpha/unpin", None).json()["pinned"] is False


def _eventually(check, seconds=20.0) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False
