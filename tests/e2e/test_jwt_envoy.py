"""JWT end to end: a real Envoy calls the project's server, which fetches keys from a real IdP.

The IdP (:mod:`authz_server.demo.idp`) serves its JWKS over HTTPS with a certificate from a test
CA the server trusts through ``--jwks-ca-bundle``, as a private IdP would be trusted in a cluster.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Iterator

import pytest

from authz_server.demo import envoy_config as ec
from authz_server.demo.client import Reply, request
from authz_server.demo.idp import JWKS_PATH, IdentityProvider
from authz_server.demo.pki import make_ca
from authz_server.demo.processes import ProcessGroup, free_port
from authz_server.demo.upstream import EchoUpstream

FRONT = ec.Workload("front", "default", {"app": "front"})
HOST = "front.example"
_POLICIES = textwrap.dedent(
    """\
    apiVersion: security.istio.io/v1
    kind: RequestAuthentication
    metadata: {{name: idp, namespace: default}}
    spec:
      selector: {{matchLabels: {{app: front}}}}
      jwtRules:
      - issuer: "{issuer}"
        jwksUri: "{jwks_uri}"
        outputClaimToHeaders:
        - {{header: x-jwt-group, claim: group}}
        - {{header: x-jwt-team, claim: org.team}}
    """
)


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdentityProvider]:
    with IdentityProvider(make_ca(tmp_path_factory.mktemp("idp"))) as provider:
        yield provider


@pytest.fixture(scope="module")
def front_port(
    tmp_path_factory: pytest.TempPathFactory, idp: IdentityProvider, app: EchoUpstream
) -> Iterator[int]:
    """Envoy with ext_authz in front of the echo app; its server refreshes on unknown kids at
    most every 0.1 s, so a rotation is seen at once."""
    workdir = tmp_path_factory.mktemp("jwt-envoy")
    policies = workdir / "policies.yaml"
    policies.write_text(_POLICIES.format(issuer=idp.issuer, jwks_uri=idp.jwks_uri))
    authz_port, listen_port = free_port(), free_port()
    with ProcessGroup(workdir) as group:
        group.start_authz_server(
            policies, authz_port,
            ["--workload-namespace", "default", "--jwks-ca-bundle", str(idp.ca_path),
             "--jwks-refresh-min-interval", "0.1"],
        )
        proxy = ec.Proxy(free_port(), FRONT, ec.AuthzSettings(port=authz_port),
                         merge=ec.IdentityMerge("default", "sidecar"))
        group.start_envoy(
            "front", ec.front_proxy(proxy, listen_port=listen_port, upstream=ec.Upstream(app.port))
        )
        yield listen_port


def _get(port: int, token: str | None, path: str = "/anything") -> Reply:
    headers = {"authorization": f"Bearer {token}"} if token is not None else {}
    return request(port, path, host=HOST, headers=headers)


def test_valid_token_reaches_upstream_as_claims_without_the_token(
    front_port: int, idp: IdentityProvider
) -> None:
    reply = _get(front_port, idp.mint({"group": "admins", "org": {"team": "core"}}))
    assert reply.status == 200
    seen = reply.json()["headers"]
    assert (seen.get("x-jwt-group"), seen.get("x-jwt-team")) == ("admins", "core")
    assert "authorization" not in seen


def test_request_without_token_is_left_to_authorization(front_port: int) -> None:
    reply = _get(front_port, None)
    assert reply.status == 200  # no AuthorizationPolicy here, so nothing requires a principal
    assert "x-jwt-group" not in reply.json()["headers"]


def test_invalid_token_gets_401_with_www_authenticate(
    front_port: int, idp: IdentityProvider
) -> None:
    reply = _get(front_port, idp.mint({"group": "admins"}, forged=True), path="/anything?q=1")
    assert (reply.status, reply.body) == (401, b"Jwt verification fails")
    assert reply.headers["www-authenticate"] == (
        f'Bearer realm="http://{HOST}/anything", error="invalid_token"'
    )


def test_expired_token_gets_401(front_port: int, idp: IdentityProvider) -> None:
    reply = _get(front_port, idp.mint({"group": "admins"}, expires_in_s=-3600))
    assert (reply.status, reply.body) == (401, b"Jwt is expired")
    assert 'error="invalid_token"' in reply.headers["www-authenticate"]


def test_rotated_key_is_accepted_without_restart(front_port: int, idp: IdentityProvider) -> None:
    old_token = idp.mint({"group": "users"})
    assert _get(front_port, old_token).status == 200
    fetches = idp.requests.get(JWKS_PATH, 0)
    new_kid = idp.rotate()
    new_token = idp.mint({"group": "users"})
    reply = _get(front_port, new_token)
    assert reply.status == 200, reply.body  # a present token that fails verification is a 401
    assert idp.requests[JWKS_PATH] > fetches  # the unknown kid made the server refresh
    assert new_kid in {key["kid"] for key in idp.jwks()["keys"]}
    assert _get(front_port, old_token).status == 200  # the previous key is still published
