"""Deadlines and the admission limit on both serving layers, against the real ``serve`` process.

A Check is made to wait the way it really does: its token's ``kid`` is unknown, so the server
refreshes the issuer's JWKS — from an HTTPS IdP on loopback that answered the first fetch and
stalls the next one. (The in-process mechanics, with a fake clock: test_overload_mechanics.py.)
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest, CheckResponse

from loadtests import h2_attacks as a
from tests.http2.conftest import ALLOW_ALL, CHECK, LAYERS, Served, StartServer
from tests.http2.test_grpc_requests import h2_call
from tests.integration.test_operations import wait_for
from tests.jwt.jwt_helpers import IdP, Keys, _idp_server, idp, keys  # noqa: F401 - fixtures

ISSUER = "https://issuer.overload.test"
INTERNAL, DEADLINE_EXCEEDED = "13", "4"


def policies_with_jwks(jwks_uri: str) -> str:
    """Allow everything in namespace foo, with a RequestAuthentication whose keys are fetched
    from *jwks_uri* (a 60 s fetch timeout: the Check's own deadline is what stops it)."""
    return ALLOW_ALL + f"""---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: foo}}
spec:
  jwtRules: [{{issuer: "{ISSUER}", jwksUri: "{jwks_uri}", timeout: 60s}}]
"""


def unknown_kid_token(keys: Keys) -> str:
    """A token of the issuer signed by key-2, which its JWKS (key-1 only) does not list yet:
    the server refreshes the JWKS to look for it (and waits for that fetch)."""
    return keys.mint({"iss": ISSUER, "sub": "alice", "exp": int(time.time()) + 600}, kid="key-2", sign_with="key-2")


def check(served: Served, message: bytes = CHECK, timeout: float = 10.0) -> CheckResponse:
    with grpc.insecure_channel(served.address) as channel:
        return CheckResponse.FromString(channel.unary_unary(a.CHECK_PATH)(message, timeout=timeout))


def with_token(token: str) -> bytes:
    request = CheckRequest.FromString(CHECK)
    request.attributes.request.http.headers["authorization"] = f"Bearer {token}"
    return request.SerializeToString()


@pytest.mark.parametrize("layer", LAYERS)
def test_a_malformed_grpc_timeout_is_internal_and_a_passed_one_is_never_evaluated(
    start_server: StartServer, layer: str
) -> None:
    served = start_server(layer)
    for value in ("abc", "1x", "-1S", "1.5S", "S"):
        answer, _ = h2_call(served.port, a.request_headers(a.CHECK_PATH, ("grpc-timeout", value)),
                            a.grpc_message(CHECK))
        assert answer["grpc-status"] == INTERNAL, (value, answer)
    answer, _ = h2_call(served.port, a.request_headers(a.CHECK_PATH, ("grpc-timeout", "0m")), a.grpc_message(CHECK))
    assert answer["grpc-status"] == DEADLINE_EXCEEDED
    if layer == "fast":  # grpcio answers a call already past its deadline itself, unseen by the server
        assert served.metric("authz_checks_expired_total", stage="queued") == 1
    answer, _ = h2_call(served.port, a.request_headers(a.CHECK_PATH, ("grpc-timeout", "5S")), a.grpc_message(CHECK))
    assert answer["grpc-status"] == "0"
    assert served.metric("authz_checks_total", decision="allow") == 1  # the expired one was not decided


@pytest.mark.parametrize("layer", LAYERS)
def test_beyond_the_pending_limit_a_check_is_refused_at_once_and_a_waiting_one_expires(
    start_server: StartServer, layer: str, tmp_path: Path, idp: IdP, keys: Keys, _idp_server: tuple  # noqa: F811
) -> None:
    idp.serve_json("/jwks", keys.jwks("key-1"))
    (tmp_path / "policies.yaml").write_text(policies_with_jwks(idp.url("/jwks")))
    served = start_server(layer, "--max-pending-checks", "1", "--jwks-ca-bundle", _idp_server[1],
                          "--jwks-refresh-min-interval", "0.001")
    assert idp.count("/jwks") == 1  # prefetched before listening
    idp.routes["/jwks"].delay = 60.0  # the next fetch stalls
    unknown_kid = unknown_kid_token(keys)
    outcome: list[grpc.StatusCode] = []

    def waiting_check() -> None:
        try:
            check(served, with_token(unknown_kid), timeout=3.0)
        except grpc.RpcError as exc:
            outcome.append(exc.code())  # type: ignore[attr-defined]

    waiter = threading.Thread(target=waiting_check)
    waiter.start()
    wait_for(lambda: idp.count("/jwks") == 2)  # it waits on the refresh: one Check in progress
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as refused:
        check(served)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert "limit 1" in refused.value.details()  # type: ignore[attr-defined]
    assert time.monotonic() - started < 2.0  # at once, not after the waiting one
    assert served.metric("authz_checks_refused_total", reason="pending_limit") == 1
    waiter.join(timeout=30)
    assert outcome == [grpc.StatusCode.DEADLINE_EXCEEDED]
    wait_for(lambda: served.metric("authz_checks_expired_total", stage="waiting") == 1)
    assert check(served).status.code == 0  # its slot is free again
