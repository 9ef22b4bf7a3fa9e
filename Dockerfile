# syntax=docker/dockerfile:1.7
# UniCoRn ranking service image. Stages:
#   base     pinned Python, shared environment
#   build    a virtualenv with the SERVING install only (exact pins, no torch)
#   serving-venv  that virtualenv without pip/setuptools: what the runtime copies
#   train    build + torch (CPU) + the train extra; trains the demo bundle. Never shipped.
#   runtime  base + the serving virtualenv, non-root, HEALTHCHECK; the bundle is MOUNTED
#            at /srv/bundles/current (docker run -v "$PWD/bundles/demo:/srv/bundles/current:ro")
#   model    runtime + a bundle given as a named build context (one image per model)
#   demo     runtime + the demo bundle trained in `train` (the default target)
#
#   docker build -t unicorn:demo .                        # self-contained, trains the demo
#   docker build --target runtime -t unicorn:0.1.0 .      # mount a bundle at run time
#   docker build --target model --build-context bundle=bundles/prod -t unicorn:0.1.0-prod .
#
# Expected size of `runtime`: ~335 MB uncompressed (~115 MB compressed): python slim
# (~130 MB) + the serving virtualenv (205 MB measured: onnxruntime 78, numpy 73, uvloop 14,
# redis 6, pydantic 10...). `demo` adds the bundle (~11 MB). No torch (~750 MB), no
# compiler, no pip. docs/OPERATIONS.md, "The image", has the breakdown.

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ---------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# ---------------------------------------------------------------------------------------
FROM base AS build
RUN python -m venv /opt/venv
WORKDIR /src
# Dependencies first (their layer is reused while only the code changes): exactly the
# bytes requirements.lock names (pip refuses any file whose sha256 it does not list);
# every one is a binary wheel for linux/amd64 and linux/arm64, so no compiler is needed.
COPY requirements.lock /tmp/requirements.lock
RUN pip install --require-hashes --only-binary=:all: -r /tmp/requirements.lock
COPY pyproject.toml README.md ./
COPY app ./app
COPY model_export ./model_export
RUN pip install --no-deps . \
    && python -c "import app, onnxruntime, numpy; print('serving install ok')" \
    && ! python -c "import torch" 2>/dev/null

# ---------------------------------------------------------------------------------------
# The virtualenv the runtime copies: pip and setuptools are not needed to serve (-26 MB).
FROM build AS serving-venv
RUN python -m pip uninstall --yes --quiet setuptools pip

# ---------------------------------------------------------------------------------------
FROM build AS train
ARG TORCH_VERSION=2.13.0
ARG BUNDLE_SOURCE=synthetic
RUN pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
COPY deploy/docker/requirements-train.txt /tmp/requirements-train.txt
RUN pip install -r /tmp/requirements-train.txt
# Deterministic from the seed: the same source tree trains the same demo bundle.
RUN unicorn build-bundle --source "${BUNDLE_SOURCE}" --out /bundles/demo \
    && test -f /bundles/demo/manifest.json

# ---------------------------------------------------------------------------------------
FROM base AS runtime
# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot / runAsUser can check it.
RUN groupadd --system --gid 10001 unicorn \
    && useradd --system --uid 10001 --gid unicorn --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin unicorn \
    && mkdir -p /srv/bundles \
    && chown unicorn:unicorn /srv/bundles
COPY --from=serving-venv /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /opt/unicorn/healthcheck.py
# Settings are UNICORN_* variables (app/serving/config.py). Bind every interface inside the
# container; the bundle path is a mount point unless the `demo` target fills it.
ENV PYTHONDONTWRITEBYTECODE=1 \
    OPENBLAS_NUM_THREADS=1 \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    UNICORN_HOST=0.0.0.0 \
    UNICORN_PORT=8000 \
    UNICORN_WORKERS=1 \
    UNICORN_BUNDLE=/srv/bundles/current
LABEL org.opencontainers.image.title="unicorn-ranker" \
      org.opencontainers.image.description="UniCoRn: one model ranks search and recommendations" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 10001:10001
WORKDIR /srv
EXPOSE 8000
# /healthz = the process is alive and serving HTTP (the model loads before it listens).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "/opt/unicorn/healthcheck.py", "/healthz"]
# uvicorn handles SIGTERM itself: in-flight requests finish, then it exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["unicorn"]
CMD ["serve"]

# ---------------------------------------------------------------------------------------
# A model image: runtime + YOUR bundle, passed as a named build context (BuildKit):
#   docker build --target model --build-context bundle=bundles/prod -t unicorn:0.1.0-prod .
# One immutable image per model version: a rollout is a model change, a rollback is too.
FROM runtime AS model
COPY --from=bundle . /srv/bundles/current

# ---------------------------------------------------------------------------------------
FROM runtime AS demo
COPY --from=train /bundles/demo /srv/bundles/demo
ENV UNICORN_BUNDLE=/srv/bundles/demo
