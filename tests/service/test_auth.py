"""Keys: API keys on /v1, the admin key on /admin, /metrics by setting; path and Host tricks."""

from __future__ import annotations

import json
import shutil

import pytest
from fastapi.testclient import TestClient

from service.settings import Settings
from tests.factories import make_client

KEY = "k" * 24
ADMIN = "a" * 24


@pytest.fixture
def adapters(tiny, tmp_path):
    root = tmp_path / "adapters"
    shutil.copytree(tiny.adapter_dir, root)
    return root


def client(tiny, tokenizer, adapters=None, **settings):
    world = tiny if adapters is None else type(tiny)(tiny.base_dir, tiny.fingerprint, adapters)
    c, _ = make_client(world, tokenizer, **settings)
    return c


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models",
        "//v1/models",
        "/v1//models",
        "/v1/models/",
        "/v1/./models",
        "/v1/%2E/models",
        "/v1%2Fmodels",
        "/V1/models",
        "/v1/models%00",
        "/v1/models.",
        "/./v1/models",
        "/health/../v1/models",
    ],
)
def test_no_path_trick_reaches_v1_without_a_key(tiny, tokenizer, path):
    with client(tiny, tokenizer, api_keys=[KEY]) as c:
        r = c.get(path, follow_redirects=False)
        assert r.status_code in (307, 401, 404), (path, r.status_code)
        assert "tiny" not in r.text or r.status_code == 307  # no model list leaks
        if r.status_code == 307:  # a redirect to the canonical path, which then wants the key
            assert c.get(r.headers["location"]).status_code == 401


@pytest.mark.parametrize(
    "headers",
    [
        {"Host": "localhost"},
        {"Host": "127.0.0.1:8000"},
        {"X-Forwarded-Host": "internal"},
        {"X-Original-URL": "/health"},
        {"X-Rewrite-URL": "/health"},
        {"X-Forwarded-Prefix": "/health"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": f"Bearer {KEY[:-1]}"},
        {"Authorization": "Bearer"},
    ],
)
def test_headers_do_not_bypass_the_key(tiny, tokenizer, headers):
    with client(tiny, tokenizer, api_keys=[KEY]) as c:
        assert c.get("/v1/models", headers=headers).status_code == 401


def test_root_path_prefix_still_needs_the_key(tiny, tokenizer):
    c = client(tiny, tokenizer, api_keys=[KEY])
    with TestClient(c.app, root_path="/api") as prefixed:
        assert prefixed.get("/api/v1/models").status_code == 401
        ok = prefixed.get("/api/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200


def test_metrics_open_by_default_keyed_when_asked(tiny, tokenizer):
    with client(tiny, tokenizer, api_keys=[KEY]) as c:
        assert c.get("/metrics").status_code == 200
    with client(tiny, tokenizer, api_keys=[KEY], metrics_require_key=True) as c:
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200
    with pytest.raises(ValueError, match="needs API_KEYS"):
        Settings(metrics_require_key=True)
    with pytest.raises(ValueError, match="must differ"):
        Settings(api_keys=[KEY], admin_api_keys=[KEY])


def test_admin_routes_need_the_admin_key_and_rescan_serves_new_packages(tiny, tokenizer, adapters):
    with client(tiny, tokenizer, adapters) as c:
        r = c.post("/admin/adapters/rescan")
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"
    with client(tiny, tokenizer, adapters, api_keys=[KEY], admin_api_keys=[ADMIN]) as c:
        user = {"Authorization": f"Bearer {KEY}"}
        admin = {"Authorization": f"Bearer {ADMIN}"}
        assert c.post("/admin/adapters/rescan", headers=user).status_code == 401  # API key: no
        assert c.get("/v1/models", headers=admin).status_code == 401  # admin key: not an API key
        shutil.copytree(adapters / "alpha", adapters / "gamma")
        manifest = json.loads((adapters / "gamma" / "hotswap.json").read_text())
        (adapters / "gamma" / "hotswap.json").write_text(json.dumps({**manifest, "name": "gamma"}))
        shutil.rmtree(adapters / "beta")
        r = c.post("/admin/adapters/rescan", headers=admin)
        assert r.status_code == 200
        assert r.json()["added"] == ["gamma"] and r.json()["removed"] == ["beta"]
        models = [m["id"] for m in c.get("/v1/models", headers=user).json()["data"]]
        assert "gamma" in models and "beta" not in models
        r = c.post("/v1/completions", headers=user, json={"model": "beta", "prompt": "x"})
        assert r.status_code == 404
        assert c.post("/admin/adapters/gamma/reload", headers=admin).json()["status"] == "ready"
        assert c.post("/admin/adapters/nosuch/reload", headers=admin).status_code == 404


def test_the_local_listener_trusts_only_loopback_host_names():
    """Security review L3: a web page can reach a developer's loopback port through DNS
    rebinding, with its own name in Host; the key-less port trusts only loopback names."""
    from starlette.requests import Request

    from service.auth import _local_trusted

    class App:
        class state:  # noqa: N801 - the shape of app.state
            settings = Settings(admin_local_port=8001)

    def request(host: str, server=("127.0.0.1", 8001)) -> Request:
        scope = {"type": "http", "server": server, "headers": [(b"host", host.encode())], "app": App}
        return Request(scope)

    assert _local_trusted(request("127.0.0.1:8001")) and _local_trusted(request("localhost:8001"))
    assert not _local_trusted(request("evil.example:8001"))  # rebinding: the page's own name
    assert not _local_trusted(request("127.0.0.1:8001", server=("127.0.0.1", 8000)))  # the public port


def test_keys_of_any_length_compare_alike():
    """Security review L6: keys compare as SHA-256 digests (equal lengths), not as strings."""
    from service.auth import key_matches

    assert key_matches(KEY, ["x" * 40, KEY]) and not key_matches(KEY[:-1], [KEY]) and not key_matches("", [KEY])


def test_api_docs_are_off_where_keys_are_on(tiny, tokenizer):
    """Security review L4: /docs and /openapi.json mapped every route to anyone; with API keys
    they are off unless API_DOCS=true, and without keys on unless API_DOCS=false."""
    with client(tiny, tokenizer, api_keys=[KEY]) as c:
        assert c.get("/openapi.json").status_code == 404 and c.get("/docs").status_code == 404
    with client(tiny, tokenizer, api_keys=[KEY], api_docs=True) as c:
        assert c.get("/openapi.json").status_code == 200
    with client(tiny, tokenizer) as c:
        assert c.get("/openapi.json").status_code == 200
    with client(tiny, tokenizer, api_docs=False) as c:
        assert c.get("/docs").status_code == 404
