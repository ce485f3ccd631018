"""What a client sends cannot pin memory: a real server process answers 10,000 Checks that each
carry a distinct 50 KB value (path, X-Forwarded-For, peer principal) and its resident memory
grows by less than 32 MB.

Before, the 401 realm (request host and path) sat in three response caches, parse_ip cached raw
X-Forwarded-For entries, and 3,000 such requests left hundreds of MB behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest

from authz_server.demo.processes import ProcessGroup, free_port
from tests.integration.test_server import request

CHECKS = 10_000
WARM_UP = 600
VALUE_BYTES = 50_000
LIMIT_BYTES = 32 << 20
POLICIES = """\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: foo}
spec:
  jwtRules:
  - issuer: https://idp.test
    jwks: '%s'
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow, namespace: foo}
spec:
  rules:
  - from: [{source: {serviceAccounts: ["foo/sleep"]}}]
  - from: [{source: {namespaces: ["f*o*o"]}}]
  - from: [{source: {remoteIpBlocks: ["203.0.113.0/24"]}}]
"""
JWKS = {"keys": [{"kty": "oct", "kid": "k", "alg": "HS256", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"}]}


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _hostile(n: int) -> CheckRequest:
    """Check number n: a distinct 50 KB path with a bad token (a 401 whose realm holds the path),
    a distinct 50 KB X-Forwarded-For, or a distinct 50 KB peer principal."""
    check = request()
    http = check.attributes.request.http
    filler = f"{n:08d}" * (VALUE_BYTES // 8)
    kind = n % 3
    if kind == 0:
        http.path = "/" + filler + "?q=1"
        http.headers["authorization"] = "Bearer x"
    elif kind == 1:
        http.headers["x-forwarded-for"] = filler + ", 198.51.100.7"
    else:
        check.attributes.source.principal = "spiffe://cluster.local/ns/foo/sa/" + filler
    return check


def _send(check, first: int, count: int) -> None:
    """Checks in flight 32 at a time; every one must be answered (allow or deny, never an error)."""
    pending = []
    for n in range(first, first + count):
        pending.append(check.future(_hostile(n), timeout=60))
        if len(pending) >= 32:
            pending.pop(0).result()
    for future in pending:
        future.result()


@pytest.mark.parametrize("serving", ["fast", "grpcio"])
def test_distinct_large_request_values_do_not_grow_memory(tmp_path: Path, serving: str) -> None:
    (tmp_path / "p.yaml").write_text(POLICIES % json.dumps(JWKS))
    port = free_port()
    options = [("grpc.max_send_message_length", 1 << 20)]
    with ProcessGroup(tmp_path / "logs") as group:
        server = group.start_authz_server(tmp_path / "p.yaml", port, [
            "--serving", serving, "--workload-kind", "gateway", "--num-trusted-proxies", "1",
            "--decision-log", "off"])
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            check = external_auth_pb2_grpc.AuthorizationStub(channel).Check
            denied = check(_hostile(0), timeout=30)
            assert denied.denied_response.status.code == 401 and "/00000000" in denied.denied_response.headers[0].header.value
            _send(check, 1, WARM_UP)  # allocator arenas and fixed-size caches reach their size
            before = _rss(server.pid)
            _send(check, WARM_UP + 1, CHECKS)
            after = _rss(server.pid)
    assert after - before < LIMIT_BYTES, f"RSS grew by {(after - before) >> 20} MB over {CHECKS} Checks"
