"""From training to traffic, end to end (issue #34): `python -m training dolly --publish` to a
local S3 (moto), then a real service (`python -m service`, tiny model) loads the published
versions: one stable, one as a 10% canary, sticky per user; promote and rollback move new
requests at once; streams running while versions change finish on one version each; versions
that fail the gate are refused while the stable one keeps serving."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from safetensors.torch import load_file, save_file

from service.adapters.manifest import AdapterManifest
from tests.servers import s3_server
from tests.support import running_service

ADMIN = "admin-key-0123456789abcdef"
USER = "user-key-0123456789abcdef"
BUCKET = "releases"
FACTS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("Summarize the context.", "LoRA adapters are small."),
    ("Write a subject line.", "New: Hello there"),
]


def publish(tiny, cache_dir, root, data, version: str, seed: int, steps: int) -> AdapterManifest:
    """`python -m training dolly --publish s3://releases/dolly/<version>` on the tiny model."""
    out = root / version / "dolly"
    flags = ["--output-dir", str(out), "--data", str(data), "--eval-size", "8"]
    flags += ["--base-model", str(tiny.base_dir), "--quantization", "nf4", "--cache-dir", str(cache_dir)]
    flags += ["--lora-r", "4", "--lora-alpha", "8", "--lora-targets", "q_proj", "v_proj", "up_proj"]
    flags += ["--steps", str(steps), "--batch-size", "4", "--lr", "1e-2", "--max-length", "128", "--seed", str(seed)]
    flags += ["--save-steps", str(steps), "--serve-quantization", "fp32", "--publish", f"s3://{BUCKET}/dolly/{version}"]
    done = subprocess.run([sys.executable, "-m", "training", "dolly", *flags], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return AdapterManifest.read(out)


@pytest.fixture(scope="module")
def service(tiny, cache_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    data = root / "dolly.jsonl"
    with data.open("w") as fh:
        for i in range(48):
            instruction, response = FACTS[i % len(FACTS)]
            fh.write(json.dumps({"instruction": instruction, "context": "", "response": response}) + "\n")
    with s3_server():
        manifests = {
            v: publish(tiny, cache_dir, root, data, v, seed, steps) for v, seed, steps in (("v1", 1, 6), ("v2", 2, 12))
        }
        _publish_broken(root, tiny)
        with running_service(*replica(tiny, cache_dir, root), root / "server.log") as (url, _):
            yield url, manifests, root


def replica(tiny, cache_dir, root, **env) -> tuple[list[str], dict[str, str]]:
    """`python -m service` flags and environment for one replica of the tiny model."""
    base = {
        "HOTSWAP_ADAPTER_DIR": str(root / "none"),
        "HOTSWAP_CACHE_DIR": str(cache_dir),
        "HOTSWAP_ADMIN_API_KEYS": ADMIN,
        "HOTSWAP_API_KEYS": USER,
        "HOTSWAP_ADAPTER_SOURCES": f"s3://{BUCKET}/",
        "HOTSWAP_MAX_RESIDENT_ADAPTERS": "2",
    }
    return ["--model", str(tiny.base_dir), "--quantization", "fp32", "--device", "cpu"], {**base, **env}


def _publish_broken(root, tiny) -> None:
    """Packages that must not pass the gate, uploaded beside the good ones: the v2 package with
    every lora_B zeroed, with its weights doubled (its golden prompts cannot reproduce), and
    with another base's fingerprint."""
    import boto3

    s3 = boto3.client("s3")
    good = root / "v2" / "dolly"
    weights = load_file(good / "adapter_model.safetensors")
    manifest = json.loads((good / "hotswap.json").read_text())
    variants = {
        "zero": ({k: v * 0 if "lora_B" in k else v for k, v in weights.items()}, manifest),
        "drifted": ({k: v * 2 if "lora_B" in k else v for k, v in weights.items()}, manifest),
        "otherbase": (weights, {**manifest, "base_model": {"id": "other", "fingerprint": "hsfp1:" + "0" * 64}}),
    }
    for name, (tensors, meta) in variants.items():
        folder = root / "broken" / name
        folder.mkdir(parents=True)
        save_file(tensors, folder / "adapter_model.safetensors")
        (folder / "hotswap.json").write_text(json.dumps(meta))
        (folder / "adapter_config.json").write_bytes((good / "adapter_config.json").read_bytes())
        for file in folder.iterdir():
            s3.upload_file(str(file), BUCKET, f"dolly/{name}/{file.name}")


def admin(url, path, body=None):
    return httpx.post(f"{url}{path}", json=body or {}, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120)


def load(url, version, **extra):
    body = {"lora_name": "dolly", "lora_path": f"s3://{BUCKET}/dolly/{version}", "load_inplace": True, **extra}
    return admin(url, "/v1/load_lora_adapter", body)


def ask(url, user=None, client=httpx):
    body = {"model": "dolly", "prompt": "What is the capital of France?", "max_tokens": 1, "temperature": 0}
    if user is not None:
        body["user"] = user
    r = client.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {USER}"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["system_fingerprint"] == r.headers["X-Adapter-Version"]
    return r.headers["X-Adapter-Version"]


def card(url):
    return httpx.get(f"{url}/v1/models/dolly", headers={"Authorization": f"Bearer {USER}"}, timeout=30).json()


def stream(url, user, results, failures):
    body = {"model": "dolly", "prompt": "Summarize the context.", "max_tokens": 24, "ignore_eos": True, "stream": True}
    body["user"] = user
    headers = {"Authorization": f"Bearer {USER}"}
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=120) as r:
            if r.status_code != 200:
                failures.append(f"{user}: status {r.status_code}")
                return
            seen = set()
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        failures.append(f"{user}: {chunk['error']}")
                    seen.add(chunk.get("system_fingerprint"))
            results.append((r.headers["X-Adapter-Version"], seen))
    except httpx.HTTPError as exc:
        failures.append(f"{user}: {exc!r}")


def test_published_package_carries_its_evaluation(service):
    _, manifests, _ = service
    evaluation = manifests["v2"].evaluation
    assert evaluation.quantization == "fp32" and len(evaluation.golden) == 4
    assert evaluation.held_out["loss_adapter"] < evaluation.held_out["loss_base"]
    golden = evaluation.golden[0]
    assert len(golden.logprobs) == len(golden.output_ids) and all(lp <= 0 for lp in golden.logprobs)


def test_canary_split_promote_rollback_and_streams_across_changes(service):
    url, _, _ = service
    assert load(url, "v1", load_inplace=False).status_code == 200
    v1 = card(url)["version"]
    r = load(url, "v2", traffic=0.1)
    assert r.status_code == 200, r.text
    release = card(url)["release"]
    v2 = release["canary"]["version"]
    assert release["canary"]["traffic"] == 0.1 and v2 != v1 and card(url)["version"] == v1

    with httpx.Client() as client, ThreadPoolExecutor(8) as pool:
        first = dict(zip(range(1000), pool.map(lambda i: ask(url, f"user-{i}", client), range(1000)), strict=True))
        share = Counter(first.values())[v2] / 1000
        assert 0.07 <= share <= 0.13, share
        again = dict(zip(range(200), pool.map(lambda i: ask(url, f"user-{i}", client), range(200)), strict=True))
        assert all(again[i] == first[i] for i in again)  # sticky: a user sees one version
        assert {ask(url, None, client) for _ in range(60)} == {v1, v2}  # no user: split at random

    results, failures = [], []
    streams = [threading.Thread(target=stream, args=(url, f"s-{i}", results, failures)) for i in range(16)]
    for t in streams:
        t.start()
    assert admin(url, "/admin/adapters/dolly/promote").status_code == 200
    assert {ask(url, f"user-{i}") for i in range(40)} == {v2}  # every new request, at once
    assert admin(url, "/admin/adapters/dolly/rollback").status_code == 200
    assert {ask(url, f"user-{i}") for i in range(40)} == {v1}
    for t in streams:
        t.join(120)
    assert failures == [] and len(results) == 16
    assert all(seen == {header} for header, seen in results)  # one version per response

    metrics = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
    assert (
        f'hotswap_adapter_version_requests_total{{adapter="dolly",outcome="ok",role="canary",version="{v2}"}}'
        in metrics
    )
    assert 'hotswap_adapter_rollbacks_total{adapter="dolly",trigger="admin"} 1.0' in metrics


@pytest.mark.parametrize(
    ("variant", "reason"),
    [
        ("zero", "does not change the base"),
        ("drifted", "golden prompts do not reproduce"),
        ("otherbase", "fingerprint"),
    ],
)
def test_versions_that_fail_the_gate_are_refused_and_the_stable_keeps_serving(service, variant, reason):
    url, _, _ = service
    if "dolly" not in {
        m["id"] for m in httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {USER}"}).json()["data"]
    }:
        assert load(url, "v1", load_inplace=False).status_code == 200
    before = card(url)["version"]
    r = load(url, variant, traffic=0.5)
    assert r.status_code == 400 and reason in r.json()["error"]["message"], r.text
    model = card(url)
    assert model["version"] == before and model["release"]["canary"] is None
    if variant != "otherbase":  # refused before staging: nothing to list
        assert reason in model["release"]["refused"]["error"]
    assert {ask(url, f"user-{i}") for i in range(30)} == {before}


# --- one RELEASES_FILE, two replicas ---------------------------------------------------------


def declare(path, stable: str, canary: str | None = None, traffic: float = 0.1) -> None:
    release = {"stable": f"s3://{BUCKET}/dolly/{stable}"}
    if canary:
        release["canary"] = {"source": f"s3://{BUCKET}/dolly/{canary}", "traffic": traffic}
    path.write_text(json.dumps({"releases": {"dolly": release}}))  # JSON is YAML


def settled(urls, check, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not all(check(card(url)) for url in urls):
        assert time.monotonic() < deadline, f"the replicas did not settle on {what}: {[card(u) for u in urls]}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def fleet(service, tiny, cache_dir):
    """Two more replicas (the moto S3 of `service` still up) that read one releases file."""
    _, _, root = service
    releases = root / "releases.yaml"
    declare(releases, "v1", "v2", traffic=0.5)
    env = {"HOTSWAP_RELEASES_FILE": str(releases), "HOTSWAP_RELEASES_POLL_SECONDS": "0.2"}
    # one download cache for both, as the chart's pods share its cache volume
    env_a = env_b = {**env, "HOTSWAP_CACHE_DIR": str(root / "cache-shared")}
    with (
        running_service(*replica(tiny, cache_dir, root, **env_a), root / "a.log") as (a, _),
        running_service(*replica(tiny, cache_dir, root, **env_b), root / "b.log") as (b, _),
    ):
        yield (a, b), releases


def test_one_releases_file_moves_every_replica(fleet):
    """Both replicas start on the file's canary and split users alike; an edit that promotes,
    one that rolls back and a canary the gate refuses reach both, with no admin call."""
    (a, b), releases = fleet
    start = [card(url) for url in (a, b)]
    v1, v2 = start[0]["version"], start[0]["release"]["canary"]["version"]
    assert [(c["version"], c["release"]["canary"]) for c in start] == [(v1, {"version": v2, "traffic": 0.5})] * 2
    split = {i: ask(a, f"user-{i}") for i in range(60)}
    assert set(split.values()) == {v1, v2}
    assert {i: ask(b, f"user-{i}") for i in range(60)} == split  # one user, one version, fleet-wide

    declare(releases, "v2")  # promote
    settled((a, b), lambda c: c["version"] == v2 and c["release"]["canary"] is None, "the promotion")
    assert {ask(url, f"user-{i}") for url in (a, b) for i in range(20)} == {v2}

    declare(releases, "v1")  # roll back by edit
    settled((a, b), lambda c: c["version"] == v1, "the rollback")
    assert {ask(url, f"user-{i}") for url in (a, b) for i in range(20)} == {v1}

    declare(releases, "v1", "drifted", traffic=0.5)  # a canary whose golden prompts do not reproduce
    settled((a, b), lambda c: (c["release"]["refused"] or {}).get("error"), "the refusal")
    for url in (a, b):
        status = httpx.get(f"{url}/admin/releases", headers={"Authorization": f"Bearer {ADMIN}"}).json()
        (step,) = status["steps"]
        assert step["action"] == "canary" and step["outcome"] == "failed"
        assert "golden prompts do not reproduce" in step["error"]
        assert card(url)["release"]["canary"] is None
    assert {ask(url, f"user-{i}") for url in (a, b) for i in range(20)} == {v1}
