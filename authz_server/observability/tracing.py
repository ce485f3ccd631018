"""OpenTelemetry spans per Check, joined to Envoy's trace (optional: ``pip install '.[otel]'``).

The CheckRequest carries the downstream request's headers, trace context included: W3C
``traceparent``/``tracestate`` (Envoy's OpenTelemetry tracer) or B3 (``x-b3-*`` or ``b3``, its
Zipkin tracer, Istio's default). Each Check becomes a SERVER span, child of that context, with
the decision, reason, deciding policy and rule, dry-run results and JWT outcome as attributes.
A sampled parent is followed, an unsampled one too; without a parent ``--otel-sample-ratio``
decides. Spans go to an OTLP/gRPC collector from the SDK's batching thread (bounded queue, drops
when full), never from the event loop.

The span is built from the Check's measured start and latency once its verdict exists, in
:meth:`App.observe`; with tracing off that is one ``is None`` test per Check and this module is
not even imported.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from authz_server.authorizer import Verdict
from authz_server.engine.request import RequestAttributes
from authz_server.settings import OTEL_INSTALL_HINT

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

SPAN_NAME = "ext_authz Check"
DEFAULT_SERVICE_NAME = "authz-server"
#: attribute values longer than this are cut (paths and headers are client input)
MAX_ATTRIBUTE_LENGTH = 256
#: verdict reasons of the server failing (fail-closed, or fail-open): the span's status is ERROR
FAILURE_REASONS = frozenset({"malformed_request", "internal_error", "no_policy_set"})


class TracingUnavailable(RuntimeError):
    """``--otel-endpoint`` is set but the OpenTelemetry packages are not installed."""


def unavailable(exc: ImportError) -> TracingUnavailable:
    """Why the OpenTelemetry packages cannot be imported, and what fixes it.

    xds-protos (the Envoy API this server decodes) ships its own, older copy of
    ``opentelemetry/proto/...``; whichever of it and ``opentelemetry-proto`` pip installs last owns
    those files. When xds-protos' copy wins, the exporter fails on a name the old protos lack:
    that is not a missing extra, and reinstalling ``opentelemetry-proto`` alone mends it.
    """
    if (exc.name or "").startswith("opentelemetry.proto") or "opentelemetry.proto" in str(exc):
        return TracingUnavailable(
            f"the OpenTelemetry protos were overwritten by xds-protos' older copy ({exc}); "
            "reinstall them: pip install --no-deps --force-reinstall opentelemetry-proto")
    return TracingUnavailable(f"{OTEL_INSTALL_HINT} ({exc})")


class CheckTracer:
    """Turns answered Checks into spans; one per process (each worker exports its own)."""

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry.propagate import composite
        from opentelemetry.propagators.b3 import B3MultiFormat
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self._tracer = provider.get_tracer("authz_server")
        # Later propagators win: W3C over B3 when a request carries both.
        self._propagator = composite.CompositePropagator([B3MultiFormat(), TraceContextTextMapPropagator()])
        self._kind = SpanKind.SERVER
        self._error = lambda reason: Status(StatusCode.ERROR, reason)

    def record(self, verdict: Verdict, attrs: RequestAttributes | None, latency: float) -> None:
        end = time.time_ns()
        parent = self._propagator.extract(attrs.headers) if attrs is not None else None
        span = self._tracer.start_span(SPAN_NAME, context=parent, kind=self._kind,
                                       start_time=end - int(latency * 1e9), attributes=span_attributes(verdict, attrs))
        if verdict.reason in FAILURE_REASONS:
            span.set_status(self._error(verdict.reason))
        span.end(end_time=end)

    def shutdown(self) -> None:
        """Export what is queued (bounded by the exporter's timeout), then stop."""
        self.provider.shutdown()


def span_attributes(verdict: Verdict, attrs: RequestAttributes | None) -> dict[str, str | int | list[str]]:
    """What a trace viewer shows for one Check: the decision and why; never a header or token."""
    out: dict[str, str | int | list[str]] = {
        "authz.decision": "allow" if verdict.allowed else "deny",
        "authz.reason": verdict.reason,
        "http.response.status_code": verdict.http_status,
    }
    if verdict.policy:
        out["authz.policy"] = verdict.policy
    if verdict.rule is not None:
        out["authz.rule"] = verdict.rule
    if verdict.dry_run:
        out["authz.dry_run"] = [f"{d.action.value}={d.engine_result}" + (f":{d.policy}" if d.policy else "")
                                for d in verdict.dry_run]
    if verdict.jwt_result:
        out["authz.jwt.result"] = verdict.jwt_result
        if verdict.jwt_issuer:
            out["authz.jwt.issuer"] = verdict.jwt_issuer
    if attrs is not None:
        out["http.request.method"] = attrs.method
        out["url.path"] = attrs.path
        if attrs.source_principal:
            out["authz.source.principal"] = attrs.source_principal
        if attrs.workload.namespace:
            out["authz.workload.namespace"] = attrs.workload.namespace
    return out


def build_tracer(endpoint: str, sample_ratio: float = 1.0, processor: SpanProcessor | None = None) -> CheckTracer:
    """A tracer batching spans to the OTLP/gRPC collector at ``endpoint`` (``http://`` plaintext,
    ``https://`` TLS), or handing them to ``processor`` (tests, benchmarks)."""
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import SpanLimits, TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError as exc:
        raise unavailable(exc) from None
    # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES, when set, name the service instead.
    resource = Resource.create({} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": DEFAULT_SERVICE_NAME})
    provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
                              span_limits=SpanLimits(max_span_attribute_length=MAX_ATTRIBUTE_LENGTH))
    if processor is None:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise unavailable(exc) from None
        processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://")))
    provider.add_span_processor(processor)
    return CheckTracer(provider)
