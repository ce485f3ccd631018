"""Token parsing and signature verification: hostile input, algorithms, the verified-token cache."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import pytest

from authz_server.jwt import KeySet, Status, TokenVerifier, VerifySettings, parse_jwks
from authz_server.jwt.verify import parse_jwt
from jwt_helpers import b64url, build, hs256_with_public_key, public_jwk, raw_token, request

ISS = "https://issuer-a.example"


def _claims(**extra) -> dict:
    now = int(time.time())
    return {"iss": ISS, "sub": "user-1", "iat": now, "exp": now + 3600, **extra}


@pytest.fixture
def authn(keys):
    authenticator, _, _ = build([{"issuer": ISS, "jwks": keys.jwks_text("key-1")}])
    return authenticator


def _run(authn, token: str, **kwargs):
    return asyncio.run(authn.authenticate(request(token, **kwargs)))


def _header(alg="RS256", kid="key-1") -> str:
    return b64url(json.dumps({"alg": alg, "kid": kid}).encode())


@pytest.mark.parametrize(
    "token, body",
    [
        ("a.b", Status.BAD_FORMAT),
        ("a.b.c.d", Status.BAD_FORMAT),
        ("!!!.e30.c2ln", Status.BAD_FORMAT),  # Envoy skips to the first "." and ".e30.c2ln" has 2 parts
        ("e30$.e30.c2ln", Status.HEADER_BAD_BASE64),  # the rest of the value is the token, "$" included
        (b64url(b"not json") + ".e30.c2ln", Status.HEADER_BAD_JSON),
        (b64url(b"[1,2]") + ".e30.c2ln", Status.HEADER_BAD_JSON),
        ("A.e30.c2ln", Status.HEADER_BAD_BASE64),  # one base64 character cannot encode a byte
        (b64url(b'{"kid":"key-1"}') + ".e30.c2ln", Status.HEADER_BAD_ALG),
        (b64url(b'{"alg":5}') + ".e30.c2ln", Status.HEADER_BAD_ALG),
        (_header("none") + ".e30.c2ln", Status.ALG_NOT_IMPLEMENTED),
        (_header("HS1") + ".e30.c2ln", Status.ALG_NOT_IMPLEMENTED),
        (b64url(b'{"alg":"RS256","kid":7}') + ".e30.c2ln", Status.HEADER_BAD_KID),
        (_header() + ".A.c2ln", Status.PAYLOAD_BAD_BASE64),
        (_header() + "." + b64url(b"nope") + ".c2ln", Status.PAYLOAD_BAD_JSON),
        (_header() + "." + b64url(b'"str"') + ".c2ln", Status.PAYLOAD_BAD_JSON),
        (_header() + "." + b64url(b'{"iss":1}') + ".c2ln", "Jwt payload [iss] field is not a string"),
        (_header() + "." + b64url(b'{"sub":[]}') + ".c2ln", "Jwt payload [sub] field is not a string"),
        (_header() + "." + b64url(b'{"exp":"123"}') + ".c2ln", "Jwt payload [exp] field is not an integer"),
        (_header() + "." + b64url(b'{"exp":true}') + ".c2ln", "Jwt payload [exp] field is not an integer"),
        (_header() + "." + b64url(b'{"nbf":-5}') + ".c2ln", "Jwt payload [nbf] field is not a positive 64 bit integer"),
        (_header() + "." + b64url(b'{"iat":1e30}') + ".c2ln", "Jwt payload [iat] field is not a positive 64 bit integer"),
        (_header() + "." + b64url(b'{"aud":5}') + ".c2ln", "Jwt payload [aud] field is not a string or string list"),
        (_header() + "." + b64url(b'{"aud":["a",1]}') + ".c2ln", "Jwt payload [aud] field is not a string or string list"),
        (_header() + "." + b64url(b'{"jti":{}}') + ".c2ln", "Jwt payload [jti] field is not a string"),
        (_header() + "." + b64url(b'{"iss":"' + ISS.encode() + b'"}') + ".A", Status.SIGNATURE_BAD_BASE64),
    ],
)
def test_malformed_tokens_are_clean_401(authn, token: str, body: str) -> None:
    result = _run(authn, token)
    assert (result.outcome, result.http_status, result.body) == ("denied", 401, body)
    assert result.www_authenticate == 'Bearer realm="http://httpbin.foo:8000/headers", error="invalid_token"'


def test_bad_base64_header_in_custom_header_location(keys) -> None:
    # Without a prefix the whole header value is the token, so non-base64url characters reach the parser.
    authenticator, _, _ = build([{"issuer": ISS, "jwks": keys.jwks_text("key-1"), "fromHeaders": [{"name": "x-token"}]}])
    result = asyncio.run(authenticator.authenticate(request(headers={"x-token": "e3$0.e30.c2ln"})))
    assert result.body == Status.HEADER_BAD_BASE64


def test_deeply_nested_claims(authn, keys) -> None:
    nested: object = "x"
    for _ in range(150):
        nested = {"a": nested}
    result = _run(authn, keys.mint(_claims(deep=nested)))
    assert (result.http_status, result.body) == (401, Status.PAYLOAD_BAD_JSON)
    shallow = _run(authn, keys.mint(_claims(deep=[[[[["ok"]]]]])))
    assert shallow.outcome == "ok"


def test_pathological_json_never_raises(authn) -> None:
    for payload in (b"[" * 3000, b'{"a":' * 3000, b"\xff\xfe", b"1" * 5000):
        result = _run(authn, _header() + "." + b64url(payload) + ".c2ln")
        assert result.outcome == "denied" and result.http_status == 401


def test_oversize_token_refused_before_parsing(keys) -> None:
    authenticator, _, _ = build(
        [{"issuer": ISS, "jwks": keys.jwks_text("key-1")}], verify_settings=VerifySettings(max_token_bytes=1024)
    )
    token = keys.mint(_claims(blob="x" * 2000))
    result = asyncio.run(authenticator.authenticate(request(token)))
    assert (result.outcome, result.http_status, result.reason) == ("denied", 401, "malformed")


def test_alg_none_and_hs256_confusion(authn, keys) -> None:
    unsigned = raw_token({"alg": "none", "typ": "JWT"}, _claims())
    assert _run(authn, unsigned).body == Status.BAD_FORMAT  # empty signature segment
    assert _run(authn, unsigned + "c2ln").body == Status.ALG_NOT_IMPLEMENTED
    assert _run(authn, hs256_with_public_key(keys, _claims())).body == Status.KID_ALG_MISMATCH
    # A JWK without alg still cannot act as an HMAC secret.
    jwk = public_jwk(keys.rsa["key-1"], "key-1", None)
    no_alg, _, _ = build([{"issuer": ISS, "jwks": json.dumps({"keys": [jwk]})}])
    assert _run(no_alg, hs256_with_public_key(keys, _claims())).body == Status.VERIFICATION_FAIL


def test_kid_with_path_characters(authn, keys) -> None:
    token = keys.mint(_claims(), kid="../../etc/passwd")
    result = _run(authn, token)
    assert (result.http_status, result.body, result.reason) == (401, Status.KID_ALG_MISMATCH, "unknown_kid")


def test_wrong_signature_and_unknown_key(authn, keys) -> None:
    forged = keys.mint(_claims(), kid="key-1", sign_with="key-x")
    assert _run(authn, forged).body == Status.VERIFICATION_FAIL
    no_kid = keys.mint(_claims(), kid=None, sign_with="key-x")
    assert _run(authn, no_kid).body == Status.VERIFICATION_FAIL
    assert _run(authn, keys.mint(_claims(), kid=None)).outcome == "ok"


def test_time_and_audience_checks(keys) -> None:
    now = int(time.time())
    authenticator, _, _ = build(
        [{"issuer": ISS, "jwks": keys.jwks_text("key-1"), "audiences": ["https://api.example.com/"]}]
    )

    def body(**claims) -> str:
        return asyncio.run(authenticator.authenticate(request(keys.mint(_claims(**claims))))).body

    assert body(aud="api.example.com", nbf=now + 120) == Status.NOT_YET_VALID
    assert body(aud="api.example.com", nbf=now + 30) == ""
    assert body(aud="api.example.com", exp=now - 61) == Status.EXPIRED
    assert body(aud=["x", "http://api.example.com"]) == ""
    assert body(aud="api.example.com//") == Status.AUDIENCE_NOT_ALLOWED
    # Envoy checks the clock before the audience.
    assert body(aud="other", exp=now - 3600) == Status.EXPIRED


@pytest.mark.parametrize("alg", ["RS384", "RS512", "PS256", "PS512"])
def test_rsa_algorithms(keys, alg: str) -> None:
    jwk = public_jwk(keys.rsa["key-1"], "key-1", None)
    authenticator, _, _ = build([{"issuer": ISS, "jwks": json.dumps({"keys": [jwk]})}])
    assert _run(authenticator, keys.mint(_claims(), alg=alg)).outcome == "ok"


def test_ec_eddsa_and_hmac(keys) -> None:
    secret = b"s" * 32
    jwks = {
        "keys": [
            public_jwk(keys.ec256, "ec", "ES256"),
            public_jwk(keys.ed, "ed", None),
            {"kty": "oct", "kid": "hs", "alg": "HS256", "k": b64url(secret)},
        ]
    }
    authenticator, _, _ = build([{"issuer": ISS, "jwks": json.dumps(jwks)}])
    assert _run(authenticator, keys.mint(_claims(), kid="ec", sign_with="ec256", alg="ES256")).outcome == "ok"
    assert _run(authenticator, keys.mint(_claims(), kid="ed", sign_with="ed", alg="EdDSA")).outcome == "ok"
    import jwt as pyjwt

    hs = pyjwt.encode(_claims(), secret, algorithm="HS256", headers={"kid": "hs"})
    assert _run(authenticator, hs).outcome == "ok"
    # ES384 against a P-256 key: alg mismatch with the JWK's alg; without a JWK alg the curve decides.
    es384 = raw_token({"alg": "ES384", "kid": "ec"}, _claims(), b"x" * 96)
    assert _run(authenticator, es384).body == Status.KID_ALG_MISMATCH
    no_alg, _, _ = build([{"issuer": ISS, "jwks": json.dumps({"keys": [public_jwk(keys.ec256, "ec", None)]})}])
    assert _run(no_alg, es384).body == Status.VERIFICATION_FAIL
    # Ed25519 key, RS256 token without kid: only the RSA-capable keys could verify; none does.
    assert _run(authenticator, keys.mint(_claims(), kid=None)).body == Status.VERIFICATION_FAIL


def test_verified_token_cache_still_enforces_exp(keys) -> None:
    clock = [time.time()]
    verifier = TokenVerifier(VerifySettings(), clock=lambda: clock[0])
    from authz_server.jwt import JwksCache, JwtAuthenticator, parse_jwt_rules
    from authz_server.policy.issues import IssueCollector

    rules = parse_jwt_rules([{"issuer": ISS, "jwks": keys.jwks_text("key-1")}], IssueCollector())
    authenticator = JwtAuthenticator(rules, JwksCache(), verifier)
    token = keys.mint(_claims(exp=int(clock[0]) + 100))
    assert _run(authenticator, token).outcome == "ok"
    assert _run(authenticator, token).outcome == "ok"
    assert (verifier.misses, verifier.hits) == (1, 1)
    clock[0] += 100 + 61
    result = _run(authenticator, token)
    assert (result.http_status, result.body) == (401, Status.EXPIRED)


def test_cache_entry_invalid_once_key_is_gone(keys) -> None:
    verifier = TokenVerifier()
    token = keys.mint(_claims())

    def verify(document: dict):
        parsed, digest, verified_by = verifier.load(token)
        assert not isinstance(parsed, str)
        return verifier.verify(parsed, digest, parse_jwks(document), verified_by)

    assert verify(keys.jwks("key-1")) is None
    assert verify(keys.jwks("key-1")) is None
    assert (verifier.misses, verifier.hits) == (1, 1)
    # Same kid, different key material: the cached verdict does not carry over.
    rotated = {"keys": [public_jwk(keys.rsa["key-2"], "key-1", "RS256")]}
    assert verify(rotated) == Status.VERIFICATION_FAIL
    assert verify(keys.jwks("key-2")) == Status.KID_ALG_MISMATCH


def test_parse_once(keys) -> None:
    token = keys.mint(_claims(scope="a b"))
    parsed = parse_jwt(token)
    assert not isinstance(parsed, str)
    assert parsed.payload_b64 == token.split(".")[1]
    assert json.loads(base64.urlsafe_b64decode(parsed.payload_b64 + "==")) == parsed.payload
    assert parsed.signing_input == token.rpartition(".")[0].encode()


def test_keyset_fingerprints_differ_per_key(keys) -> None:
    one: KeySet = parse_jwks(keys.jwks("key-1", "key-2"))
    assert len(one.fingerprints) == 2
