"""Tracing: a span per Check, child of the trace the CheckRequest carries (W3C or B3), with the
decision as attributes — checked with the SDK's in-memory exporter through the real Check path."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import pytest
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from authz_server.app import App
from authz_server.cli import build_parser
from authz_server.explain import check_request_from_description
from authz_server.grpc_api.servicer import CheckHandler
from authz_server.observability.tracing import build_tracer, unavailable
from authz_server.policy_tests.offline import default_args

WORKSHOP = Path(__file__).resolve().parents[2] / "examples" / "workshop"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


@pytest.fixture
def traced() -> tuple[CheckHandler, InMemorySpanExporter]:
    app = App(default_args(policies=str(WORKSHOP)))
    assert app.tracer is None  # off unless --otel-endpoint
    assert app.reload().ok
    exporter = InMemorySpanExporter()
    app.tracer = build_tracer("", processor=SimpleSpanProcessor(exporter))
    return CheckHandler(app.authorizer, app.context, app.observe), exporter


def check(headers: dict[str, str], method: str = "GET", path: str = "/get") -> CheckRequest:
    return check_request_from_description({
        "method": method, "host": "httpbin.foo:8000", "path": path, "headers": headers,
        "source": {"principal": "spiffe://cluster.local/ns/foo/sa/sleep"},
        "destination": {"principal": "spiffe://cluster.local/ns/foo/sa/httpbin", "labels": {"app": "httpbin"}},
    })


def decide(handler: CheckHandler, request: CheckRequest) -> None:
    asyncio.run(handler.verdict(request))


def test_a_check_is_a_server_span_in_envoys_w3c_trace(traced) -> None:
    handler, exporter = traced
    decide(handler, check({"traceparent": f"00-{TRACE_ID}-{PARENT}-01", "cookie": "session=s3cr3t"},
                          path="/debug/vars?q=1"))
    [span] = exporter.get_finished_spans()
    assert span.name == "ext_authz Check" and span.kind is SpanKind.SERVER
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert format(span.parent.span_id, "016x") == PARENT and span.parent.is_remote
    assert span.start_time <= span.end_time
    assert dict(span.attributes) == {
        "authz.decision": "allow", "authz.reason": "allowed_by_policy", "http.response.status_code": 200,
        "authz.policy": "foo/httpbin-readers", "authz.rule": 0, "authz.dry_run": ("DENY=denied:foo/deny-debug",),
        "authz.jwt.result": "no_token", "http.request.method": "GET", "url.path": "/debug/vars",
        "authz.source.principal": "spiffe://cluster.local/ns/foo/sa/sleep", "authz.workload.namespace": "foo",
    }
    assert span.resource.attributes["service.name"] == "authz-server"
    assert not any("s3cr3t" in str(v) for v in span.attributes.values())  # headers never become attributes


@pytest.mark.parametrize("headers", [
    {"x-b3-traceid": TRACE_ID, "x-b3-spanid": PARENT, "x-b3-sampled": "1"},
    {"b3": f"{TRACE_ID}-{PARENT}-1"},
])
def test_b3_headers_join_the_trace_too(traced, headers: dict[str, str]) -> None:
    handler, exporter = traced
    decide(handler, check(headers, method="POST"))
    [span] = exporter.get_finished_spans()
    assert format(span.context.trace_id, "032x") == TRACE_ID and format(span.parent.span_id, "016x") == PARENT
    assert span.attributes["authz.decision"] == "deny" and span.attributes["authz.reason"] == "no_allow_match"
    assert "authz.policy" not in span.attributes


def test_w3c_wins_over_b3_and_an_unsampled_parent_is_followed(traced) -> None:
    handler, exporter = traced
    other = "0af7651916cd43dd8448eb211c80319c"
    decide(handler, check({"traceparent": f"00-{TRACE_ID}-{PARENT}-01", "x-b3-traceid": other,
                           "x-b3-spanid": PARENT, "x-b3-sampled": "1"}))
    decide(handler, check({"traceparent": f"00-{other}-{PARENT}-00"}))  # Envoy decided not to sample
    [span] = exporter.get_finished_spans()
    assert format(span.context.trace_id, "032x") == TRACE_ID


def test_without_trace_context_the_sample_ratio_decides() -> None:
    for ratio, expected in ((1.0, 1), (0.0, 0)):
        exporter = InMemorySpanExporter()
        tracer = build_tracer("", ratio, SimpleSpanProcessor(exporter))
        app = App(default_args(policies=str(WORKSHOP)))
        app.reload()
        app.tracer = tracer
        decide(CheckHandler(app.authorizer, app.context, app.observe), check({}))
        spans = exporter.get_finished_spans()
        assert len(spans) == expected
        if spans:
            assert spans[0].parent is None


def test_a_malformed_check_request_is_an_error_span(traced) -> None:
    handler, exporter = traced
    decide(handler, CheckRequest())
    [span] = exporter.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR and span.status.description == "malformed_request"
    assert span.attributes["authz.decision"] == "deny" and span.parent is None


def test_long_values_are_cut(traced) -> None:
    handler, exporter = traced
    decide(handler, check({}, path="/" + "a" * 10_000))
    [span] = exporter.get_finished_spans()
    assert len(span.attributes["url.path"]) == 256


@pytest.mark.parametrize("value, problem", [
    ("collector:4317", "expected http://HOST:PORT or https://HOST:PORT"),
])
def test_endpoint_flag_is_checked(value: str, problem: str, capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--otel-endpoint", value])
    assert problem in capsys.readouterr().err
    args = build_parser().parse_args(["serve", "--otel-endpoint", "http://127.0.0.1:4317"])
    assert isinstance(args, argparse.Namespace) and args.otel_sample_ratio == 1.0


def test_the_otlp_exporter_imports_in_this_install() -> None:
    """xds-protos ships older copies of the OTLP protos; the install must leave the newer ones."""
    build_tracer("http://127.0.0.1:4317").shutdown()


@pytest.mark.parametrize(("error", "says"), [
    (ImportError("No module named 'opentelemetry'", name="opentelemetry"),
     "tracing needs the otel extra: pip install 'istio-ext-authz-server[otel]' (No module named"),
    (ImportError("cannot import name 'InstrumentationScope' from 'opentelemetry.proto.common.v1.common_pb2'",
                 name="opentelemetry.proto.common.v1.common_pb2"),
     "overwritten by xds-protos' older copy"),
])
def test_why_tracing_cannot_start_is_told(error: ImportError, says: str) -> None:
    message = str(unavailable(error))
    assert says in message
    assert "\n" not in message
