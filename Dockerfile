# syntax=docker/dockerfile:1
# Training image: world -> train -> evaluate (`mmrank demo`). The slim serving image
# (no torch), the GPU variant and the healthcheck arrive with the service (issue 6).
FROM python:3.11-slim AS train

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY mmrank ./mmrank
COPY data ./data
COPY models ./models
COPY training ./training
# torch==2.13.0 is pinned in pyproject.toml; pass --build-arg PIP_EXTRA_INDEX_URL=<a CPU
# wheel index> to avoid the CUDA wheels on a CPU-only host.
ARG PIP_EXTRA_INDEX_URL=""
RUN pip install ".[train]"

RUN useradd --create-home --uid 10001 mmrank
USER mmrank
VOLUME ["/runs"]
ENTRYPOINT ["mmrank"]
CMD ["demo", "--out", "/runs/demo", "--quiet"]
