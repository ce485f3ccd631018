"""Envoy 1.40's own jwt_authn against this server, request by request, through real Envoys.

One RequestAuthentication (headers with and without a prefix, two query parameters, a cookie,
claim headers of every JSON type) is enforced twice: natively by a front proxy configured as
istiod configures jwt_authn, and by a front proxy calling this server over ext_authz. Every
request goes byte for byte to both; the answers (status, body) and what reached the upstream
(path with query, claim headers, the token headers) must be the same.

The ext_authz proxies differ in ``encode_raw_headers``: with it (``raw``) Envoy sends every header
value on its own, as its header map holds them, which repeated token carriers need; without it
(Istio's default) repeated headers arrive comma-joined and only the single-carrier cases apply.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Callable, Iterator

import pytest
import yaml

from authz_server.demo import envoy_config as ec
from authz_server.demo.idp import IdentityProvider
from authz_server.demo.pki import make_ca
from authz_server.demo.processes import ProcessGroup, free_port
from authz_server.demo.upstream import EchoUpstream

from .jwt_parity import RawReply, native_jwt_filter, native_proxy, raw_request

ISSUER = "https://issuer.example"
RULES: list[dict[str, Any]] = [
    {
        "issuer": ISSUER,
        "fromHeaders": [{"name": "authorization", "prefix": "Bearer "}, {"name": "x-token"}],
        "fromParams": ["access_token", "jwt"],
        "fromCookies": ["session"],
        "outputClaimToHeaders": [
            {"header": "x-groups", "claim": "groups"},
            {"header": "x-org", "claim": "org"},
            {"header": "x-num", "claim": "num"},
            {"header": "x-ratio", "claim": "ratio"},
            {"header": "x-team", "claim": "org.team"},
        ],
    }
]
#: upstream headers compared; x-org holds an object, compared as decoded JSON (Envoy orders an
#: object's keys as its hash map iterates, so a multi-key object's bytes are not reproducible)
COMPARED = ("x-groups", "x-org", "x-num", "x-ratio", "x-team", "authorization", "x-token", "cookie")
CLAIMS = {
    "groups": ["dev", "admin", True, 3.0, 1e20, None, 0.1, 'q"<é>'],
    "org": {"team": "core", "zeta": [1, {"b": False}], "alpha": "β"},
    "num": 12345678901234567890,
    "ratio": 1.5,
}


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdentityProvider]:
    with IdentityProvider(make_ca(tmp_path_factory.mktemp("parity-idp")), issuer=ISSUER) as provider:
        yield provider


@pytest.fixture(scope="module")
def proxies(tmp_path_factory: pytest.TempPathFactory, idp: IdentityProvider) -> Iterator[dict[str, int]]:
    """Listen ports: ``native`` (jwt_authn), ``raw`` and ``istio`` (ext_authz to this server)."""
    workdir = tmp_path_factory.mktemp("jwt-parity")
    jwks = idp.jwks()
    policy = {
        "apiVersion": "security.istio.io/v1",
        "kind": "RequestAuthentication",
        "metadata": {"name": "parity", "namespace": "default"},
        "spec": {"jwtRules": [{**rule, "jwks": json.dumps(jwks)} for rule in RULES]},
    }
    policies = workdir / "policies.yaml"
    policies.write_text(yaml.safe_dump(policy))
    with EchoUpstream("app") as app, ProcessGroup(workdir) as group:
        ports = {"native": free_port(), "raw": free_port(), "istio": free_port()}
        group.start_envoy("native", native_proxy(free_port(), ports["native"], app.port, native_jwt_filter(RULES, jwks)))
        authz_port = free_port()
        group.start_authz_server(policies, authz_port, ["--workload-namespace", "default", "--decision-log", "off"])
        for name in ("raw", "istio"):
            # raw: the chart's identity EnvoyFilter merge (encode_raw_headers among it); istio: istiod's filter
            merge = ec.IdentityMerge("default", "sidecar") if name == "raw" else None
            proxy = ec.Proxy(free_port(), ec.Workload("front", "default", {"app": "front"}),
                             ec.AuthzSettings(port=authz_port), merge=merge)
            group.start_envoy(name, ec.front_proxy(proxy, listen_port=ports[name], upstream=ec.Upstream(app.port)))
        yield ports


def _seen(reply: RawReply, token: str) -> tuple[Any, ...]:
    """What a client and the application can tell about one request's outcome."""
    if reply.status != 200:
        return reply.status, reply.body
    upstream = reply.upstream()
    headers = {k: v.replace(token, "<token>") for k, v in upstream["headers"].items() if k in COMPARED}
    if "x-org" in headers:
        headers["x-org"] = json.loads(base64.b64decode(headers["x-org"]))
    return 200, upstream["path"].replace(token, "<token>"), headers


Case = Callable[[str], tuple[str, list[tuple[str, str]]]]


def _split(token: str) -> tuple[str, str, str]:
    header, payload, signature = token.split(".")
    return header, payload, signature


SINGLE_CARRIER: dict[str, Case] = {
    "bearer": lambda t: ("/p", [("authorization", f"Bearer {t}")]),
    "bearer then space junk": lambda t: ("/p", [("authorization", f"Bearer {t} junk")]),
    "bearer then comma junk": lambda t: ("/p", [("authorization", f"Bearer {t},junk")]),
    "bearer then 3 junk chars": lambda t: ("/p", [("authorization", f"Bearer {t} jun")]),
    "two authorization lines, valid first": lambda t: ("/p", [("authorization", f"Bearer {t}"), ("authorization", "Bearer bad")]),
    "two authorization lines, bad first": lambda t: ("/p", [("authorization", "Bearer bad"), ("authorization", f"Bearer {t}")]),
    "prefix in the middle": lambda t: ("/p", [("authorization", f"Basic x, Bearer {t}")]),
    "characters skipped after the prefix": lambda t: ("/p", [("authorization", f"Bearer !!{t}")]),
    "lower-case prefix is no token": lambda t: ("/p", [("authorization", f"bearer {t}")]),
    # (other parameters plain: Envoy's jwt_authn re-serialises them decoded, so `b=%20x` reaches
    # the application as `b= x`, a request line it rejects; ext_authz's removal keeps them as sent)
    "query token removed, others kept": lambda t: (f"/p?a=1&access_token={t}&b=2", []),
    "query token with %20": lambda t: (f"/p?access_token={t}%20", []),
    "query token with %20 inside": lambda t: ("/p?access_token={0}.{1}.{2}%20{3}".format(*_split(t)[:2], _split(t)[2][:8], _split(t)[2][8:]), []),
    "configured fromParams name": lambda t: (f"/p?jwt={t}&z=1", []),
    "both query names": lambda t: (f"/p?jwt={t}&access_token={t}", []),
    "query token twice, second junk": lambda t: (f"/p?access_token={t}&x=1&access_token=zzz", []),
    "percent-encoded parameter name": lambda t: (f"/p?access%5Ftoken={t}&y=1", []),
    "custom header": lambda t: ("/p", [("x-token", t)]),
    "whitespace inside the signature": lambda t: ("/p", [("x-token", "{0}.{1}.{2}\t{3}".format(*_split(t)[:2], _split(t)[2][:8], _split(t)[2][8:]))]),
    "whitespace inside the header segment": lambda t: ("/p", [("x-token", "{0} {1}.{2}.{3}".format(_split(t)[0][:8], _split(t)[0][8:], *_split(t)[1:]))]),
    "padding that completes nothing": lambda t: ("/p", [("x-token", "{0}{1}.{2}.{3}".format(_split(t)[0], "==" if len(_split(t)[0]) % 4 == 3 else "=", *_split(t)[1:]))]),
    "cookie": lambda t: ("/p", [("cookie", f"a=1; session={t}")]),
    "cookie after a comma is not a cookie": lambda t: ("/p", [("cookie", f"a=1,session={t}")]),
}
REPEATED_CARRIER: dict[str, Case] = {
    "custom header sent twice": lambda t: ("/p", [("x-token", t), ("x-token", t)]),
    "custom header twice, second bad": lambda t: ("/p", [("x-token", t), ("x-token", "bad")]),
    "two cookie lines": lambda t: ("/p", [("cookie", "a=1"), ("cookie", f"session={t}")]),
    "two cookie lines, first wins": lambda t: ("/p", [("cookie", f"session={t}"), ("cookie", "session=bad")]),
}


@pytest.mark.parametrize("name", [*SINGLE_CARRIER, *REPEATED_CARRIER])
def test_raw_headers_server_answers_as_native_jwt_authn(proxies: dict[str, int], idp: IdentityProvider, name: str) -> None:
    token = idp.mint(CLAIMS)
    target, headers = {**SINGLE_CARRIER, **REPEATED_CARRIER}[name](token)
    native = _seen(raw_request(proxies["native"], target, headers), token)
    assert _seen(raw_request(proxies["raw"], target, headers), token) == native


@pytest.mark.parametrize("name", list(SINGLE_CARRIER))
def test_default_istio_server_answers_as_native_jwt_authn(proxies: dict[str, int], idp: IdentityProvider, name: str) -> None:
    token = idp.mint(CLAIMS)
    target, headers = SINGLE_CARRIER[name](token)
    native = _seen(raw_request(proxies["native"], target, headers), token)
    assert _seen(raw_request(proxies["istio"], target, headers), token) == native


def test_the_comparison_sees_what_matters(proxies: dict[str, int], idp: IdentityProvider) -> None:
    """The native side really strips the query token and writes the claims (so equality above
    is not two empty answers)."""
    token = idp.mint(CLAIMS)
    status, path, headers = _seen(raw_request(proxies["native"], f"/p?access_token={token}&k=v", []), token)
    assert (status, path) == (200, "/p?k=v")
    assert base64.b64decode(headers["x-groups"]) == b'["dev","admin",true,3,1e+20,null,0.1,"q\\"\\u003c\xc3\xa9\\u003e"]'
    assert (headers["x-num"], headers["x-ratio"], headers["x-team"]) == ("12345678901234567168", "1.500000", "core")
    assert headers["x-org"] == CLAIMS["org"]
