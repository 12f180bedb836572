# rerank-server for GPU hosts: one worker process per visible GPU.
#   docker build -t rerank-server .
#   docker run --gpus all -p 50051:50051 -p 9400:9400 -v rerank-models:/models \
#     -e RERANK_MODEL=BAAI/bge-reranker-v2-m3 rerank-server
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/models

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# torch first, from the CUDA 12.8 index, pinned so the project's install keeps it.
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
RUN pip install "$TORCH_SPEC" --index-url "$TORCH_INDEX"

WORKDIR /opt/rerank
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY client ./client
COPY server ./server
RUN pip install ".[server]"

RUN useradd --create-home --uid 10001 rerank \
    && mkdir -p /models && chown rerank:rerank /models
USER rerank
VOLUME ["/models"]

ENV RERANK_HOST=0.0.0.0 RERANK_PORT=50051 RERANK_METRICS_PORT=9400 RERANK_DEVICES=auto
EXPOSE 50051 9400

# Health through the standard grpc.health.v1 service, with the project's own client.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-m", "rerank_client.healthcheck", "127.0.0.1:50051"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["rerank-server"]
