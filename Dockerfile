# rerank-server images. The GPU image (the default) runs one worker process per visible GPU; the CPU
# image is much smaller (no CUDA) and serves on CPU cores (RERANK_CPU_REPLICAS workers).
#   docker build -t rerank-server:gpu .
#   docker build -t rerank-server:cpu --build-arg VARIANT=cpu .
#   docker run --gpus all -p 50051:50051 -p 8080:8080 -p 9400:9400 -v rerank-models:/models \
#     -e RERANK_MODEL=BAAI/bge-reranker-v2-m3 rerank-server:gpu
# A builder stage installs everything into /opt/venv; the final stage copies that venv onto the same
# base, so pip's caches, the source tree and the venv tooling stay out of the image.

# gpu or cpu: picks the base image and the torch build below.
ARG VARIANT=gpu

# The system Python each image runs on. The CUDA runtime image brings the CUDA and cuDNN libraries
# torch's CUDA build links to; Ubuntu 24.04's python3 is 3.12, as in the CPU image.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS runtime-gpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/*

FROM python:3.12-slim-bookworm AS runtime-cpu

# An empty venv, and the index of the torch build that matches the base.
FROM runtime-gpu AS venv-gpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV TORCH_INDEX=$TORCH_INDEX
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

FROM runtime-cpu AS venv-cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV TORCH_INDEX=$TORCH_INDEX
RUN python3 -m venv /opt/venv

FROM venv-${VARIANT} AS builder
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned (as scripts/bootstrap.sh pins it), from the variant's index; naming it again
# with the project keeps pip from swapping in another build.
ARG TORCH_SPEC=torch==2.13.0
RUN pip install "$TORCH_SPEC" --index-url "$TORCH_INDEX"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY client ./client
COPY server ./server
# The server extra brings the `rerank` command-line client with it.
RUN pip install ".[server]" "$TORCH_SPEC"

FROM runtime-${VARIANT}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/models
COPY --from=builder /opt/venv /opt/venv

# A fixed numeric user, so Kubernetes' runAsNonRoot can check it; /models is its model cache.
RUN groupadd --gid 10001 rerank \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/rerank rerank \
    && mkdir -p /models \
    && chown 10001:10001 /models
USER 10001:10001
WORKDIR /home/rerank
VOLUME ["/models"]

# gRPC, the HTTP/JSON API (Cohere- and Jina-compatible) and Prometheus metrics.
ENV RERANK_HOST=0.0.0.0 RERANK_PORT=50051 RERANK_HTTP_PORT=8080 RERANK_METRICS_PORT=9400
EXPOSE 50051 8080 9400

# Health through the standard grpc.health.v1 service, with the project's own client (Docker only:
# Kubernetes ignores HEALTHCHECK and uses the probes in deploy/kubernetes).
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-m", "rerank_client.healthcheck", "127.0.0.1:50051"]

# SIGTERM drains: health goes NOT_SERVING, calls in flight get RERANK_GRACE_PERIOD_S to finish.
STOPSIGNAL SIGTERM
ENTRYPOINT ["rerank-server"]
