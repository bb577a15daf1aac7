"""The Dockerfile: hadolint-clean, and the structure the chart and operators rely on. No Docker
engine runs here, so the image build itself is not exercised (README says so)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def stages() -> dict[str, str]:
    parts = re.split(r"^FROM ", DOCKERFILE, flags=re.M)[1:]
    return {re.search(r"AS (\S+)", p.splitlines()[0]).group(1): "FROM " + p for p in parts}


def test_hadolint_passes():
    binary = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    done = subprocess.run(
        [binary, "--failure-threshold", "info", str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_pinned_cuda_runtime_and_cpu_variant():
    s = stages()
    assert re.search(r"FROM nvidia/cuda:\d+\.\d+\.\d+-runtime-ubuntu\d+\.\d+ AS base-gpu", s["base-gpu"])
    assert re.search(r"FROM python:\d+\.\d+\.\d+-slim-\w+ AS base-cpu", s["base-cpu"])
    assert "ARG VARIANT=gpu" in DOCKERFILE
    assert "FROM base-${VARIANT} AS runtime" in DOCKERFILE


def test_runtime_stage_is_lean_non_root_and_healthchecked():
    runtime = stages()["runtime"]
    for compiler in ("gcc", "g++", "build-essential", "clang"):
        assert compiler not in runtime
    assert "COPY --from=build /opt/hotswap /opt/hotswap" in runtime
    user = re.search(r"^USER (\S+)", runtime, flags=re.M).group(1)
    assert user.split(":")[0] not in ("0", "root")
    assert "HEALTHCHECK" in runtime and "/health" in runtime
    assert 'ENTRYPOINT ["python", "-m", "service"]' in runtime
    assert 'VOLUME ["/data/cache"]' in runtime and "HOTSWAP_CACHE_DIR=/data/cache" in runtime


@pytest.mark.parametrize("ignored", [".venv", ".git", ".cache", "adapters/.*-checkpoints"])
def test_dockerignore_keeps_the_context_small(ignored):
    assert ignored in (ROOT / ".dockerignore").read_text().splitlines()


def test_the_served_adapters_are_read_only_and_the_working_directory_is_not_imported():
    """Security review L10."""
    assert "COPY adapters /data/adapters" in DOCKERFILE and "--chown=10001:10001 adapters" not in DOCKERFILE
    assert "chown -R 10001:10001 /data/cache" in DOCKERFILE and "PYTHONSAFEPATH=1" in DOCKERFILE
