"""Tenants (TENANTS_FILE): isolation as a 404 everywhere, rate limits with Retry-After, what
/metrics shows each reader, admin scope and the audit log (tiny world, a scripted engine)."""

from __future__ import annotations

import hashlib
import logging
import time

import pytest

from service.settings import Settings
from service.tenants import RateLimits, Tenant, Tenants, TenantsError
from tests.factories import make_client

ACME = "acme-key-" + "1" * 16
GLOBEX = "globex-key-" + "2" * 16
ADMIN = "admin-key-" + "3" * 16


def tenants_file(tmp_path, extra: str = "") -> str:
    path = tmp_path / "tenants.yaml"
    digest = hashlib.sha256(GLOBEX.encode()).hexdigest()
    path.write_text(
        f"""
tenants:
  acme:
    keys: ["{ACME}"]
    adapters: ["alph*"]
  globex:
    keys: ["sha256:{digest}"]
    adapters: ["beta"]
    base: false
{extra}"""
    )
    return str(path)


@pytest.fixture
def served(tiny, tokenizer, tmp_path):
    client, engine = make_client(tiny, tokenizer, tenants_file=tenants_file(tmp_path), admin_api_keys=[ADMIN])
    with client:
        yield client


def as_(key):
    return {"Authorization": f"Bearer {key}"}


def test_each_tenant_lists_only_what_it_may_use(served):
    acme = [m["id"] for m in served.get("/v1/models", headers=as_(ACME)).json()["data"]]
    globex = [m["id"] for m in served.get("/v1/models", headers=as_(GLOBEX)).json()["data"]]
    assert acme == ["tiny", "alpha"] and globex == ["beta"]
    assert served.get("/v1/models/beta", headers=as_(ACME)).status_code == 404
    assert served.get("/v1/models/beta", headers=as_(GLOBEX)).status_code == 200
    assert served.get("/v1/models", headers=as_("not-a-key-" + "x" * 16)).status_code == 401


ENDPOINTS = [
    ("/v1/completions", lambda model: {"model": model, "prompt": "hi", "max_tokens": 2}),
    ("/v1/chat/completions", lambda model: {"model": model, "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/responses", lambda model: {"model": model, "input": "hi", "max_output_tokens": 2}),
    ("/tokenize", lambda model: {"model": model, "prompt": "hi"}),
]


@pytest.mark.parametrize(("path", "body"), ENDPOINTS)
def test_another_tenants_adapter_is_a_404_as_if_it_did_not_exist(served, path, body):
    """A 403 would tell that the adapter exists: the refusal reads as for a missing one."""
    mine = served.post(path, headers=as_(ACME), json=body("alpha"))
    theirs = served.post(path, headers=as_(ACME), json=body("beta"))
    missing = served.post(path, headers=as_(ACME), json=body("gamma"))
    assert mine.status_code == 200, mine.text
    assert theirs.status_code == missing.status_code == 404
    shape = lambda r: {k: v for k, v in r.json()["error"].items() if k != "message"}  # noqa: E731
    assert shape(theirs) == shape(missing)
    assert theirs.json()["error"]["message"].replace("beta", "gamma") == missing.json()["error"]["message"]


def test_adapter_field_and_base_follow_the_same_rule(served):
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    assert served.post("/v1/completions", headers=as_(ACME), json={**body, "adapter": "beta"}).status_code == 404
    assert served.post("/v1/completions", headers=as_(GLOBEX), json=body).status_code == 404  # no base for globex
    assert served.post("/v1/completions", headers=as_(GLOBEX), json={**body, "model": "beta"}).status_code == 200


def test_rate_limits_answer_429_with_retry_after(tiny, tokenizer, tmp_path):
    extra = """  limited:
    keys: ["limited-key-4444444444444444"]
    adapters: ["*"]
    requests_per_minute: 2
"""
    client, _ = make_client(tiny, tokenizer, tenants_file=tenants_file(tmp_path, extra), admin_api_keys=[ADMIN])
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    with client:
        codes = [
            client.post("/v1/completions", headers=as_("limited-key-4444444444444444"), json=body) for _ in range(3)
        ]
        assert [r.status_code for r in codes] == [200, 200, 429]
        error = codes[2].json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
        assert 1 <= int(codes[2].headers["Retry-After"]) <= 30  # 2 a minute: one back in 30 s
        assert client.post("/v1/completions", headers=as_(ACME), json=body).status_code == 200  # others go on
        text = client.get("/metrics", headers=as_(ADMIN)).text
        assert 'hotswap_tenant_rate_limited_total{limit="requests",tenant="limited"} 1.0' in text
        assert 'hotswap_tenant_requests_total{tenant="limited"} 2.0' in text


def test_tokens_per_minute_are_charged_and_refill():
    clock = [0.0]
    limits = RateLimits(clock=lambda: clock[0])
    tenant = Tenant("t", tokens_per_minute=600)
    assert limits.acquire(tenant) is None
    limits.charge(tenant, 900)  # a request may overdraw; the next waits for the refill
    limited = limits.acquire(tenant)
    assert limited is not None and limited[0] == "tokens" and limited[1] == pytest.approx(30.1, abs=0.01)
    clock[0] = 31.0
    assert limits.acquire(tenant) is None


def test_metrics_show_a_tenant_nothing_of_the_others(served):
    body = {"model": "alpha", "prompt": "hi", "max_tokens": 2}
    served.post("/v1/completions", headers=as_(ACME), json=body)
    served.post("/v1/completions", headers=as_(GLOBEX), json={**body, "model": "beta"})
    full = served.get("/metrics", headers=as_(ADMIN)).text
    mine = served.get("/metrics", headers=as_(ACME)).text
    assert 'tenant="globex"' in full and 'adapter="beta"' in full and "hotswap_prefix_cache" in full
    assert 'tenant="globex"' not in mine and 'adapter="beta"' not in mine
    assert "hotswap_prefix_cache" not in mine and "hotswap_lora_requests_info" not in mine
    assert 'hotswap_tenant_requests_total{tenant="acme"} 1.0' in mine


def test_a_tenants_admin_key_manages_its_own_adapters_only_and_every_action_is_audited(
    tiny, tokenizer, tmp_path, caplog
):
    extra = """  ops:
    keys: ["ops-key-55555555555555555"]
    adapters: ["alpha"]
    admin_adapters: ["alpha"]
"""
    client, _ = make_client(tiny, tokenizer, tenants_file=tenants_file(tmp_path, extra), admin_api_keys=[ADMIN])
    caplog.set_level(logging.INFO, logger="hotswap.audit")
    with client:
        ops = as_("ops-key-55555555555555555")
        assert client.post("/admin/adapters/alpha/pin", headers=ops).status_code in (200, 400)
        refused = client.post("/admin/adapters/beta/pin", headers=ops)
        assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"
        assert client.post("/admin/adapters/rescan", headers=ops).status_code == 403
        assert client.post("/admin/adapters/rescan", headers=as_(ADMIN)).status_code == 200
        assert client.post("/admin/adapters/rescan", headers=as_(ACME)).status_code == 401  # no admin scope
    lines = [r.getMessage() for r in caplog.records if r.name == "hotswap.audit"]
    admin_id = hashlib.sha256(ADMIN.encode()).hexdigest()[:8]
    assert any(line.startswith("tenant ops pin alpha") for line in lines), lines
    assert any(line.startswith(f"admin key {admin_id} rescan") for line in lines), lines
    assert not any(ADMIN in line or "ops-key" in line for line in lines)  # ids, never keys


def test_api_keys_alone_are_one_tenant_that_may_use_everything(tiny, tokenizer):
    key = "k" * 24
    client, _ = make_client(tiny, tokenizer, api_keys=[key])
    with client:
        ids = [m["id"] for m in client.get("/v1/models", headers=as_(key)).json()["data"]]
        assert ids == ["tiny", "alpha", "beta"]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("tenants: []", "a mapping 'tenants'"),
        ("tenants:\n  a:\n    keys: []\n", "tenants.a.keys"),
        ("tenants:\n  a:\n    keys: [k1]\n    adapters: [x]\n    rpm: 3\n", "unknown fields ['rpm']"),
        ("tenants:\n  a:\n    keys: [k1]\n    max_concurrent: 0\n", "tenants.a.max_concurrent"),
        ("tenants:\n  a:\n    keys: [k1]\n  b:\n    keys: [k1]\n", "share a key"),
        ("tenants:\n  'a b':\n    keys: [k1]\n", "tenant id"),
    ],
)
def test_a_bad_tenants_file_is_refused_naming_where(tmp_path, text, says):
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(TenantsError, match=says.replace("[", r"\[").replace("]", r"\]")):
        Tenants.load(path)


def test_the_service_refuses_to_start_on_a_bad_tenants_file(tmp_path):
    from service.app import build_app

    path = tmp_path / "t.yaml"
    path.write_text("tenants: {}")
    with pytest.raises(TenantsError):
        build_app(Settings(tenants_file=path))


def test_auth_and_the_engine_share_one_reading_of_the_tenants_file(tiny, tmp_path):
    """TENANTS_FILE is read once, when the app is built: a file that changes (or breaks) while
    the model loads does not give the engine other tenants than those auth knows."""
    from fastapi.testclient import TestClient

    from service.app import build_app
    from tests.factories import tiny_settings

    path = tenants_file(tmp_path, "    weight: 3\n")  # globex weighs 3
    app = build_app(tiny_settings(tiny, tmp_path / "cache", tenants_file=path))
    (tmp_path / "tenants.yaml").write_text("tenants: [broken")
    with TestClient(app) as client:
        deadline = time.monotonic() + 120  # bounds a hang only
        while client.get("/ready").status_code != 200 and time.monotonic() < deadline:
            assert app.state.hotswap.status != "failed", app.state.hotswap.error
            time.sleep(0.1)
        shares = app.state.hotswap.context.engine.config.shares
        assert {tenant: weight for tenant, weight, _ in shares} == {"acme": 1.0, "globex": 3.0}
        r = client.post("/v1/completions", json={"model": "alpha", "prompt": "Hi", "max_tokens": 1}, headers=as_(ACME))
        assert r.status_code == 200, r.text
