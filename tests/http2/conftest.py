"""The real ``authz-server serve`` process on each serving layer, for the HTTP/2 suite.

Every test here talks to the server through an implementation that is not the server's own: the
``h2`` package, grpcio as the legitimate client, and raw frames built by
:mod:`loadtests.h2_attacks` for what ``h2`` refuses to send.
"""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

from authz_server.demo.processes import ManagedProcess, ProcessGroup, free_port
from authz_server.explain import check_request_from_description
from tests.integration.test_operations import metric

ALLOW_ALL = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: foo}
spec:
  rules: [{}]
"""
LAYERS = ("fast", "grpcio")
#: a valid Check for namespace foo: allowed by ALLOW_ALL
CHECK = check_request_from_description({
    "method": "GET", "host": "httpbin.foo:8000", "path": "/get",
    "source": {"principal": "spiffe://cluster.local/ns/foo/sa/sleep", "address": "10.0.0.5", "port": 40000},
    "destination": {"principal": "spiffe://cluster.local/ns/foo/sa/httpbin", "address": "10.0.1.10", "port": 80},
}).SerializeToString()


@dataclass
class Served:
    """A running server: its layer, gRPC port, process and metrics port."""

    layer: str
    port: int
    process: ManagedProcess
    metrics_port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def limit_count(self, limit: str) -> float:
        """authz_http2_limit_exceeded_total{limit} (the fast layer's count of limit closes)."""
        return self.metric("authz_http2_limit_exceeded_total", limit=limit)

    def metric(self, name: str, **labels: str) -> float:
        """One sample of the server's /metrics (0 when absent)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            return metric(reply.read().decode(), name, **labels)


StartServer = Callable[..., Served]


def listening(log: Path) -> Callable[[], bool]:
    """Ready once the log says it listens (policies are loaded first): unlike a health probe this
    opens no connection of its own that could still count against a connection limit under test."""
    return lambda: log.exists() and "gRPC listening on" in log.read_text()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    """Start a server on ``layer`` with extra flags (the limits under test); stopped at the end."""
    (tmp_path / "policies.yaml").write_text(ALLOW_ALL)
    with ProcessGroup(tmp_path / "logs") as group:
        def start(layer: str, *flags: str) -> Served:  # later flags win: the limits under test
            port, metrics_port = free_port(), free_port()
            name = f"authz-{layer}-{port}"
            process = group.start_authz_server(
                tmp_path / "policies.yaml", port,
                ["--serving", layer, "--decision-log", "off", "--metrics-listen", f"127.0.0.1:{metrics_port}",
                 *flags], name=name, ready=listening(group.workdir / f"{name}.log"))
            return Served(layer, port, process, metrics_port)
        yield start


def _serve(group: ProcessGroup, work: Path, layer: str) -> Served:
    (work / "policies.yaml").write_text(ALLOW_ALL)
    port, metrics_port = free_port(), free_port()
    process = group.start_authz_server(
        work / "policies.yaml", port,
        ["--serving", layer, "--decision-log", "off", "--metrics-listen", f"127.0.0.1:{metrics_port}"],
        name=f"authz-{layer}")
    return Served(layer, port, process, metrics_port)


@pytest.fixture(scope="module", params=LAYERS)
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One server per layer, with the default limits, shared by a module's tests."""
    work = tmp_path_factory.mktemp(f"served-{request.param}")
    with ProcessGroup(work / "logs") as group:
        yield _serve(group, work, request.param)


@pytest.fixture(scope="module")
def fast(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The fast layer alone, with the default limits, shared by a module's tests."""
    work = tmp_path_factory.mktemp("served-fast")
    with ProcessGroup(work / "logs") as group:
        yield _serve(group, work, "fast")
