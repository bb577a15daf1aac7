"""Releases over HTTP on a scripted engine: the canary load, the version every response names
(X-Adapter-Version, system_fingerprint), the admin calls' errors, the per-version metrics and
the automatic rollback."""

from __future__ import annotations

import json
import logging
import shutil
import time

import pytest
import yaml

from service.adapters.desired import ReleasesError
from tests.factories import make_client
from tests.service.fakes import ScriptedEngine

ADMIN = "admin-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture
def shelf(tiny, tmp_path):
    shutil.copytree(tiny.adapter_dir / "beta", tmp_path / "shelf" / "v2")
    manifest = json.loads((tmp_path / "shelf/v2/hotswap.json").read_text())
    (tmp_path / "shelf/v2/hotswap.json").write_text(json.dumps({**manifest, "name": "alpha"}))
    return tmp_path / "shelf"


def app(tiny, tokenizer, shelf, **settings):
    client, engine = make_client(tiny, tokenizer, admin_api_keys=[ADMIN], adapter_sources=[str(shelf)], **settings)
    return client, engine


def load(client, shelf, **extra):
    body = {"lora_name": "alpha", "lora_path": str(shelf / "v2"), "load_inplace": True, **extra}
    return client.post("/v1/load_lora_adapter", json=body, headers=AUTH)


def complete(client, user, model="alpha", **extra):
    body = {"model": model, "prompt": "Hi", "max_tokens": 3, "user": user, **extra}
    return client.post("/v1/completions", json=body)


def test_every_response_names_the_version_that_answered(tiny, tokenizer, shelf):
    client, engine = app(tiny, tokenizer, shelf)
    with client:
        stable = client.get("/v1/models/alpha").json()["version"]
        r = load(client, shelf, traffic=0.5)
        assert r.status_code == 200, r.text
        canary = client.get("/v1/models/alpha").json()["release"]["canary"]["version"]
        seen = {}
        for i in range(40):
            r = complete(client, f"u{i}")
            assert r.json()["system_fingerprint"] == r.headers["X-Adapter-Version"]
            seen[r.headers["X-Adapter-Version"]] = seen.get(r.headers["X-Adapter-Version"], 0) + 1
        assert set(seen) == {stable, canary}
        assert {r.adapter_version for r in engine.requests} == {stable, canary}  # the engine ran both
        chat = {"model": "alpha", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
        with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True, "user": "u1"}) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert {c["system_fingerprint"] for c in chunks} == {r.headers["X-Adapter-Version"]}
        base = complete(client, "u1", model="tiny")
        assert "X-Adapter-Version" not in base.headers and base.json()["system_fingerprint"] is None
        metrics = client.get("/metrics").text
        assert (
            f'hotswap_adapter_version_requests_total{{adapter="alpha",outcome="ok",role="canary",version="{canary}"}}'
            in metrics
        )
        assert f'hotswap_adapter_canary_traffic{{adapter="alpha",version="{canary}"}} 0.5' in metrics
        assert 'hotswap_adapter_version_tokens_total{adapter="alpha",kind="completion",role="stable"' in metrics


def test_release_calls_refuse_what_they_cannot_do_naming_the_field(tiny, tokenizer, shelf):
    client, _ = app(tiny, tokenizer, shelf)
    with client:
        r = client.post(
            "/v1/load_lora_adapter",
            json={"lora_name": "alpha", "lora_path": str(shelf / "v2"), "traffic": 0.1},
            headers=AUTH,
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "traffic"
        r = load(client, shelf, traffic=1.5)
        assert r.status_code == 400 and r.json()["error"]["param"] == "traffic"
        r = client.post("/admin/adapters/alpha/promote", headers=AUTH)
        assert (
            r.status_code == 400
            and "no canary" in r.json()["error"]["message"]
            and r.json()["error"]["param"] == "name"
        )
        r = client.post("/admin/adapters/nope/rollback", headers=AUTH)
        assert r.status_code == 404 and r.json()["error"]["param"] == "name"
        r = client.post("/admin/adapters/alpha/traffic", json={"traffic": 0}, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["param"] == "traffic"
        assert client.post("/admin/adapters/alpha/promote").status_code in (401, 403)  # admin only
        assert load(client, shelf, traffic=0.2).status_code == 200
        r = client.post("/admin/adapters/alpha/traffic", json={"traffic": 0.3}, headers=AUTH)
        assert r.status_code == 200 and r.json()["release"]["canary"]["traffic"] == 0.3
        r = client.post("/admin/adapters/alpha/promote", headers=AUTH)
        assert r.status_code == 200 and r.json()["release"]["canary"] is None and r.json()["release"]["previous"]


def test_skipping_the_gate_is_explicit_and_logged(tiny, tokenizer, shelf, caplog):
    client, engine = app(tiny, tokenizer, shelf)
    with client, caplog.at_level(logging.WARNING):
        while client.get("/ready").status_code != 200:  # the start gates alpha and beta first
            time.sleep(0.01)
        gated = len(engine.gated)
        assert load(client, shelf, gate=False).status_code == 200
        assert len(engine.gated) == gated  # nothing was scored
        assert "the gate was skipped" in caplog.text
        assert 'hotswap_adapter_gate_checks_total{adapter="alpha",outcome="skipped"} 1.0' in client.get("/metrics").text


def test_a_failing_canary_is_rolled_back_automatically(tiny, tokenizer, shelf, caplog):
    client, engine = app(tiny, tokenizer, shelf, canary_error_margin=0.1, canary_min_requests=5)
    with client, caplog.at_level(logging.WARNING, logger="hotswap.audit"):
        stable = client.get("/v1/models/alpha").json()["version"]
        assert load(client, shelf, traffic=0.5).status_code == 200
        canary = client.get("/v1/models/alpha").json()["release"]["canary"]["version"]
        engine.failing_versions.add(canary)
        statuses = [complete(client, f"u{i}").status_code for i in range(40)]
        assert 500 in statuses
        assert client.get("/v1/models/alpha").json()["release"]["canary"] is None
        after = [complete(client, f"u{i}") for i in range(20)]
        assert {r.headers["X-Adapter-Version"] for r in after} == {stable}
        assert "rollback alpha" in caplog.text and "error rate" in caplog.text
        assert 'hotswap_adapter_rollbacks_total{adapter="alpha",trigger="automatic"} 1.0' in client.get("/metrics").text


def test_a_stream_that_ends_in_an_error_event_counts_against_its_version(tiny, tokenizer, shelf):
    """Each API's stream error framing (chat's `data:` error, Responses' `event: error`) is a
    failed request for the per-version metrics the automatic rollback reads."""
    slow = ScriptedEngine(tokenizer, " one two three four five six seven", delay=0.3)
    client, _ = app(tiny, tokenizer, shelf, engine=slow, request_timeout_seconds=0.5)
    with client:
        stable = client.get("/v1/models/alpha").json()["version"]
        bodies = {
            "/v1/responses": {"model": "alpha", "input": "Hi", "max_output_tokens": 20, "stream": True},
            "/v1/chat/completions": {
                "model": "alpha",
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 20,
                "stream": True,
            },
        }
        for path, body in bodies.items():
            r = client.post(path, json=body)
            assert r.status_code == 200 and "request_timeout" in r.text
        labels = f'adapter="alpha",outcome="error",role="stable",version="{stable}"'
        assert f"hotswap_adapter_version_requests_total{{{labels}}} 2.0" in client.get("/metrics").text


def test_a_rescan_serves_a_changed_package_only_once_it_passes_the_gate(tiny, tokenizer, tmp_path):
    """A changed package on disk is staged; a refused one never answers, the old one keeps serving."""
    adapters = tmp_path / "adapters"
    shutil.copytree(tiny.adapter_dir, adapters)
    world = type(tiny)(tiny.base_dir, tiny.fingerprint, adapters)
    client, engine = make_client(world, tokenizer, admin_api_keys=[ADMIN])
    manifest_path = adapters / "alpha" / "hotswap.json"
    manifest = json.loads(manifest_path.read_text())
    golden = {"prompt": "Hi", "output": "x", "prompt_ids": [5, 6, 7], "output_ids": [8, 9], "logprobs": [-1.25, -1.25]}
    with client:
        old = client.get("/v1/models/alpha").json()["version"]
        # golden log-probabilities the engine does not give (it scores an adapter's tokens -1.25)
        bad = {**golden, "logprobs": [-4.0, -4.0]}
        manifest_path.write_text(json.dumps({**manifest, "evaluation": {"quantization": "nf4", "golden": [bad]}}))
        r = client.post("/admin/adapters/rescan", headers=AUTH)
        assert r.status_code == 200 and r.json()["changed"] == ["alpha"] and r.json()["refused"] == ["alpha"]
        card = client.get("/v1/models/alpha").json()
        assert card["version"] == old and "do not reproduce" in card["release"]["refused"]["error"]
        assert complete(client, "u1").headers["X-Adapter-Version"] == old
        manifest_path.write_text(json.dumps({**manifest, "evaluation": {"quantization": "nf4", "golden": [golden]}}))
        r = client.post("/admin/adapters/rescan", headers=AUTH)
        assert r.json()["refused"] == []
        new = client.get("/v1/models/alpha").json()
        assert new["version"] != old and new["release"]["refused"] is None and new["release"]["previous"] == old
        assert complete(client, "u1").headers["X-Adapter-Version"] == new["version"]


# --- RELEASES_FILE: one declared release for every replica ----------------------------------


def declare(path, **releases):
    path.write_text(yaml.safe_dump({"releases": releases}))


def wait_for(predicate, what: str, seconds: float = 10.0):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def ready(*clients):
    """Wait for /ready: the start acts on the releases file before it (the model list answers
    earlier, while the service starts)."""
    for client in clients:
        wait_for(lambda c=client: c.get("/ready").status_code == 200, "/ready")


def test_every_replica_serves_the_release_the_file_declares(tiny, tokenizer, shelf, tmp_path):
    """Two replicas read one file: they start on its canary, split users alike, and follow
    its edits (widen, promote, roll back by edit) without an admin call to either."""
    releases = tmp_path / "releases.yaml"
    stable_source = str(tiny.adapter_dir / "alpha")
    declare(releases, alpha={"stable": stable_source, "canary": {"source": str(shelf / "v2"), "traffic": 0.5}})
    settings = dict(releases_file=releases, releases_poll_seconds=0.05)
    (one, _), (two, _) = app(tiny, tokenizer, shelf, **settings), app(tiny, tokenizer, shelf, **settings)
    with one, two:
        ready(one, two)
        cards = [c.get("/v1/models/alpha").json() for c in (one, two)]
        stable = cards[0]["version"]
        canary = cards[0]["release"]["canary"]
        assert canary is not None and canary["traffic"] == 0.5 and canary["version"] != stable
        assert [c["release"]["canary"] for c in cards] == [canary, canary]
        versions = {u: complete(one, f"u{u}").headers["X-Adapter-Version"] for u in range(30)}
        assert set(versions.values()) == {stable, canary["version"]}
        assert {u: complete(two, f"u{u}").headers["X-Adapter-Version"] for u in range(30)} == versions

        def canary_of(client):
            return client.get("/v1/models/alpha").json()["release"]["canary"]

        declare(releases, alpha={"stable": stable_source, "canary": {"source": str(shelf / "v2"), "traffic": 0.2}})
        wait_for(lambda: all((canary_of(c) or {}).get("traffic") == 0.2 for c in (one, two)), "the new share")

        declare(releases, alpha={"stable": str(shelf / "v2")})  # promote
        wait_for(
            lambda: all(c.get("/v1/models/alpha").json()["version"] == canary["version"] for c in (one, two)),
            "the promotion",
        )
        assert canary_of(one) is None and complete(one, "u1").headers["X-Adapter-Version"] == canary["version"]

        declare(releases, alpha={"stable": stable_source})  # roll back by edit
        wait_for(lambda: all(c.get("/v1/models/alpha").json()["version"] == stable for c in (one, two)), "the rollback")
        status = one.get("/admin/releases", headers=AUTH).json()
        assert status["error"] is None and [s["outcome"] for s in status["steps"]] == ["done"]
        assert status["steps"][0]["action"] == "stable"
        metrics = one.get("/metrics").text
        assert 'hotswap_release_steps_total{action="promote",adapter="alpha",outcome="done"} 1.0' in metrics
        assert 'hotswap_release_file_syncs_total{outcome="applied"} 4.0' in metrics


def test_a_refused_version_in_the_file_leaves_the_replica_serving_and_is_not_retried(tiny, tokenizer, shelf, tmp_path):
    releases = tmp_path / "releases.yaml"
    stable_source = str(tiny.adapter_dir / "alpha")
    manifest_path = shelf / "v2" / "hotswap.json"
    manifest = json.loads(manifest_path.read_text())
    # golden log-probabilities the scripted engine does not give: the gate refuses the version
    bad = {"prompt": "Hi", "output": "x", "prompt_ids": [5, 6, 7], "output_ids": [8, 9], "logprobs": [-4.0, -4.0]}
    manifest_path.write_text(json.dumps({**manifest, "evaluation": {"quantization": "nf4", "golden": [bad]}}))
    declare(releases, alpha={"stable": stable_source})
    client, engine = app(tiny, tokenizer, shelf, releases_file=releases, releases_poll_seconds=0.05)
    with client:
        ready(client)
        stable = client.get("/v1/models/alpha").json()["version"]
        declare(releases, alpha={"stable": stable_source, "canary": {"source": str(shelf / "v2"), "traffic": 0.5}})
        wait_for(lambda: client.get("/admin/releases", headers=AUTH).json()["steps"], "the canary step")
        status = client.get("/admin/releases", headers=AUTH).json()
        assert status["steps"][0]["outcome"] == "failed" and "refused by the gate" in status["steps"][0]["error"]
        card = client.get("/v1/models/alpha").json()
        assert card["version"] == stable and card["release"]["canary"] is None and card["release"]["refused"]
        assert {complete(client, f"u{i}").headers["X-Adapter-Version"] for i in range(10)} == {stable}
        gated = len(engine.gated)
        time.sleep(0.3)  # several polls of an unchanged file
        assert len(engine.gated) == gated
        r = client.post("/admin/releases/sync", headers=AUTH)  # an admin asks: it is tried again
        assert r.status_code == 200 and r.json()["steps"][0]["outcome"] == "failed" and len(engine.gated) > gated
        assert 'hotswap_release_file_syncs_total{outcome="failed"} 2.0' in client.get("/metrics").text


def test_an_invalid_edit_changes_nothing_and_says_which_field(tiny, tokenizer, shelf, tmp_path):
    releases = tmp_path / "releases.yaml"
    stable_source = str(tiny.adapter_dir / "alpha")
    declare(releases, alpha={"stable": stable_source, "canary": {"source": str(shelf / "v2"), "traffic": 0.5}})
    client, _ = app(tiny, tokenizer, shelf, releases_file=releases, releases_poll_seconds=0.05)
    with client:
        ready(client)
        before = client.get("/v1/models/alpha").json()
        declare(releases, alpha={"stable": stable_source, "canary": {"source": str(shelf / "v2"), "traffic": 2}})
        wait_for(lambda: client.get("/admin/releases", headers=AUTH).json()["error"], "the error")
        assert "releases.alpha.canary.traffic" in client.get("/admin/releases", headers=AUTH).json()["error"]
        assert client.get("/v1/models/alpha").json()["release"] == before["release"]
        assert 'hotswap_release_file_syncs_total{outcome="invalid"} 1.0' in client.get("/metrics").text
        assert client.get("/admin/releases").status_code in (401, 403)  # admin only


def test_a_wrong_releases_file_stops_the_start_and_no_file_means_no_route(tiny, tokenizer, shelf, tmp_path):
    releases = tmp_path / "releases.yaml"
    declare(releases, alpha={"stable": "ftp://nowhere/alpha"})
    with pytest.raises(ReleasesError, match=r"releases\.alpha\.stable"):
        app(tiny, tokenizer, shelf, releases_file=releases)
    client, _ = app(tiny, tokenizer, shelf)
    with client:
        r = client.post("/admin/releases/sync", headers=AUTH)
        assert r.status_code == 404 and "RELEASES_FILE" in r.json()["error"]["message"]
