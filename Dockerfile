# One image for the API and the GPU workers (docker-compose.yml). CUDA runtime + torch + vlq.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/vlq PATH=/opt/vlq/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/vlq

# torch first (its CUDA build), so source changes do not reinstall it.
RUN pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cu128

WORKDIR /app
COPY pyproject.toml README.md ./
COPY producer ./producer
COPY worker ./worker
COPY engine_build ./engine_build
COPY conf ./conf
RUN pip install ".[worker,s3]"

# Settings: conf/*.yaml, overridden by VLQ_* variables (see docker-compose.yml).
ENV VLQ_CONF_DIR=/app/conf
USER 1000:1000
CMD ["vlq", "--help"]
