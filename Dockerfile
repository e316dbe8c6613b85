# syntax=docker/dockerfile:1
# mmrank images (README "Deploying"). Targets:
#   runtime (default)  the ranking service and the feature-store loader on python:3.11-slim:
#                      pyproject's base install only (ONNX Runtime CPU, FastAPI, redis; no torch)
#   gpu                the same on a CUDA + cuDNN base with onnxruntime-gpu instead of onnxruntime
#                      (docker build --target gpu -t mmrank:gpu .)
#   train              torch (CPU) + the training stack: builds model repositories
#                      (`mmrank stack --build-only`, `mmrank demo`); never deployed
# Every image runs as the unprivileged user mmrank (uid 10001) and reports health from
# GET /v2/health/ready (200 only with a warm model and an answering feature store).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

# ---- build: a virtual environment with the serving dependencies --------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mmrank ./mmrank
COPY data ./data
COPY models ./models
COPY training ./training
COPY model_export ./model_export
COPY feature_store ./feature_store
COPY service ./service
COPY deploy ./deploy
# versions come from pyproject.toml's lower bounds; pin them with a constraints file
# (PIP_CONSTRAINT) for reproducible images
RUN pip install --no-cache-dir .

# ---- train: the PyTorch side, for building model repositories --------------------------
FROM build AS train
# torch==2.13.0 is pinned in pyproject.toml; on a CPU-only host pass
# --build-arg PIP_EXTRA_INDEX_URL=<a CPU wheel index> to avoid the CUDA wheels.
ARG PIP_EXTRA_INDEX_URL=""
ENV HF_HUB_OFFLINE=1
# DL3013 (pin pip versions): ".[train]" is this project; its versions are pyproject.toml's
# (torch pinned there), and hadolint does not see the quoted local path as one.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[train]" \
    && groupadd --system --gid 10001 mmrank \
    && useradd --create-home --uid 10001 --gid 10001 mmrank
USER 10001:10001
WORKDIR /home/mmrank
ENTRYPOINT ["mmrank"]
CMD ["stack", "--build-only", "--dir", "/models"]

# ---- gpu-base: CUDA runtime + Python 3.11 (Ubuntu 22.04 ships 3.10) ---------------------
FROM ${CUDA_IMAGE} AS gpu-base
# DL3008 (pin apt versions): the CUDA base tag pins the distribution; jammy's python3.11
# gets security updates we want on rebuild, which a version pin would block.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/*

# ---- gpu-build: the serving venv with onnxruntime-gpu ----------------------------------
FROM gpu-base AS gpu-build
ARG ORT_GPU_VERSION=1.20.1
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY --from=build /src /src
# onnxruntime and onnxruntime-gpu install the same module: swap the CPU wheel out
RUN pip install --no-cache-dir . \
    && pip uninstall -y onnxruntime \
    && pip install --no-cache-dir "onnxruntime-gpu==${ORT_GPU_VERSION}"

# ---- gpu: the serving image on CUDA ------------------------------------------------------
FROM gpu-base AS gpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    MMRANK_BACKEND__DEVICE=cuda
COPY --from=gpu-build /opt/venv /opt/venv
RUN groupadd --system --gid 10001 mmrank \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin mmrank
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2)"]
ENTRYPOINT ["mmrank"]
CMD ["serve", "--repo", "/models/repo", "--host", "0.0.0.0", "--port", "8000"]

# ---- runtime (default): the serving image on CPU -----------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH
COPY --from=build /opt/venv /opt/venv
RUN groupadd --system --gid 10001 mmrank \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin mmrank
USER 10001:10001
WORKDIR /tmp
EXPOSE 8000
# urlopen raises (exit 1) on any answer but 2xx: 503 while not ready
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=2)"]
ENTRYPOINT ["mmrank"]
CMD ["serve", "--repo", "/models/repo", "--host", "0.0.0.0", "--port", "8000"]
