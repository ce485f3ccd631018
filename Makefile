# The two commands of the README: `make demo` (set up + run the local mesh demo) and `make test`.
# Both create .venv on first use and install the project with what it needs from PyPI.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv test demo clean

$(BIN)/authz-server: pyproject.toml setup.py $(wildcard protos/authz_server/_proto/*.proto)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,fast]'
	touch $@

venv: $(BIN)/authz-server

test: venv
	$(BIN)/python -m pytest -q

demo: venv
	$(BIN)/authz-server demo

clean:
	rm -rf $(VENV) build *.egg-info authz_server/_proto/*_pb2*.py authz_server/_proto/*_pb2*.pyi
