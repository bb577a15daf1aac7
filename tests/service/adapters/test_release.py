"""Releases in the registry: a canary beside the stable version, its sticky split, promote,
rollback, the automatic rollback, and versions the gate refuses (service.adapters.release)."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest

from service.adapters.registry import AdapterRegistry, AdapterRejected
from service.adapters.release import Canary, place
from service.names import AdapterKey


@pytest.fixture
def shelf(tiny, tmp_path):
    """Two versions of `alpha` on a local shelf (v2: beta's weights under alpha's name)."""
    shutil.copytree(tiny.adapter_dir / "alpha", tmp_path / "shelf" / "v1")
    shutil.copytree(tiny.adapter_dir / "beta", tmp_path / "shelf" / "v2")
    manifest = json.loads((tmp_path / "shelf/v2/hotswap.json").read_text())
    (tmp_path / "shelf/v2/hotswap.json").write_text(json.dumps({**manifest, "name": "alpha"}))
    return tmp_path / "shelf"


@pytest.fixture
def reg(tiny, tmp_path, shelf):
    registry = AdapterRegistry(
        tmp_path / "empty", base_id="tiny", base_fingerprint=tiny.fingerprint, allowed_sources=[str(shelf)]
    )
    registry.scan()
    return registry


def canary_of(reg, shelf, traffic=0.1):
    stable = reg.register("alpha", str(shelf / "v1"))
    canary = reg.stage("alpha", str(shelf / "v2"), replace=True)
    reg.install(canary, traffic=traffic)
    return stable, canary


def test_places_are_sticky_uniform_and_per_adapter():
    users = [f"user-{i}" for i in range(20000)]
    share = sum(place("alpha", u) < 0.1 for u in users) / len(users)
    assert 0.09 < share < 0.11
    assert [place("alpha", u) for u in users[:50]] == [place("alpha", u) for u in users[:50]]
    # another adapter splits its users independently: not the same 10% everywhere
    assert {u for u in users if place("alpha", u) < 0.1} != {u for u in users if place("beta", u) < 0.1}
    # raising the share only adds users to the canary
    assert {u for u in users if place("alpha", u) < 0.1} <= {u for u in users if place("alpha", u) < 0.3}


def test_a_canary_takes_its_share_and_a_user_sticks_to_one_version(reg, shelf):
    stable, canary = canary_of(reg, shelf, traffic=0.1)
    picks = {f"u{i}": reg.pick("alpha", f"u{i}") for i in range(2000)}
    roles = Counter(role for _, role in picks.values())
    assert 0.08 < roles["canary"] / 2000 < 0.12
    assert all(r.version == (canary if role == "canary" else stable).version for r, role in picks.values())
    assert all(reg.pick("alpha", u)[1] == role for u, (_, role) in list(picks.items())[:300])
    assert reg.get("alpha") is stable  # the stable version is what the name's card shows
    assert reg.current(canary.key) and reg.current(stable.key)
    assert reg.release("alpha")["canary"] == {"version": canary.version, "traffic": 0.1}


def test_promote_then_rollback_moves_every_new_request(reg, shelf):
    stable, canary = canary_of(reg, shelf)
    reg.promote("alpha")
    assert {reg.pick("alpha", f"u{i}")[0].version for i in range(200)} == {canary.version}
    assert reg.release("alpha") == {"canary": None, "previous": stable.version, "gating": None, "refused": None}
    assert reg.rollback("alpha") is stable
    assert {reg.pick("alpha", f"u{i}")[0].version for i in range(200)} == {stable.version}
    assert reg.version(canary.key) is canary  # requests that resolved to it still finish on it
    with pytest.raises(AdapterRejected, match="no canary and no earlier version"):
        reg.rollback("alpha")


def test_rollback_of_a_canary_keeps_the_stable_and_forgets_nothing_else(reg, shelf):
    stable, canary = canary_of(reg, shelf)
    assert reg.rollback("alpha") is stable
    assert {reg.pick("alpha", f"u{i}")[1] for i in range(200)} == {"stable"}
    assert not reg.current(canary.key) and reg.current(stable.key)


def test_an_in_place_load_can_be_rolled_back(reg, shelf):
    first = reg.register("alpha", str(shelf / "v1"))
    second = reg.register("alpha", str(shelf / "v2"), replace=True)
    assert reg.get("alpha") is second
    assert reg.rollback("alpha") is first and reg.get("alpha") is first


def test_traffic_must_lie_between_zero_and_one_and_needs_a_stable_version(reg, shelf):
    staged = reg.stage("alpha", str(shelf / "v1"))
    with pytest.raises(AdapterRejected, match="no serving version"):
        reg.install(staged, traffic=0.1)
    reg.install(staged)
    canary = reg.stage("alpha", str(shelf / "v2"), replace=True)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            reg.install(canary, traffic=bad)
    reg.install(canary, traffic=0.2)
    assert reg.set_traffic("alpha", 0.5).traffic == 0.5
    reg.rollback("alpha")
    with pytest.raises(AdapterRejected, match="no canary"):
        reg.set_traffic("alpha", 0.5)


def test_a_refused_version_never_serves_and_is_listed_with_its_reason(reg, shelf):
    stable = reg.register("alpha", str(shelf / "v1"))
    staged = reg.stage("alpha", str(shelf / "v2"), replace=True)
    assert reg.release("alpha")["gating"] == staged.version
    assert {reg.pick("alpha", f"u{i}")[0].version for i in range(100)} == {stable.version}
    reg.refuse(staged, "golden prompts do not reproduce")
    assert reg.get("alpha") is stable
    assert reg.release("alpha")["refused"] == {"version": staged.version, "error": "golden prompts do not reproduce"}
    with pytest.raises(Exception, match="not available"):
        reg.version(staged.key)  # the engine cannot load it either


def test_a_version_refused_at_start_fails_its_name(tiny, tmp_path):
    reg = AdapterRegistry(tiny.adapter_dir, base_id="tiny", base_fingerprint=tiny.fingerprint)
    reg.scan()
    alpha = reg.get("alpha")
    reg.refuse(alpha, "does not change the base")
    assert reg.records()[0].status == "failed" and "does not change" in reg.records()[0].error
    assert reg.get("beta").status == "ready"


def test_a_rescan_stages_changed_packages_until_the_gate_installs_them(tiny, tmp_path):
    directory = tmp_path / "adapters"
    shutil.copytree(tiny.adapter_dir, directory)
    reg = AdapterRegistry(directory, base_id="tiny", base_fingerprint=tiny.fingerprint)
    reg.scan()
    old = reg.get("alpha")
    weights = directory / "alpha" / "adapter_model.safetensors"
    weights.write_bytes((directory / "beta" / "adapter_model.safetensors").read_bytes())
    diff = reg.rescan(stage=True)
    assert diff["changed"] == ["alpha"] and [r.name for r in diff["staged"]] == ["alpha"]
    new = diff["staged"][0]
    assert reg.get("alpha") is old and reg.version(new.key) is new  # known by key, not served
    reg.install(new)
    assert reg.get("alpha") is new


def test_the_automatic_rollback_needs_its_margin_and_enough_requests(reg, shelf):
    stable, canary = canary_of(reg, shelf, traffic=0.5)
    for _ in range(30):
        assert reg.observe("alpha", "stable", False, margin=0.05, min_requests=20) is None
    for i in range(19):
        assert reg.observe("alpha", "canary", i % 2 == 0, margin=0.05, min_requests=20) is None
    dropped = reg.observe("alpha", "canary", True, margin=0.05, min_requests=20)
    assert dropped is not None and dropped[0] == canary.version and "error rate" in dropped[1]
    assert reg.release("alpha")["canary"] is None and reg.get("alpha") is stable
    # without a margin, only the admin rolls back
    reg.install(reg.stage("alpha", str(shelf / "v2"), replace=True), traffic=0.5)
    assert all(reg.observe("alpha", "canary", True, margin=None, min_requests=1) is None for _ in range(50))


def test_a_canary_within_the_margin_stays():
    canary = Canary(record=None, traffic=0.1)
    for i in range(100):
        canary.count("stable", i % 10 == 0)  # 10%
        canary.count("canary", i % 7 == 0)  # 15%
    assert canary.failing(0.1, 20) is None and canary.failing(0.02, 20) is not None


def test_unregister_forgets_the_release(reg, shelf):
    canary_of(reg, shelf)
    reg.unregister("alpha")
    assert "alpha" not in reg
    reg.register("alpha", str(shelf / "v1"))
    assert reg.release("alpha")["canary"] is None and reg.release("alpha")["previous"] is None
    assert AdapterKey("alpha", reg.get("alpha").version) == reg.get("alpha").key
