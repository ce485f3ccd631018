"""Conformance: every case of cases.yaml decided through the real adapter, JWT layer and engine.

Each case gives Istio policies, a request as Istio's Envoy would present it, and the result
Istio+Envoy produce. The server must produce the same decision, HTTP status and body (and
www-authenticate / dry-run metadata where the case states them).

Cases that are not this server's to decide are listed in NOT_APPLICABLE with the reason; they
are excluded from the parametrised run and the list itself is checked against the file.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz_server.authorizer import Authorizer
from authz_server.engine.engine import MeshSettings, PolicyEngine
from authz_server.grpc_api.check_request import to_attributes
from authz_server.grpc_api.check_response import dynamic_metadata
from authz_server.jwt.authenticator import JwtAuthenticator
from authz_server.jwt.jwks import JwksCache, JwksSettings
from authz_server.jwt.verify import TokenVerifier
from authz_server.policy.loader import PolicySet, parse_documents
from tests.conformance.harness import KeyRing, check_request, context_for, substitute_jwks

CASES_FILE = Path(__file__).with_name("cases.yaml")
DATA = yaml.safe_load(CASES_FILE.read_text())
META = DATA["meta"]
CASES = {case["id"]: case for case in DATA["cases"]}

#: A CUSTOM provider's own answer is the provider's business, not a policy outcome: when the
#: case's provider denies or errors, Envoy answers before anything we evaluate.
_PROVIDER_DECIDES = "the CUSTOM provider's own deny/error answers first; nothing here evaluates it"
NOT_APPLICABLE: dict[str, str] = {
    "custom-001-match-deny": _PROVIDER_DECIDES,
    "custom-005-deny-overrides-allow": _PROVIDER_DECIDES,
    "custom-006-error-fail-closed": _PROVIDER_DECIDES,
    "custom-007-error-fail-open": _PROVIDER_DECIDES,
    "custom-008-error-status-on-error": _PROVIDER_DECIDES,
    "custom-011-before-jwt-deny": _PROVIDER_DECIDES,
    "custom-013-deny-custom-status": _PROVIDER_DECIDES,
    "custom-009-unknown-provider-matching": "istiod turns CUSTOM rules naming an unknown provider into an "
    "enforced DENY in the proxy; the mesh config is not this server's input",
}


def _applicable() -> list[str]:
    return [case_id for case_id in CASES if case_id not in NOT_APPLICABLE]


@pytest.fixture(scope="module")
def keys() -> KeyRing:
    return KeyRing.generate(META)


def _policy_set(case: dict[str, Any], keys: KeyRing) -> PolicySet:
    policies = substitute_jwks(case["policies"], keys, "https://127.0.0.1:9/.well-known/jwks.json")
    aps: list = []
    ras: list = []
    issues: list = []
    parse_documents(yaml.safe_dump_all(policies), f"{case['id']}.yaml", aps, ras, issues)
    policy_set = PolicySet("cases.yaml", tuple(aps), tuple(ras), tuple(issues))
    assert policy_set.ok, [str(i) for i in policy_set.errors]
    return policy_set


def decide(case: dict[str, Any], keys: KeyRing):
    request = case["request"]
    context = context_for(request, META)
    jwks = JwksCache(JwksSettings(min_refresh_interval=3600))
    verifier = TokenVerifier()
    engine = PolicyEngine(
        _policy_set(case, keys),
        MeshSettings(META["environment"]["rootNamespace"], "cluster.local"),
        lambda rules: JwtAuthenticator(rules, jwks, verifier),
    )
    authorizer = Authorizer(lambda: engine)
    attrs = to_attributes(check_request(request, META, keys), context)
    return asyncio.run(authorizer.check(attrs))


@pytest.mark.parametrize("case_id", _applicable())
def test_case(case_id: str, keys: KeyRing) -> None:
    case = CASES[case_id]
    expect = case["expect"]
    verdict = decide(case, keys)
    got = "allow" if verdict.allowed else "deny"
    assert (got, verdict.http_status) == (expect["decision"], expect["status"]), (
        f"{case['why']}\n -> got {got} {verdict.http_status}: {verdict.reason}: {verdict.detail}"
    )
    if "body" in expect and not verdict.allowed:
        assert verdict.body == expect["body"]
    if "www_authenticate" in expect:
        assert dict(verdict.deny_headers).get("www-authenticate") == expect["www_authenticate"]
    if "dry_run" in expect:
        metadata = dynamic_metadata(verdict)
        for key, value in expect["dry_run"].items():
            assert metadata[key] == value, key


def test_not_applicable_cases_exist_and_say_why() -> None:
    for case_id, reason in NOT_APPLICABLE.items():
        assert case_id in CASES, case_id
        assert CASES[case_id]["category"] == "custom" and reason


def test_every_case_is_accounted_for() -> None:
    assert len(_applicable()) + len(NOT_APPLICABLE) == len(CASES) == 130
