"""A real Prometheus server scrapes a running service; promtool parses the chart's alert rules
and the dashboard's queries. Needs Debian's `prometheus` package (.ci/run installs it)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time

import httpx
import pytest
import yaml

from tests.deploy.test_chart import CHART, VALUE_SETS, by_kind, render
from tests.support import free_port, running_service

pytestmark = pytest.mark.skipif(
    not (shutil.which("prometheus") and shutil.which("promtool")),
    reason="Debian's prometheus package is not installed (.ci/run installs it)",
)


def wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.25)
    pytest.fail(f"timed out waiting for {what}")


def ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def service_url(tiny, tmp_path, cache_dir):
    env = {"HOTSWAP_ADAPTER_DIR": str(tiny.adapter_dir), "HOTSWAP_CACHE_DIR": str(cache_dir)}
    flags = ["--model", str(tiny.base_dir), "--quantization", "fp32", "--device", "cpu"]
    with running_service(flags, env, tmp_path / "service.log", timeout=120) as (url, _):
        yield url


@pytest.fixture
def prometheus_url(service_url, tmp_path):
    port = free_port()
    target = service_url.removeprefix("http://")
    config = {
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "hotswap", "static_configs": [{"targets": [target]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("w"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: ok(f"{url}/-/ready"), 60, "Prometheus")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_prometheus_scrapes_the_request_count(service_url, prometheus_url):
    for _ in range(3):
        r = httpx.post(
            f"{service_url}/v1/completions", json={"model": "alpha", "prompt": "hi", "max_tokens": 2}, timeout=60
        )
        assert r.status_code == 200
    httpx.post(f"{service_url}/v1/completions", json={"model": "nope", "prompt": "hi"}, timeout=60)
    query = 'sum(hotswap_requests_total{job="hotswap", adapter="alpha", status="200"})'

    def scraped():
        data = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": query}).json()["data"]["result"]
        return data and float(data[0]["value"][1]) == 3.0

    wait_until(scraped, 30, "Prometheus to see 3 requests")
    gauge = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": "hotswap_resident_adapters"}).json()
    assert float(gauge["data"]["result"][0]["value"][1]) == 2.0  # alpha and beta: the start's gate ran both


def promtool_check_rules(groups: list[dict], tmp_path) -> None:
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    done = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_alert_rules_parse(tmp_path):
    (rule,) = by_kind(render(VALUE_SETS["monitoring"]), "PrometheusRule")
    promtool_check_rules(rule["spec"]["groups"], tmp_path)


def test_dashboard_queries_parse(tmp_path):
    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    # Grafana's variables, replaced by what they expand to.
    concrete = [
        re.sub(r"\$__rate_interval", "5m", e).replace("$namespace", ".*").replace("$service", ".*") for e in exprs
    ]
    rules = [{"record": f"hotswap:dashboard_query_{i}", "expr": e} for i, e in enumerate(concrete)]
    promtool_check_rules([{"name": "dashboard", "rules": rules}], tmp_path)
