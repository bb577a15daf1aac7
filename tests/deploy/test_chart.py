"""The Helm chart, rendered by the real Helm SDK (helm-python-sdk embeds Helm v4), validated
against the Kubernetes schemas of a pinned version, and checked for what operators rely on."""

from __future__ import annotations

from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

CHART = Path(__file__).resolve().parents[2] / "helm" / "hotswap"
KUBERNETES = "1.33.0"
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject", "InferencePool"}

VALUE_SETS = {
    "default": {},
    "cpu": {"gpu": {"enabled": False}, "model": {"name": "embedded:smollm2-135m-instruct", "quantization": "nf4"}},
    "gpu-7b": {
        "model": {"name": "openlm-research/open_llama_7b_v2", "quantization": "nf4"},
        "gpu": {"count": 1},
        "resources": {"requests": {"cpu": "4", "memory": "32Gi"}, "limits": {"memory": "48Gi"}},
    },
    "autoscaling": {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6}},
    "autoscaling-keda": {"autoscaling": {"enabled": True, "mode": "keda"}},
    "autoscaling-custom": {"autoscaling": {"enabled": True, "mode": "custom", "queueDepthTarget": 8}},
    "monitoring": {
        "metrics": {
            "serviceMonitor": {"enabled": True},
            "prometheusRule": {"enabled": True},
            "grafanaDashboard": {"enabled": True},
        }
    },
    "api-keys": {"apiKeys": {"enabled": True, "keys": ["k" * 24, "m" * 24]}},
    "existing-secret": {"apiKeys": {"enabled": True, "existingSecret": "my-keys"}},
    "adapters-pvc": {"adapters": {"source": "pvc"}, "cache": {"persistence": {"enabled": False}}},
    "adapters-init": {"adapters": {"source": "initContainer"}},
    "adapters-fleet": {
        "adapters": {
            "source": "initContainer",
            "maxResident": 16,
            "maxHost": 64,
            "pinned": ["dolly"],
            "sources": ["hf://my-org/", "s3://adapters/prod/"],
            "syncer": {
                "enabled": True,
                "ensureExist": [{"id": "support-v2", "source": "hf://my-org/support@v2"}],
                "ensureNotExist": [{"id": "support-v1", "source": "hf://my-org/support@v1"}],
            },
        }
    },
    "releases": {
        "adapters": {
            "sources": ["s3://adapters/prod/"],
            "releases": {
                "enabled": True,
                "file": {
                    "dolly": {
                        "stable": "s3://adapters/prod/dolly/2026-12-01",
                        "canary": {"source": "s3://adapters/prod/dolly/2026-12-07", "traffic": 0.1},
                    }
                },
            },
        }
    },
    "inference-pool": {"inferencePool": {"enabled": True}},
    "locked-down": {
        "apiKeys": {"enabled": True, "existingSecret": "my-keys"},
        "metrics": {
            "requireKey": True,
            "serviceMonitor": {"enabled": True, "authorization": {"secretName": "scrape-key", "secretKey": "key"}},
        },
        "networkPolicy": {
            "enabled": True,
            "ingressFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}}],
        },
    },
}


def render(values: dict) -> list[dict]:
    chart = helm.Chart.load(CHART)
    out = chart.render(values, name="demo", namespace="llm", is_install=True)
    docs = []
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def container(docs):
    (deploy,) = by_kind(docs, "Deployment")
    return deploy, deploy["spec"]["template"]["spec"]["containers"][0]


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request):
    return request.param, render(VALUE_SETS[request.param])


def test_chart_lints_clean():
    report = helm.lint(CHART, strict=True, namespace="llm")
    assert not report["errors"], report
    assert not [m for m in report["messages"] if m["severity"] >= 2], report["messages"]


def test_every_object_is_valid_kubernetes(rendered):
    name, docs = rendered
    assert docs
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            assert doc["apiVersion"] and doc["metadata"]["name"] and doc["spec"]
            continue
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)


def test_selectors_match_pod_labels(rendered):
    _, docs = rendered
    deploy, _ = container(docs)
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for svc in by_kind(docs, "Service"):
        assert svc["spec"]["selector"].items() <= labels.items()
    for pdb in by_kind(docs, "PodDisruptionBudget"):
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for pool in by_kind(docs, "InferencePool"):
        assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for monitor in by_kind(docs, "ServiceMonitor"):
        (svc,) = by_kind(docs, "Service")
        assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()


def test_probes_and_graceful_shutdown(rendered):
    _, docs = rendered
    deploy, c = container(docs)
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    startup = c["startupProbe"]
    assert startup["httpGet"]["path"] == "/health"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # room for a model load
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(next(e["value"] for e in c["env"] if e["name"] == "HOTSWAP_DRAIN_TIMEOUT_SECONDS"))
    assert deploy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= pre_stop + drain


def test_hardened_security_context(rendered):
    _, docs = rendered
    deploy, c = container(docs)
    pod = deploy["spec"]["template"]["spec"]["securityContext"]
    assert pod["runAsNonRoot"] and pod["seccompProfile"]["type"] == "RuntimeDefault"
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["runAsNonRoot"] and sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert deploy["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_gpu_limits_follow_gpu_enabled():
    _, gpu = container(render({}))
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"
    _, cpu = container(render(VALUE_SETS["cpu"]))
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})
    (config,) = by_kind(render(VALUE_SETS["cpu"]), "ConfigMap")
    assert config["data"]["HOTSWAP_DEVICE"] == "cpu"


def test_api_keys_come_from_a_secret_never_the_configmap():
    docs = render(VALUE_SETS["api-keys"])
    (secret,) = by_kind(docs, "Secret")
    assert secret["stringData"]["api-keys"] == f"{'k' * 24},{'m' * 24}"
    _, c = container(docs)
    ref = next(e for e in c["env"] if e["name"] == "HOTSWAP_API_KEYS")["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"]
    assert all("k" * 24 not in v for cm in by_kind(docs, "ConfigMap") for v in cm["data"].values())
    existing = render(VALUE_SETS["existing-secret"])
    assert not by_kind(existing, "Secret")
    _, c = container(existing)
    assert (
        next(e for e in c["env"] if e["name"] == "HOTSWAP_API_KEYS")["valueFrom"]["secretKeyRef"]["name"] == "my-keys"
    )


def test_autoscaling_modes():
    assert not by_kind(render({}), "HorizontalPodAutoscaler")
    (hpa,) = by_kind(render(VALUE_SETS["autoscaling"]), "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    deploy, _ = container(render(VALUE_SETS["autoscaling"]))
    assert "replicas" not in deploy["spec"]  # the HPA owns the replica count
    (custom,) = by_kind(render(VALUE_SETS["autoscaling-custom"]), "HorizontalPodAutoscaler")
    assert custom["spec"]["metrics"][0]["pods"]["metric"]["name"] == "hotswap_queue_depth"
    (scaled,) = by_kind(render(VALUE_SETS["autoscaling-keda"]), "ScaledObject")
    assert "hotswap_queue_depth" in scaled["spec"]["triggers"][0]["metadata"]["query"]


def test_adapter_sources_mount_where_the_service_reads():
    for name in ("adapters-pvc", "adapters-init"):
        docs = render(VALUE_SETS[name])
        deploy, c = container(docs)
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert mounts["adapters"] == "/data/adapters"
        (config,) = by_kind(docs, "ConfigMap")
        assert config["data"]["HOTSWAP_ADAPTER_DIR"] == "/data/adapters"
    deploy, _ = container(render(VALUE_SETS["adapters-init"]))
    assert deploy["spec"]["template"]["spec"]["initContainers"][0]["name"] == "fetch-adapters"


def test_the_lora_syncer_reconciles_through_the_pod_local_admin_port():
    docs = render(VALUE_SETS["adapters-fleet"])
    deploy, main = container(docs)
    spec = deploy["spec"]["template"]["spec"]
    syncer = next(c for c in spec["initContainers"] if c["name"] == "lora-syncer")
    assert syncer["restartPolicy"] == "Always"  # a native sidecar beside hotswap
    assert [c["name"] for c in spec["initContainers"]] == ["lora-syncer", "fetch-adapters"]
    configs = {d["metadata"]["name"]: d for d in by_kind(docs, "ConfigMap")}
    settings = configs["demo-hotswap"]["data"]
    assert settings["HOTSWAP_ADMIN_LOCAL_PORT"] == "8001" and settings["HOTSWAP_PINNED_ADAPTERS"] == "dolly"
    assert settings["HOTSWAP_ADAPTER_SOURCES"] == "hf://my-org/,s3://adapters/prod/"
    wanted = yaml.safe_load(configs["demo-hotswap-lora-syncer"]["data"]["configmap.yaml"])["vLLMLoRAConfig"]
    assert (wanted["host"], wanted["port"]) == ("127.0.0.1", 8001)
    assert wanted["ensureExist"]["models"] == [{"id": "support-v2", "source": "hf://my-org/support@v2"}]
    mount = next(m for m in syncer["volumeMounts"] if m["mountPath"] == "/config")
    assert "subPath" not in mount
    assert "HOTSWAP_ADMIN_LOCAL_PORT" not in by_kind(render({}), "ConfigMap")[0]["data"]  # off by default


def test_dashboard_configmap_carries_the_dashboard():
    import json

    docs = render(VALUE_SETS["monitoring"])
    dashboard = next(d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard"))
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    panels = json.loads(dashboard["data"]["hotswap.json"])["panels"]
    assert len(panels) >= 8


@pytest.mark.parametrize(
    "values",
    [
        {"replicaCount": -1},
        {"model": {"name": "x", "quantization": "int3"}},
        {"gpu": {"count": 0}},
        {"service": {"port": 70000}},
        {"autoscaling": {"mode": "magic"}},
        {"apiKeys": {"keys": ["short"]}},
        {"unknownTopLevel": True},
    ],
)
def test_bad_values_fail_the_schema(values):
    chart = helm.Chart.load(CHART)
    with pytest.raises(helm.HelmError):
        chart.validate_schema(values)
    with pytest.raises(helm.HelmError):
        chart.render(values, name="demo", namespace="llm", is_install=True)


def test_enabled_auth_without_keys_refuses_to_render():
    """Security review M8: `apiKeys.enabled=true` with no keys rendered `api-keys: ""`, so auth
    was silently off while NOTES.txt said keys were in the Secret."""
    with pytest.raises(Exception, match="neither apiKeys.keys nor apiKeys.existingSecret"):
        render({"apiKeys": {"enabled": True}})
    with pytest.raises(Exception, match="metrics.requireKey needs apiKeys.enabled"):
        render({"metrics": {"requireKey": True}})
    with pytest.raises(Exception, match="authorization.secretName"):
        render(
            {
                "apiKeys": {"enabled": True, "keys": ["k" * 24]},
                "metrics": {"requireKey": True, "serviceMonitor": {"enabled": True}},
            }
        )


def test_a_locked_down_release_keys_metrics_and_admits_only_its_peers():
    docs = render(VALUE_SETS["locked-down"])
    settings = by_kind(docs, "ConfigMap")[0]["data"]
    assert settings["HOTSWAP_METRICS_REQUIRE_KEY"] == "true" and settings["HOTSWAP_API_DOCS"] == "false"
    (monitor,) = by_kind(docs, "ServiceMonitor")
    auth = monitor["spec"]["endpoints"][0]["authorization"]
    assert auth == {"type": "Bearer", "credentials": {"name": "scrape-key", "key": "key"}}
    (policy,) = by_kind(docs, "NetworkPolicy")
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == VALUE_SETS["locked-down"]["networkPolicy"]["ingressFrom"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    # with no peers listed the policy admits no one (a rule with no peers would admit everyone)
    closed = render({"networkPolicy": {"enabled": True}})
    assert by_kind(closed, "NetworkPolicy")[0]["spec"]["ingress"] == []
    assert not by_kind(render({}), "NetworkPolicy")  # off by default


def test_release_settings_reach_the_service():
    def settings(values):
        docs = render(values)
        return next(d for d in by_kind(docs, "ConfigMap") if "HOTSWAP_PORT" in d.get("data", {}))["data"]

    default = settings({})
    assert default["HOTSWAP_ADAPTER_GATE"] == "true" and "HOTSWAP_CANARY_ERROR_MARGIN" not in default
    tuned = settings({"adapters": {"gate": False, "canaryErrorMargin": 0.05, "canaryMinRequests": 50}})
    assert tuned["HOTSWAP_ADAPTER_GATE"] == "false" and tuned["HOTSWAP_CANARY_ERROR_MARGIN"] == "0.05"
    assert tuned["HOTSWAP_CANARY_MIN_REQUESTS"] == "50"


def test_every_replica_mounts_one_releases_file_that_edits_reach_without_a_restart():
    docs = render(VALUE_SETS["releases"])
    deploy, main = container(docs)
    configs = {d["metadata"]["name"]: d for d in by_kind(docs, "ConfigMap")}
    settings = configs["demo-hotswap"]["data"]
    assert settings["HOTSWAP_RELEASES_FILE"] == "/etc/hotswap/releases/releases.yaml"
    assert settings["HOTSWAP_RELEASES_POLL_SECONDS"] == "10"
    declared = yaml.safe_load(configs["demo-hotswap-releases"]["data"]["releases.yaml"])
    assert declared == {"releases": VALUE_SETS["releases"]["adapters"]["releases"]["file"]}
    mount = next(m for m in main["volumeMounts"] if m["name"] == "releases")
    assert mount["mountPath"] == "/etc/hotswap/releases" and "subPath" not in mount
    volume = next(v for v in deploy["spec"]["template"]["spec"]["volumes"] if v["name"] == "releases")
    assert volume["configMap"]["name"] == "demo-hotswap-releases"
    # an edit of the releases changes no pod template: no rollout, the mounted file changes
    edited = {"adapters": {**VALUE_SETS["releases"]["adapters"], "releases": {"enabled": True, "file": {}}}}
    assert container(render(edited))[0]["spec"]["template"] == deploy["spec"]["template"]
    # a ConfigMap the operator manages instead
    own = render({"adapters": {"releases": {"enabled": True, "existingConfigMap": "my-releases"}}})
    volume = next(v for v in container(own)[0]["spec"]["template"]["spec"]["volumes"] if v["name"] == "releases")
    assert volume["configMap"]["name"] == "my-releases"
    assert not any(d["metadata"]["name"].endswith("-releases") for d in by_kind(own, "ConfigMap"))
    assert "HOTSWAP_RELEASES_FILE" not in by_kind(render({}), "ConfigMap")[0]["data"]  # off by default


def test_a_release_the_syncer_also_manages_or_a_bad_share_refuses_to_render():
    both = {
        "syncer": {"enabled": True, "ensureExist": [{"id": "dolly", "source": "s3://adapters/prod/dolly/v1"}]},
        "releases": {"enabled": True, "file": {"dolly": {"stable": "s3://adapters/prod/dolly/v1"}}},
    }
    with pytest.raises(Exception, match="adapters.releases.file.dolly"):
        render({"adapters": both})
    bad = {"dolly": {"stable": "s3://a/v1", "canary": {"source": "s3://a/v2", "traffic": 1.5}}}
    with pytest.raises(helm.HelmError):
        render({"adapters": {"releases": {"enabled": True, "file": bad}}})
