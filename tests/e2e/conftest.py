"""Fixtures for the end-to-end tests: a recording Check server, echo apps, the loopback mesh.

The kit is proved against :class:`RecordingAuthz`, a gRPC ``Authorization`` service that allows
everything and keeps each CheckRequest, so the tests can assert what Envoy really sends in each
role independently of the project's own server.
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2, status_pb2

from authz_server.demo.envoy_config import AuthzSettings
from authz_server.demo.processes import ProcessGroup
from authz_server.demo.topology import SERVER_SIDECARS, Mesh, start_mesh
from authz_server.demo.upstream import EchoUpstream

TEST_ID_HEADER = "x-test-id"
EXTERNAL_HOST = "api.external.example"
OTHER_EXTERNAL_HOST = "other.external.example"


def check_headers(request: external_auth_pb2.CheckRequest) -> dict[str, str]:
    """The request headers of a CheckRequest, whether Envoy sent them joined (``headers``) or
    value by value (``header_map``, with ``encode_raw_headers``); repeated values joined by ``,``."""
    http = request.attributes.request.http
    if not http.header_map.headers:
        return dict(http.headers)
    joined: dict[str, str] = {}
    for entry in http.header_map.headers:
        value = entry.value or entry.raw_value.decode()
        joined[entry.key] = f"{joined[entry.key]},{value}" if entry.key in joined else value
    return joined


class RecordingAuthz(external_auth_pb2_grpc.AuthorizationServicer):
    """Allows every Check, records the request, the call's metadata and the caller's connection."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._checks: list[tuple[external_auth_pb2.CheckRequest, str, dict[str, str]]] = []
        self.delay_s = 0.0
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        metadata = {k: v for k, v in context.invocation_metadata() if k.startswith("x-authz-")}
        with self._lock:
            self._checks.append((request, context.peer(), metadata))
        if self.delay_s:
            time.sleep(self.delay_s)
        return external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK))

    def checks_for(self, test_id: str) -> list[external_auth_pb2.CheckRequest]:
        """CheckRequests of the requests that carried ``x-test-id: <test_id>``, in arrival order."""
        with self._lock:
            return [request for request, _, _ in self._checks if check_headers(request).get(TEST_ID_HEADER) == test_id]

    def metadata_for(self, test_id: str) -> list[dict[str, str]]:
        """The ``x-authz-*`` call metadata of those Checks, in the same order."""
        with self._lock:
            return [meta for request, _, meta in self._checks
                    if check_headers(request).get(TEST_ID_HEADER) == test_id]

    def peers_for(self, test_id: str) -> set[str]:
        """The distinct connections (client ip:port) those CheckRequests came over."""
        with self._lock:
            return {peer for request, peer, _ in self._checks if check_headers(request).get(TEST_ID_HEADER) == test_id}

    def __enter__(self) -> "RecordingAuthz":
        self._server.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.stop(grace=None)


@pytest.fixture(scope="session")
def recorder() -> Iterator[RecordingAuthz]:
    with RecordingAuthz() as authz:
        yield authz


@pytest.fixture(scope="session")
def apps() -> Iterator[dict[str, EchoUpstream]]:
    """One echo app per server workload, named after it (httpbin, admin-api, legacy)."""
    with contextlib.ExitStack() as stack:
        yield {name: stack.enter_context(EchoUpstream(name)) for name in SERVER_SIDECARS}


@pytest.fixture(scope="session")
def app(apps: dict[str, EchoUpstream]) -> EchoUpstream:
    return apps["httpbin"]


@pytest.fixture(scope="session")
def external() -> Iterator[EchoUpstream]:
    with EchoUpstream("external") as upstream:
        yield upstream


@pytest.fixture(scope="session")
def other_external() -> Iterator[EchoUpstream]:
    with EchoUpstream("other-external") as upstream:
        yield upstream


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def mesh(
    workdir: Path,
    recorder: RecordingAuthz,
    apps: dict[str, EchoUpstream],
    external: EchoUpstream,
    other_external: EchoUpstream,
) -> Iterator[Mesh]:
    """The full mesh with every checking proxy pointed at the recorder."""
    with ProcessGroup(workdir / "mesh") as group:
        yield start_mesh(
            group,
            AuthzSettings(port=recorder.port),
            apps={name: upstream.port for name, upstream in apps.items()},
            external_hosts={EXTERNAL_HOST: external.port, OTHER_EXTERNAL_HOST: other_external.port},
        )
