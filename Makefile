# The two commands of the README: `make demo` (set up + run the local mesh demo) and `make test`.
# Both create .venv on first use and install the project with what it needs from PyPI.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv sysdeps test demo clean

$(BIN)/authz-server: pyproject.toml setup.py $(wildcard protos/authz_server/_proto/*.proto)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,fast,load]'
	# xds-protos ships an older copy of opentelemetry-proto's files and pip's install order decides
	# which one stays: reinstall opentelemetry-proto last so tracing (the otel extra) can import.
	$(BIN)/pip install --quiet --no-deps --force-reinstall \
	  "opentelemetry-proto==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"
	touch $@

venv: $(BIN)/authz-server

# The load smoke tests drive Envoy with wrk and h2load (Debian packages wrk, nghttp2-client); the
# chart's alert rules are checked with promtool and a real Prometheus (Debian package prometheus).
sysdeps:
	@command -v wrk >/dev/null && command -v h2load >/dev/null && command -v promtool >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nghttp2-client prometheus >/dev/null; \
	  else echo "please install wrk, h2load and promtool (Debian: apt-get install wrk nghttp2-client prometheus)"; exit 1; fi; }

test: venv sysdeps
	$(BIN)/python -m pytest -q

demo: venv
	$(BIN)/authz-server demo

clean:
	rm -rf $(VENV) build *.egg-info authz_server/_proto/*_pb2*.py authz_server/_proto/*_pb2*.pyi
