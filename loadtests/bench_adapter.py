"""Micro-benchmark of the CheckRequest adapter (not a test): µs per ``to_attributes``.

Compares what istiod alone makes Envoy send (headers joined into ``headers``, no call metadata)
with what the Helm chart's identity EnvoyFilter makes it send (``encode_raw_headers``: every
header in ``header_map``; the proxy's ``x-authz-*`` metadata among the Check call's headers), so
the cost of per-request identity and value-by-value headers is known. Best of 5 repeats.

Run:  .venv/bin/python loadtests/bench_adapter.py [iterations]
"""

from __future__ import annotations

import argparse
import timeit

from authz_server.engine.request import Workload
from authz_server.explain import check_request_from_description
from authz_server.grpc_api.check_request import RequestContextSettings, to_attributes
from authz_server.grpc_api.workload_identity import proxy_identity

DESCRIPTION = {
    "method": "GET", "host": "httpbin.foo:8000", "path": "/get?x=1",
    "headers": {"user-agent": "curl/8", "x-request-id": "3f2a", "x-forwarded-proto": "http", "accept": "*/*"},
    "source": {"principal": "spiffe://cluster.local/ns/foo/sa/sleep", "address": "10.0.0.5"},
    "destination": {"principal": "spiffe://cluster.local/ns/foo/sa/httpbin", "address": "10.0.1.1", "port": 80,
                    "labels": {"app": "httpbin", "version": "v1"}},
}
#: the HTTP/2 headers of one Check call as the fast layer hands them to the handler
CALL_HEADERS = [
    (":method", "POST"), (":path", "/envoy.service.auth.v3.Authorization/Check"), (":authority", "authz"),
    ("content-type", "application/grpc"), ("te", "trailers"), ("grpc-timeout", "500m"),
    ("x-authz-workload-namespace", "foo"), ("x-authz-workload-kind", "sidecar"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("iterations", type=int, nargs="?", default=20000)
    n = parser.parse_args().iterations
    context = RequestContextSettings(Workload(None, None), 0)
    joined = check_request_from_description(DESCRIPTION)
    raw = check_request_from_description({**DESCRIPTION, "encode_raw_headers": True})
    cases = {
        "istiod only (joined headers, no metadata)": lambda: to_attributes(joined, context),
        "with the identity EnvoyFilter (header_map + x-authz-*)":
            lambda: to_attributes(raw, context, proxy_identity(CALL_HEADERS)),
    }
    for name, case in cases.items():
        best = min(timeit.repeat(case, number=n, repeat=5)) / n
        print(f"{name}: {best * 1e6:.1f} µs per Check")


if __name__ == "__main__":
    main()
