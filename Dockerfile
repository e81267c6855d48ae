# attnserve: the HTTP service and its shipped models in one image.
#
#   CPU (default):  docker build -t attnserve .
#   GPU (CUDA):     docker build -t attnserve:cuda \
#                     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
#                   docker run --gpus all -e ATTNSERVE_DEVICE=cuda -p 8000:8000 attnserve:cuda
#                   (CUDA torch wheels carry their own CUDA runtime; the host needs only the NVIDIA driver
#                   and the NVIDIA container toolkit.)
#   Offline base:   docker build --network host --build-arg BASE_IMAGE=<a local Debian/Python 3.11 image> .
#                   A base whose pip configuration already has a torch wheel in its find-links wheelhouse
#                   installs that wheel instead of reaching TORCH_INDEX_URL.
#
# Configuration is by environment (ATTNSERVE_*, see service/settings.py). The shipped models live in
# /app/model/checkpoints; serve others by mounting a folder and pointing ATTNSERVE_MODELS_DIR at it:
#   docker run -v "$PWD/my-models:/models:ro" -e ATTNSERVE_MODELS_DIR=/models -p 8000:8000 attnserve

ARG BASE_IMAGE=python:3.11-slim

# --- builder: a virtual environment with torch and the runtime dependencies -------------------------------------
FROM ${BASE_IMAGE} AS builder
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH

# A venv: Debian's own python is "externally managed" and the runtime stage copies /opt/venv whole.
RUN python3 -m venv /opt/venv

# torch first (the largest layer, cached across source changes). Its own index by default, so a CPU image does
# not pull a multi-GB CUDA build; a base with a local torch wheelhouse (pip's find-links) uses that instead.
RUN set -eu; \
    links="$(pip config list | sed -n "s/^[a-z:]*\.find-links='\(.*\)'$/\1/p")"; \
    local_wheel=""; \
    for dir in $links; do ls "$dir"/torch-*.whl >/dev/null 2>&1 && local_wheel=yes; done; \
    if [ -n "$local_wheel" ]; then \
        pip install "torch==${TORCH_VERSION}"; \
    else \
        pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"; \
    fi

# The runtime dependencies named in pyproject.toml (not the dev or train extras); the source is not needed yet.
# xgrammar without its dependencies' triton (1 GB, its GPU kernels; never imported on a CPU): the rest it needs
# (torch, transformers, numpy, pydantic) are ours too, and apache-tvm-ffi is added by name.
COPY pyproject.toml /tmp/pyproject.toml
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && grep -v '^xgrammar' /tmp/requirements.txt > /tmp/requirements-no-xgrammar.txt \
    && pip install -r /tmp/requirements-no-xgrammar.txt \
    && pip install --no-deps "$(grep '^xgrammar' /tmp/requirements.txt | sed 's/ *#.*//')" apache-tvm-ffi

# The application and the shipped models, readable by any user whatever modes they had in the build context
# (a checkpoint written 0600 would otherwise be unreadable to the non-root user), with bytecode compiled now:
# the root filesystem may be read-only at run time (Kubernetes securityContext).
COPY service /app/service
COPY model /app/model
RUN chmod -R a+rX,go-w /app && python -m compileall -q /app/service /app/model

# The CPU kernels (model/csrc: paged attention, the decode matvec, RMSNorm, the one-call decoder step), built here
# for this CPU where a compiler can be had (slim bases ship none); the server loads them from /opt/kernels, or keeps
# its plain torch paths and says so.
RUN mkdir -p /opt/kernels; \
    headers="$(python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h"; \
    { { command -v c++ >/dev/null && [ -f "$headers" ]; } \
      || { timeout 300 apt-get update -qq \
           && timeout 300 apt-get install -y -qq --no-install-recommends g++ python3-dev >/dev/null; }; } \
    && cd /app && ATTNSERVE_KERNEL_DIR=/opt/kernels python -m model.cpu_kernels \
    || echo "no CPU kernels in this image: the plain path serves"; \
    chmod -R a+rX /opt/kernels

# --- runtime -----------------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
ARG APP_UID=10001

RUN groupadd --system --gid "${APP_UID}" attnserve \
    && useradd --system --uid "${APP_UID}" --gid "${APP_UID}" --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin attnserve

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /app /app
COPY --from=builder /opt/kernels /opt/kernels
WORKDIR /app

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ATTNSERVE_HOST=0.0.0.0 \
    ATTNSERVE_PORT=8000 \
    ATTNSERVE_MODELS_DIR=/app/model/checkpoints \
    ATTNSERVE_DEVICE=auto \
    ATTNSERVE_KERNEL_DIR=/opt/kernels \
    ATTNSERVE_DRAIN_TIMEOUT=30 \
    ATTNSERVE_LOG_JSON=true

USER attnserve
EXPOSE 8000

# Python, not curl: slim bases ship no curl. The port follows ATTNSERVE_PORT.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('ATTNSERVE_PORT', '8000'), timeout=4)"]

# Exec form: python is PID 1 and gets SIGTERM itself, which drains in-flight requests (up to
# ATTNSERVE_DRAIN_TIMEOUT) before exiting 0. Host and port come from ATTNSERVE_HOST/ATTNSERVE_PORT, so that
# `-e ATTNSERVE_PORT=...` works; flags given after the image name (`--port 9000`) override them.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "service"]
CMD []
