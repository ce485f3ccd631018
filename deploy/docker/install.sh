#!/bin/sh
# The container image's install steps, kept in one script so the tests can run exactly what the
# Dockerfile runs (tests/deploy/test_image_install.py):
#   deploy/docker/install.sh VENV_DIR [SOURCE_DIR]
# Creates VENV_DIR, installs the pinned runtime dependencies, builds the project's wheel (protos are
# compiled at build time by setup.py with the pinned grpcio-tools) and installs it.
set -eu
venv=$1
src=${2:-.}
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT

"$python" -m venv "$venv"
pip="$venv/bin/python -m pip --disable-pip-version-check"

# --no-deps: requirements.lock is the complete dependency set; nothing unpinned can slip in.
$pip install --no-deps --only-binary=:all: -r "$here/requirements.lock"
# xds-protos ships an older copy of opentelemetry-proto's files; install order decides which one
# stays, so opentelemetry-proto goes in again, last, or tracing (--otel-endpoint) cannot import.
$pip install --no-deps --only-binary=:all: --force-reinstall $(grep '^opentelemetry-proto==' "$here/requirements.lock")
# The isolated build environment honours PIP_CONSTRAINT, which pins the build backend.
PIP_CONSTRAINT="$here/build.lock" $pip wheel --no-deps --wheel-dir "$wheels" "$src"
$pip install --no-deps "$wheels"/*.whl
# Fails if requirements.lock no longer satisfies what pyproject.toml declares.
$pip check
