"""Micro-benchmark of tracing's cost per Check (not a test): µs per Check through CheckHandler.

The Check path a serving layer runs — CheckRequest bytes in, response bytes out, App.observe
(metrics, and the span when tracing is on) — over the workshop policies, decision log off:

* ``no hook``      App.observe as it was before tracing existed (metrics only): the baseline;
* ``tracing off``  the real App.observe with no ``--otel-endpoint``: must equal the baseline;
* ``tracing on``   a span per Check (W3C parent from ``traceparent``) into the SDK's batching
                   processor with an exporter that drops everything: the SDK's own cost;
* ``on, unsampled`` the same with Envoy's parent not sampled (Istio samples 1% by default): the
                   context is read, no span is recorded.

Rounds interleave the variants so machine noise hits all of them alike; the median is printed.

Run:  flock /work/cpu.lock .venv/bin/python loadtests/bench_tracing.py [checks-per-round] [rounds]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from authz_server.app import App
from authz_server.explain import check_request_from_description
from authz_server.grpc_api.servicer import CheckHandler
from authz_server.observability import metrics
from authz_server.observability.tracing import build_tracer
from authz_server.policy_tests.offline import default_args

WORKSHOP = Path(__file__).resolve().parents[1] / "examples" / "workshop"


class Discard(SpanExporter):
    def export(self, spans: Sequence[object]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def main(checks: int, rounds: int) -> None:
    app = App(default_args(policies=str(WORKSHOP)))
    assert app.reload().ok and app.tracer is None
    traced = App(default_args(policies=str(WORKSHOP)))
    traced.reload()
    traced.tracer = build_tracer("", 1.0, BatchSpanProcessor(Discard()))
    def payload(flags: str) -> bytes:
        return check_request_from_description({
            "method": "GET", "host": "httpbin.foo:8000", "path": "/get",
            "headers": {"traceparent": f"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{flags}"},
            "source": {"principal": "spiffe://cluster.local/ns/foo/sa/sleep"},
            "destination": {"principal": "spiffe://cluster.local/ns/foo/sa/httpbin", "labels": {"app": "httpbin"}},
        }).SerializeToString()

    sampled, unsampled = payload("01"), payload("00")
    variants = {
        "no hook": (CheckHandler(app.authorizer, app.context, lambda v, a, l: metrics.record_check(v, l)), sampled),
        "tracing off": (CheckHandler(app.authorizer, app.context, app.observe), sampled),
        "tracing on": (CheckHandler(traced.authorizer, traced.context, traced.observe), sampled),
        "on, unsampled": (CheckHandler(traced.authorizer, traced.context, traced.observe), unsampled),
    }

    async def per_check_us(handler: CheckHandler, data: bytes) -> float:
        started = time.perf_counter()
        for _ in range(checks):
            await handler.check_bytes(data)
        return (time.perf_counter() - started) / checks * 1e6

    async def run() -> dict[str, list[float]]:
        results: dict[str, list[float]] = {name: [] for name in variants}
        for handler, data in variants.values():
            await per_check_us(handler, data)  # warm-up
        for _ in range(rounds):
            for name, (handler, data) in variants.items():
                results[name].append(await per_check_us(handler, data))
        return results

    results = asyncio.run(run())
    for name, values in results.items():
        print(f"{name:14} {statistics.median(values):7.2f} µs/Check  (median of {rounds} rounds of {checks}; "
              f"min {min(values):.2f}, max {max(values):.2f})")
    traced.tracer.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20000, int(sys.argv[2]) if len(sys.argv) > 2 else 15)
