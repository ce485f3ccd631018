# syntax=docker/dockerfile:1
# Image for authz-server (Envoy ext_authz v3 gRPC server).
#   docker build -t istio-ext-authz-server .
# The install steps live in deploy/docker/install.sh, which the tests also run into a fresh venv
# (tests/deploy/test_image_install.py), so CI proves them without a Docker engine.

# Both stages must use the same interpreter: the venv's python is a symlink to the base image's.
# Pin a digest (python:3.11-slim@sha256:...) for fully reproducible builds.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only what the build needs (tests/deploy checks these paths exist and are not .dockerignored).
COPY pyproject.toml setup.py README.md ./
COPY protos ./protos
COPY authz_server ./authz_server
COPY deploy/docker ./deploy/docker
RUN sh deploy/docker/install.sh /opt/venv /src

FROM ${PYTHON_IMAGE}
# Only the venv comes over: no pip caches, sources, grpcio-tools or setuptools build env.
# Its .pyc files were compiled by pip at install time, so nothing needs writing at run time:
# PYTHONDONTWRITEBYTECODE keeps Python from trying on a read-only root filesystem. The one
# writable path needed: with several workers (the default on a multi-CPU host) and metrics on,
# the workers' metrics files go to $TMPDIR (/tmp) — mount a tmpfs/emptyDir there (the Helm chart
# does), e.g. docker run --read-only --tmpfs /tmp ...
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    AUTHZ_POLICIES=/etc/authz/policies \
    AUTHZ_LISTEN=0.0.0.0:9000 \
    AUTHZ_METRICS_LISTEN=0.0.0.0:9090
# Numeric UID/GID (no passwd entry needed) so Kubernetes runAsNonRoot can verify it.
USER 65532:65532
EXPOSE 9000 9090
# Docker-only; Kubernetes uses the chart's grpc/http probes instead.
# `authz-server health` reads the same AUTHZ_* settings as the server, so it follows the ports.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s CMD ["authz-server", "health"]
# Exec form: authz-server is PID 1 and receives SIGTERM directly; it drains in-flight Checks
# itself and reaps its own worker processes, so no init shim (tini) is needed.
ENTRYPOINT ["authz-server"]
CMD ["serve"]
