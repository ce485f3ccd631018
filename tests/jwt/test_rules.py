"""``jwtRules`` validation as Istio's admission webhook does it (SPEC section 10)."""

from __future__ import annotations

import json

import pytest

from authz_server.jwt import parse_jwt_rules
from authz_server.jwt.rules import parse_duration
from authz_server.policy.issues import IssueCollector
from jwt_helpers import public_jwk


def _errors(raw) -> list[str]:
    report = IssueCollector()
    parse_jwt_rules(raw, report)
    return [f"{i.field}: {i.message}" for i in report.errors]


def test_full_rule(keys) -> None:
    report = IssueCollector()
    (rule,) = parse_jwt_rules(
        [
            {
                "issuer": "https://a",
                "audiences": ["x"],
                "jwks": keys.jwks_text("key-1"),
                "fromHeaders": [{"name": "X-Token", "prefix": "Bearer "}],
                "fromParams": ["tok"],
                "fromCookies": ["session"],
                "outputPayloadToHeader": "X-Payload",
                "forwardOriginalToken": True,
                "outputClaimToHeaders": [{"header": "X-Group", "claim": "realm.group"}],
                "timeout": "1.5s",
                "spaceDelimitedClaims": ["roles"],
            }
        ],
        report,
    )
    assert not report.issues
    assert rule.from_headers == (("x-token", "Bearer "),) and rule.timeout == 1.5
    assert rule.output_header_names == ("x-payload", "x-group")
    assert rule.jwks is not None and len(rule.jwks.keys) == 1


@pytest.mark.parametrize(
    "rule, field",
    [
        ({"audiences": ["a"]}, "jwtRules[0].issuer"),
        ({"issuer": "i", "audiences": [""]}, "jwtRules[0].audiences[0]"),
        ({"issuer": "i", "jwksUri": "ftp://x/jwks"}, "jwtRules[0].jwksUri"),
        ({"issuer": "i", "jwksUri": "https:///nohost"}, "jwtRules[0].jwksUri"),
        ({"issuer": "i", "jwks": "{not json"}, "jwtRules[0].jwks"),
        ({"issuer": "i", "jwks": '{"keys": []}'}, "jwtRules[0].jwks"),
        ({"issuer": "i", "jwks": '{"keys": [{"kty": "RSA"}]}', "jwksUri": "https://x"}, "jwtRules[0].jwks"),
        ({"issuer": "i", "fromHeaders": [{"name": ""}]}, "jwtRules[0].fromHeaders[0].name"),
        ({"issuer": "i", "fromHeaders": [{"name": "x", "bogus": 1}]}, "jwtRules[0].fromHeaders[0].bogus"),
        ({"issuer": "i", "fromParams": [""]}, "jwtRules[0].fromParams[0]"),
        ({"issuer": "i", "fromCookies": [""]}, "jwtRules[0].fromCookies[0]"),
        ({"issuer": "i", "outputClaimToHeaders": [{"header": "", "claim": "c"}]}, "jwtRules[0].outputClaimToHeaders[0]"),
        ({"issuer": "i", "outputClaimToHeaders": [{"header": "bad header", "claim": "c"}]}, "jwtRules[0].outputClaimToHeaders[0].header"),
        ({"issuer": "i", "timeout": "5"}, "jwtRules[0].timeout"),
        ({"issuer": "i", "timeout": "-1s"}, "jwtRules[0].timeout"),
        ({"issuer": "i", "forwardOriginalToken": "yes"}, "jwtRules[0].forwardOriginalToken"),
        ({"issuer": "i", "jwks_uri": "https://x"}, "jwtRules[0].jwks_uri"),
        ("not-an-object", "jwtRules[0]"),
    ],
)
def test_invalid_rules(rule, field: str) -> None:
    errors = _errors([rule])
    assert any(e.startswith(field + ":") for e in errors), errors


def test_every_problem_reported_and_invalid_rule_dropped() -> None:
    report = IssueCollector()
    rules = parse_jwt_rules([{"issuer": "ok"}, {"audiences": [""], "fromParams": [""]}], report)
    assert [r.issuer for r in rules] == ["ok"]
    assert len(report.errors) == 3


def test_private_key_in_inline_jwks_is_a_warning(keys) -> None:
    jwk = public_jwk(keys.rsa["key-1"], "key-1", "RS256")
    private = json.loads(__import__("jwt").algorithms.RSAAlgorithm.to_jwk(keys.rsa["key-1"]))
    report = IssueCollector()
    (rule,) = parse_jwt_rules([{"issuer": "i", "jwks": json.dumps({"keys": [{**private, "kid": "p"}, jwk]})}], report)
    assert not report.errors
    assert any("private key" in w.message for w in report.warnings)
    assert rule.jwks.keys[0].fingerprint != rule.jwks.keys[1].fingerprint


def test_unsupported_key_skipped_with_warning(keys) -> None:
    jwks = {"keys": [{"kty": "EC", "crv": "secp256k1", "x": "AA", "y": "AA"}, public_jwk(keys.rsa["key-1"], "k", None)]}
    report = IssueCollector()
    (rule,) = parse_jwt_rules([{"issuer": "i", "jwks": json.dumps(jwks)}], report)
    assert not report.errors and len(report.warnings) == 1 and len(rule.jwks.keys) == 1


def test_durations() -> None:
    assert parse_duration("5s") == 5.0
    assert parse_duration("100ms") == pytest.approx(0.1)
    assert parse_duration("1m") == 60.0
    assert parse_duration("five") is None and parse_duration(5) is None


def test_not_a_list() -> None:
    assert _errors({"issuer": "x"}) == ["jwtRules: must be a list"]
    assert parse_jwt_rules(None, IssueCollector()) == ()
