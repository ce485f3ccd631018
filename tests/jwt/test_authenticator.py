"""Extraction, Istio's multi-provider requirement, and what reaches the upstream."""

from __future__ import annotations

import asyncio
import base64
import time
from urllib.parse import quote

from authz_server.jwt import Status
from jwt_helpers import build, request

A, B = "https://issuer-a.example", "https://issuer-b.example"


def _claims(iss: str = A, **extra) -> dict:
    return {"iss": iss, "sub": "user-1", "exp": int(time.time()) + 3600, **extra}


def _two_issuers(keys, **rule_a) -> object:
    authn, _, _ = build(
        [
            {"issuer": B, "jwks": keys.jwks_text("key-2")},
            {"issuer": A, "jwks": keys.jwks_text("key-1"), **rule_a},
        ]
    )
    return authn


def _run(authn, req):
    return asyncio.run(authn.authenticate(req))


def test_two_providers(keys) -> None:
    authn = _two_issuers(keys)
    assert _run(authn, request(keys.mint(_claims(B), kid="key-2", sign_with="key-2"))).auth.issuer == B
    # A's issuer with B's key: A fails on the signature; that beats "issuer not configured".
    bad = _run(authn, request(keys.mint(_claims(A), kid="key-2", sign_with="key-2")))
    assert bad.body == Status.KID_ALG_MISMATCH
    unknown = _run(authn, request(keys.mint(_claims("https://evil"))))
    assert unknown.body == Status.UNKNOWN_ISSUER


def test_issuer_must_own_the_location(keys) -> None:
    authn = _two_issuers(keys, fromHeaders=[{"name": "x-a-token"}])
    # A's valid token in the default location (only B uses it): issuer not configured there.
    result = _run(authn, request(keys.mint(_claims(A))))
    assert result.body == Status.UNKNOWN_ISSUER
    ok = _run(authn, request(headers={"x-a-token": keys.mint(_claims(A))}))
    assert ok.outcome == "ok" and ok.headers_to_remove == ("x-a-token",)


def test_query_param_cookie_and_prefix_anywhere(keys) -> None:
    authn, _, _ = build([{"issuer": A, "jwks": keys.jwks_text("key-1")}])
    token = keys.mint(_claims())
    via_query = _run(authn, request(path=f"/p?x=1&access_token={quote(token)}&access_token=junk"))
    assert via_query.outcome == "ok" and via_query.headers_to_remove == ()
    in_middle = _run(authn, request(headers={"authorization": f"Basic abc, Bearer {token}"}))
    assert in_middle.outcome == "ok"
    assert _run(authn, request(headers={"authorization": f"bearer {token}"})).outcome == "none"
    assert _run(authn, request(headers={"authorization": "Bearer "})).body == Status.BAD_FORMAT
    cookie_authn, _, _ = build([{"issuer": A, "jwks": keys.jwks_text("key-1"), "fromCookies": ["s"]}])
    assert _run(cookie_authn, request(headers={"cookie": f'a=1; s="{token}"; s=junk'})).outcome == "ok"
    assert _run(cookie_authn, request(token)).outcome == "none"  # Authorization not configured


def test_every_token_of_a_provider_must_verify(keys) -> None:
    authn, _, _ = build([{"issuer": A, "jwks": keys.jwks_text("key-1")}])
    token = keys.mint(_claims())
    assert _run(authn, request(token, path=f"/p?access_token={token}")).outcome == "ok"  # duplicate token
    mixed = _run(authn, request(token, path="/p?access_token=garbage"))
    assert (mixed.http_status, mixed.body) == (401, Status.BAD_FORMAT)


def test_output_headers_and_forwarding(keys) -> None:
    authn, _, _ = build(
        [
            {
                "issuer": A,
                "jwks": keys.jwks_text("key-1"),
                "outputPayloadToHeader": "x-payload",
                "forwardOriginalToken": True,
                "outputClaimToHeaders": [
                    {"header": "x-level", "claim": "level"},
                    {"header": "x-admin", "claim": "admin"},
                    {"header": "x-team", "claim": "org.team"},
                    {"header": "x-list", "claim": "groups"},
                    {"header": "x-missing", "claim": "nope"},
                    {"header": "x-ratio", "claim": "ratio"},
                ],
            }
        ]
    )
    token = keys.mint(_claims(level=42, admin=False, org={"team": "core"}, groups=["a"], ratio=0.5))
    result = _run(authn, request(token, headers={"x-level": "spoofed"}))
    assert dict(result.headers_to_set) == {
        "x-payload": token.split(".")[1],
        "x-level": "42",
        "x-admin": "false",
        "x-team": "core",
        "x-list": "WyJhIl0=",  # base64 of ["a"], as Envoy 1.40 writes a list claim
        "x-ratio": "0.500000",  # std::to_string(0.5)
    }
    assert "authorization" not in result.headers_to_remove  # forwardOriginalToken
    # Client copies of unset output headers are removed; set ones are overwritten, never removed
    # (Envoy applies removals after sets, so removing them would drop the claim values).
    assert set(result.headers_to_remove) == {"x-missing"}
    spoof = _run(authn, request(headers={"x-payload": "forged"}))
    assert spoof.outcome == "none" and "x-payload" in spoof.headers_to_remove


def test_claim_normalisation(keys) -> None:
    authn, _, _ = build([{"issuer": A, "jwks": keys.jwks_text("key-1"), "spaceDelimitedClaims": ["roles"]}])
    result = _run(authn, request(keys.mint(_claims(scope="a  b", permission="p", roles="r1 r2", other="x y"))))
    claims = result.auth.claims
    assert (claims["scope"], claims["permission"], claims["roles"], claims["other"]) == (["a", "b"], ["p"], ["r1", "r2"], "x y")
    no_sub = _run(authn, request(keys.mint({"iss": A})))
    assert no_sub.outcome == "ok" and no_sub.auth.subject is None


def test_cors_preflight_and_realm(keys) -> None:
    authn, _, _ = build([{"issuer": A, "jwks": keys.jwks_text("key-1")}])
    preflight = request("garbage", method="OPTIONS", headers={"origin": "https://x", "access-control-request-method": "GET"})
    assert _run(authn, preflight).outcome == "none"
    plain_options = _run(authn, request("garbage", method="OPTIONS", headers={"origin": "https://x"}))
    assert plain_options.http_status == 401
    https = _run(authn, request("garbage", path="/a/b?q=1", headers={"x-forwarded-proto": "https"}))
    assert https.www_authenticate == 'Bearer realm="https://httpbin.foo:8000/a/b", error="invalid_token"'


def test_no_rules_and_hostile_headers_never_raise(keys) -> None:
    empty, _, _ = build([])
    assert _run(empty, request("anything")).outcome == "none"
    authn, _, _ = build([{"issuer": A, "jwks": keys.jwks_text("key-1")}])
    for value in ("Bearer \udcff.a.b", "Bearer " + "." * 10000, "Bearer " + "\x00" * 5, "Bearer é.é.é"):
        result = _run(authn, request(headers={"authorization": value}))
        assert result.outcome == "denied" and result.http_status == 401


def test_result_carries_no_token(keys) -> None:
    authn, _, _ = build([{"issuer": A, "jwks": keys.jwks_text("key-1")}])
    token = keys.mint(_claims())
    result = _run(authn, request(token))
    assert token not in repr(result)
    assert len(result.token_id) == 12


def test_cached_result_is_per_location_kind_and_prefix(keys) -> None:
    """Regression: the verified-token cache was keyed by (location name, token), so a token
    accepted once in B's query parameter ``x-token`` was then accepted in A's header ``x-token``."""
    authn, _, _ = build(
        [
            {"issuer": A, "jwks": keys.jwks_text("key-1"), "fromHeaders": [{"name": "x-token"}]},
            {"issuer": B, "jwks": keys.jwks_text("key-2"), "fromParams": ["x-token"]},
        ]
    )
    b_token = keys.mint(_claims(B), kid="key-2", sign_with="key-2")
    in_header = request(headers={"x-token": b_token})
    assert _run(authn, in_header).body == Status.UNKNOWN_ISSUER
    in_param = _run(authn, request(path=f"/p?x-token={b_token}"))
    assert in_param.outcome == "ok"
    assert _run(authn, in_header).body == Status.UNKNOWN_ISSUER  # still refused after the cache filled


def test_cached_result_is_per_header_prefix(keys) -> None:
    authn, _, _ = build(
        [
            {"issuer": A, "jwks": keys.jwks_text("key-1"), "fromHeaders": [{"name": "x-t", "prefix": "A "}]},
            {"issuer": B, "jwks": keys.jwks_text("key-2"), "fromHeaders": [{"name": "x-t", "prefix": "B "}]},
        ]
    )
    b_token = keys.mint(_claims(B), kid="key-2", sign_with="key-2")
    assert _run(authn, request(headers={"x-t": f"B {b_token}"})).outcome == "ok"
    assert _run(authn, request(headers={"x-t": f"A {b_token}"})).body == Status.UNKNOWN_ISSUER


def test_header_token_runs_to_the_end_of_the_value(keys) -> None:
    """Envoy 1.40 takes everything after the prefix (from the first base64url/dot character):
    trailing junk is part of the token and fails it."""
    authn, _, _ = build([{"issuer": A, "jwks": keys.jwks_text("key-1")}])
    token = keys.mint(_claims())
    assert _run(authn, request(headers={"authorization": f"Bearer {token} junk"})).body == Status.VERIFICATION_FAIL
    assert _run(authn, request(headers={"authorization": f"Bearer {token},junk"})).body == Status.SIGNATURE_BAD_BASE64
    # Two Authorization lines reach the server joined, as Envoy's header map holds them.
    joined = request(headers={"authorization": f"Bearer {token},Bearer bad"})
    assert _run(authn, joined).body == Status.SIGNATURE_BAD_BASE64
    assert _run(authn, request(headers={"authorization": f"Bearer !!{token}"})).outcome == "ok"


def test_base64_skips_whitespace_like_envoy(keys) -> None:
    authn, _, _ = build([{"issuer": A, "jwks": keys.jwks_text("key-1")}])
    header, payload, signature = keys.mint(_claims()).split(".")
    assert _run(authn, request(path=f"/p?access_token={header}.{payload}.{signature}%20")).outcome == "ok"
    spaced = f"{header}.{payload}.{signature[:8]}%09{signature[8:]}"
    assert _run(authn, request(path=f"/p?access_token={spaced}")).outcome == "ok"
    padded = signature + "=" * (-len(signature) % 4)
    assert _run(authn, request(path=f"/p?access_token={header}.{payload}.{padded}")).outcome == "ok"
    wrong_pad = "==" if len(header) % 4 == 3 else "="
    over = _run(authn, request(path=f"/p?access_token={header}{wrong_pad}.{payload}.{signature}"))
    assert over.body == Status.HEADER_BAD_BASE64  # padding that completes nothing
    spaced_header = f"{header[:8]}%20{header[8:]}.{payload}.{signature}"
    assert _run(authn, request(path=f"/p?access_token={spaced_header}")).body == Status.VERIFICATION_FAIL


def test_repeated_token_headers_each_carry_a_token(keys) -> None:
    """With Envoy's per-value header_map, every value of a token header is a token (all must
    verify) and every Cookie line is searched."""
    authn, _, _ = build(
        [{"issuer": A, "jwks": keys.jwks_text("key-1"), "fromHeaders": [{"name": "x-token"}], "fromCookies": ["s"]}]
    )
    token = keys.mint(_claims())

    def raw(**values: tuple[str, ...]):
        req = request(headers={k.replace("_", "-"): ",".join(v) for k, v in values.items()})
        req.header_values = {k.replace("_", "-"): v for k, v in values.items()}
        return req

    assert _run(authn, raw(x_token=(token, token))).outcome == "ok"
    assert _run(authn, raw(x_token=(token, "bad"))).body == Status.BAD_FORMAT
    assert _run(authn, raw(cookie=("a=1", f"s={token}"))).outcome == "ok"
    # Without the header_map the joined value is one token, as for Envoy's inline Authorization.
    assert _run(authn, request(headers={"x-token": f"{token},{token}"})).outcome == "denied"


def test_list_object_and_number_claims_as_envoy_writes_them(keys) -> None:
    authn, _, _ = build(
        [
            {
                "issuer": A,
                "jwks": keys.jwks_text("key-1"),
                "outputClaimToHeaders": [
                    {"header": "x-groups", "claim": "groups"},
                    {"header": "x-org", "claim": "org"},
                    {"header": "x-big", "claim": "big"},
                    {"header": "x-neg", "claim": "neg"},
                    {"header": "x-empty", "claim": "empty"},
                    {"header": "x-null", "claim": "nothing"},
                ],
            }
        ]
    )
    token = keys.mint(
        _claims(groups=["dev", "admin"], org={"k": "é", "n": [3.0, 1e20, 0.1, "<>"]}, big=1e20, neg=-5,
                empty="", nothing=None)
    )
    headers = dict(_run(authn, request(token)).headers_to_set)
    assert headers["x-groups"] == "WyJkZXYiLCJhZG1pbiJd"
    assert base64.b64decode(headers["x-org"]).decode() == '{"k":"é","n":[3,1e+20,0.1,"\\u003c\\u003e"]}'
    assert (headers["x-big"], headers["x-neg"]) == ("100000000000000000000.000000", "-5.000000")
    assert "x-empty" not in headers and "x-null" not in headers


def test_query_token_is_removed_unless_forwarded(keys) -> None:
    rules = [{"issuer": A, "jwks": keys.jwks_text("key-1"), "fromParams": ["jwt", "access_token"]}]
    authn, _, _ = build(rules)
    token = keys.mint(_claims())
    assert _run(authn, request(path=f"/p?jwt={token}&access_token={token}")).query_params_to_remove == (
        "access_token", "jwt")
    forwarded, _, _ = build([{**rules[0], "forwardOriginalToken": True}])
    assert _run(forwarded, request(path=f"/p?jwt={token}")).query_params_to_remove == ()
