"""A JWKS server that trickles one byte a second: fetches give up at the rule's timeout, close
their connection, and never take the threads policy loading runs on."""

from __future__ import annotations

import asyncio
import textwrap
import time
from pathlib import Path

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc

from authz_server.demo.processes import ProcessGroup, free_port
from authz_server.explain import check_request_from_description
from authz_server.jwt import JwksCache, parse_jwt_rules
from authz_server.policy.issues import IssueCollector
from trickle_server import TrickleServer, wait_until


def _rules(server: TrickleServer, issuers: int, timeout: str) -> list:
    raw = [{"issuer": f"https://issuer-{n}.example", "jwksUri": f"{server.url}/jwks/{n}", "timeout": timeout}
           for n in range(issuers)]
    return list(parse_jwt_rules(raw, IssueCollector()))


def test_a_fetch_has_a_total_deadline_and_closes_its_connection() -> None:
    """Regression: urlopen's timeout bounds each read, so a byte a second kept the fetch (and its
    thread) going for minutes after the caller had given up."""
    with TrickleServer(interval_s=1.0) as server:
        cache = JwksCache()
        status = asyncio.run(cache.prefetch(_rules(server, 1, "2s")))
        assert not status.ready
        assert "no complete response within 2s" in status.sources[0].last_error
        assert wait_until(lambda: server.counts() == (1, 1)), server.counts()


def test_stalled_fetches_leave_the_default_executor_free() -> None:
    """Regression: each fetch held a default-executor thread; six stalled issuers filled it and the
    policy watcher's and reloads' asyncio.to_thread calls queued behind them."""

    async def scenario(server: TrickleServer) -> str:
        cache = JwksCache()
        fetches = asyncio.create_task(cache.prefetch(_rules(server, 12, "60s")))
        while server.counts()[0] < 12:
            await asyncio.sleep(0.05)
        try:
            return await asyncio.wait_for(asyncio.to_thread(lambda: "policy loaded"), 20)
        finally:
            fetches.cancel()

    with TrickleServer(interval_s=1.0) as server:
        assert asyncio.run(scenario(server)) == "policy loaded"
        assert wait_until(lambda: server.counts() == (12, 12)), server.counts()  # cancelled = closed


DENY_ALL = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: foo}
spec: {action: DENY, rules: [{}]}
"""


def test_a_new_deny_is_enforced_while_every_idp_trickles(tmp_path: Path) -> None:
    """The symptom, on a real server: eight issuers whose JWKS endpoint trickles; adding a DENY
    policy must take effect through the policy watcher."""
    with TrickleServer(interval_s=1.0) as server:
        policies = tmp_path / "policies"
        policies.mkdir()
        jwt_rules = "\n".join(
            f'  - {{issuer: "https://issuer-{n}.example", jwksUri: "{server.url}/jwks/{n}", timeout: 60s}}'
            for n in range(8))
        (policies / "ra.yaml").write_text(textwrap.dedent("""\
            apiVersion: security.istio.io/v1
            kind: RequestAuthentication
            metadata: {name: idps, namespace: foo}
            spec:
              jwtRules:
            """) + jwt_rules + "\n")
        port = free_port()
        request = check_request_from_description({"method": "GET", "host": "h", "path": "/",
                                                   "destination": {"principal": "spiffe://cluster.local/ns/foo/sa/x"}})
        with ProcessGroup(tmp_path / "logs") as group:
            group.start_authz_server(policies, port, ["--reload-interval", "0.2", "--decision-log", "off"],
                                     timeout_s=60)
            assert wait_until(lambda: server.counts()[0] >= 8)
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                check = external_auth_pb2_grpc.AuthorizationStub(channel).Check
                assert check(request, timeout=10).status.code == 0
                (policies / "deny.yaml").write_text(DENY_ALL)
                deadline = time.monotonic() + 30
                while check(request, timeout=10).status.code == 0:
                    assert time.monotonic() < deadline, "the new DENY was not enforced within 30 s"
                    time.sleep(0.2)
