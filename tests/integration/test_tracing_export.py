"""Tracing end to end: ``authz-server serve --otel-endpoint`` exports a span per Check over
OTLP/gRPC to a collector's TraceService that the test runs, joined to the caller's trace."""

from __future__ import annotations

import signal
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from authz_server.demo.processes import ManagedProcess, ProcessGroup, free_port
from tests.integration.test_server import ALLOW_GET_FROM_SLEEP, request

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """The OpenTelemetry collector's trace receiver, keeping what it is sent."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.lock = threading.Lock()

    def Export(self, request, context):  # noqa: N802 - the gRPC method name
        with self.lock:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[tuple[dict[str, str], Span]]:
        """(resource attributes, span) for every span received."""
        with self.lock:
            return [({a.key: a.value.string_value for a in rs.resource.attributes}, span)
                    for r in self.requests for rs in r.resource_spans for ss in rs.scope_spans for span in ss.spans]


@pytest.fixture
def collector() -> Iterator[tuple[Collector, int]]:
    servicer = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(grace=None)


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def traced_request(trace_id: str, method: str = "GET"):
    req = request(method=method)
    req.attributes.request.http.headers["traceparent"] = f"00-{trace_id}-{PARENT}-01"
    return req


def attributes(span: Span) -> dict[str, object]:
    return {a.key: a.value.string_value or a.value.int_value for a in span.attributes}


def start_traced_server(group: ProcessGroup, tmp_path: Path, otlp_port: int) -> tuple[ManagedProcess, int]:
    (tmp_path / "p.yaml").write_text(ALLOW_GET_FROM_SLEEP)
    port = free_port()
    server = group.start_authz_server(tmp_path / "p.yaml", port, [
        "--otel-endpoint", f"http://127.0.0.1:{otlp_port}", "--decision-log", "off"])
    return server, port


def test_spans_reach_the_collector_over_otlp_grpc(tmp_path: Path, collector, monkeypatch) -> None:
    servicer, otlp_port = collector
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")  # the SDK's batch interval, in ms
    monkeypatch.setenv("OTEL_SERVICE_NAME", "authz-under-test")
    with ProcessGroup(tmp_path / "logs") as group:
        server, port = start_traced_server(group, tmp_path, otlp_port)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = external_auth_pb2_grpc.AuthorizationStub(channel).Check
            assert check(traced_request(TRACE_ID), timeout=5).status.code == 0
            wait_for(lambda: len(servicer.spans()) == 1)  # exported while the server runs
            other = "0af7651916cd43dd8448eb211c80319c"
            assert check(traced_request(other, method="POST"), timeout=5).denied_response.status.code == 403
        server.popen.send_signal(signal.SIGTERM)
        assert server.popen.wait(timeout=30) == 0
    received = servicer.spans()
    assert len(received) == 2
    (resource, allowed), (_, denied) = received
    assert resource["service.name"] == "authz-under-test"
    assert allowed.trace_id.hex() == TRACE_ID and allowed.parent_span_id.hex() == PARENT
    assert allowed.name == "ext_authz Check" and allowed.kind == Span.SPAN_KIND_SERVER
    assert attributes(allowed)["authz.decision"] == "allow" and attributes(allowed)["authz.policy"] == "foo/allow-sleep"
    assert denied.trace_id.hex() == other and attributes(denied)["authz.reason"] == "no_allow_match"


def test_spans_still_queued_at_sigterm_are_exported_before_exit(tmp_path: Path, collector, monkeypatch) -> None:
    servicer, otlp_port = collector
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")  # no periodic export during the test
    with ProcessGroup(tmp_path / "logs") as group:
        server, port = start_traced_server(group, tmp_path, otlp_port)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = external_auth_pb2_grpc.AuthorizationStub(channel).Check
            for _ in range(3):
                check(traced_request(TRACE_ID), timeout=5)
        assert servicer.spans() == []
        server.popen.send_signal(signal.SIGTERM)
        assert server.popen.wait(timeout=30) == 0
    assert [span.trace_id.hex() for _, span in servicer.spans()] == [TRACE_ID] * 3
