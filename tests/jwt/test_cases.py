"""The jwt/claims/request-principal conformance cases, as jwt_authn outcomes.

Data: ``cases_jwt.yaml`` beside this file (copied from ../shared/istio-semantics/cases.yaml).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import pytest
import yaml

from jwt_helpers import build, hs256_with_public_key, raw_token, request

CASES = yaml.safe_load((Path(__file__).parent / "cases_jwt.yaml").read_text())["cases"]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rules(case: dict, keys) -> list:
    text = json.dumps(case["jwtRules"])
    for name, kid in (("jwks-a", "key-1"), ("jwks-b", "key-2")):
        text = text.replace("{{JWKS:%s}}" % name, keys.jwks_text(kid).replace('"', '\\"'))
    # No network in tests: the "unreachable" IdP is a closed loopback port.
    text = text.replace("https://unreachable.example", f"https://127.0.0.1:{_closed_port()}")
    return json.loads(text)


def _claims(claims: dict, now: int) -> dict:
    out = {}
    for name, value in claims.items():
        if isinstance(value, str) and value.startswith("now"):
            value = now + int(value[3:] or 0)
        out[name] = value
    return out


def _token(jwt: dict, keys, now: int) -> str:
    if "raw" in jwt:
        return jwt["raw"]
    claims = _claims(jwt["claims"], now)
    header = jwt["header"]
    if jwt.get("tamper") == "hs256-with-rsa-public-key":
        return hs256_with_public_key(keys, claims, header["kid"])
    if jwt.get("tamper") == "alg-none-empty-signature":
        return raw_token({"alg": "none", "typ": "JWT"}, claims)
    assert jwt.get("tamper") is None
    return keys.mint(claims, kid=header.get("kid"), sign_with=jwt["sign_with"], alg=header["alg"])


def _request(case: dict, keys):
    spec = case["request"]
    headers = dict(spec["headers"])
    path = spec["path"]
    jwt = spec["jwt"]
    if jwt is not None:
        token = _token(jwt, keys, int(time.time()))
        location = jwt["location"]
        if "header" in location:
            headers[location["header"]] = location.get("value_prefix", "") + token
        elif "query" in location:
            path += ("&" if "?" in path else "?") + f"{location['query']}={token}"
        else:
            headers["cookie"] = f"{location['cookie']}={token}"
    return request(method=spec["method"], host=spec["host"], path=path, headers=headers)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_case(case: dict, keys) -> None:
    from authz_server.jwt import JwksSettings

    authn, _, _ = build(_rules(case, keys), JwksSettings())
    result = asyncio.run(authn.authenticate(_request(case, keys)))
    expect = case["expect"]
    assert result.outcome == expect["outcome"], (result.reason, result.body)
    if expect["outcome"] == "denied":
        assert (result.http_status, result.body) == (expect["http_status"], expect["body"])
        assert result.www_authenticate == expect["www_authenticate"]
        assert result.auth is None
    elif expect["outcome"] == "ok":
        assert result.auth is not None
        assert (result.auth.issuer, result.auth.subject) == (expect["issuer"], expect["subject"])
        for name, value in expect.get("claims", {}).items():
            assert result.auth.claims[name] == value
    else:
        assert result.auth is None
    if "headers_to_set" in expect:
        assert [list(h) for h in result.headers_to_set] == expect["headers_to_set"]
    for name in expect.get("headers_to_remove", []):
        assert name in result.headers_to_remove
