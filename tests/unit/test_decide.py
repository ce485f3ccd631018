"""Decisions over small policy sets: evaluation order, dry-run, audit, identity, fail-closed."""

from __future__ import annotations

import asyncio
import textwrap

import pytest

from authz_server.authorizer import Authorizer, Verdict, VerdictSettings
from authz_server.engine.engine import MeshSettings, PolicyEngine
from authz_server.engine.request import RequestAttributes, RequestAuth, Workload, parse_ip
from authz_server.grpc_api.check_response import dynamic_metadata
from authz_server.policy.loader import PolicySet, parse_documents

HTTPBIN = Workload("foo", {"app": "httpbin"}, "sidecar")


def engine(yaml_text: str, mesh: MeshSettings | None = None) -> PolicyEngine:
    aps: list = []
    ras: list = []
    issues: list = []
    parse_documents(textwrap.dedent(yaml_text), "test.yaml", aps, ras, issues)
    policy_set = PolicySet("test.yaml", tuple(aps), tuple(ras), tuple(issues))
    assert policy_set.ok, [str(i) for i in policy_set.errors]
    return PolicyEngine(policy_set, mesh or MeshSettings())


def ap(name: str, spec: str, namespace: str = "foo", annotations: str = "") -> str:
    return (f"---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            f"metadata: {{name: {name}, namespace: {namespace}{annotations}}}\nspec:\n"
            + textwrap.indent(textwrap.dedent(spec), "  ") + "\n")


def decide(policies: PolicyEngine, settings: VerdictSettings | None = None, **attrs) -> Verdict:
    attrs.setdefault("workload", HTTPBIN)
    attrs.setdefault("method", "GET")
    attrs.setdefault("path", "/")
    return asyncio.run(Authorizer(lambda: policies, settings).check(RequestAttributes(**attrs)))


def test_no_policies_allows() -> None:
    verdict = decide(engine(""))
    assert verdict.allowed and verdict.reason == "no_allow_policies"


def test_deny_wins_over_allow_and_names_the_policy() -> None:
    e = engine(ap("allow-all", "rules: [{}]") + ap("deny-post", "action: DENY\nrules: [{to: [{operation: {methods: [POST]}}]}]"))
    verdict = decide(e, method="POST")
    assert not verdict.allowed and verdict.policy == "foo/deny-post" and verdict.rule == 0
    assert ("x-ext-authz-policy", "foo/deny-post") in verdict.deny_headers
    assert decide(e).allowed


def test_policy_header_can_be_disabled() -> None:
    e = engine(ap("deny", "action: DENY\nrules: [{}]"))
    assert decide(e, VerdictSettings(policy_header="")).deny_headers == ()


def test_ok_headers_are_added_on_allow() -> None:
    verdict = decide(engine(""), VerdictSettings(ok_headers=(("x-authz", "ok"),)))
    assert verdict.upstream_headers == (("x-authz", "ok"),)


def test_custom_policies_are_ignored() -> None:
    e = engine(ap("ext", "action: CUSTOM\nprovider: {name: ext-authz}\nrules: [{}]"))
    assert decide(e).allowed


def test_dry_run_results_in_istio_metadata_terms() -> None:
    dry = ",\n  annotations: {istio.io/dry-run: 'true'}"
    e = engine(ap("dry-deny", "action: DENY\nrules: [{to: [{operation: {paths: [/admin]}}]}]", annotations=dry)
               + ap("dry-allow", "rules: [{to: [{operation: {paths: [/public]}}]}]", annotations=dry))
    verdict = decide(e, path="/admin")
    assert verdict.allowed  # neither dry-run policy is enforced
    metadata = dynamic_metadata(verdict)
    assert metadata["istio_dry_run_deny_shadow_engine_result"] == "denied"
    assert metadata["istio_dry_run_deny_shadow_effective_policy_id"] == "ns[foo]-policy[dry-deny]-rule[0]"
    assert metadata["istio_dry_run_allow_shadow_engine_result"] == "denied"
    assert "istio_dry_run_allow_shadow_effective_policy_id" not in metadata


def test_audit_marks_but_never_decides() -> None:
    e = engine(ap("audit", "action: AUDIT\nrules: [{}]"))
    verdict = decide(e)
    assert verdict.allowed and verdict.audited == ("ns[foo]-policy[audit]-rule[0]",)


def test_short_service_account_uses_the_policy_namespace() -> None:
    e = engine(ap("sa", "rules: [{from: [{source: {serviceAccounts: [sleep]}}]}]"))
    assert decide(e, source_principal="spiffe://cluster.local/ns/foo/sa/sleep").allowed
    assert not decide(e, source_principal="spiffe://cluster.local/ns/bar/sa/sleep").allowed


def test_trust_domain_aliases_from_mesh_settings() -> None:
    e = engine(ap("p", "rules: [{from: [{source: {principals: [cluster.local/ns/foo/sa/sleep]}}]}]"),
               MeshSettings(trust_domain="corp.example", trust_domain_aliases=("legacy.example",)))
    assert decide(e, source_principal="spiffe://legacy.example/ns/foo/sa/sleep").allowed
    assert not decide(e, source_principal="spiffe://cluster.local/ns/foo/sa/sleep").allowed


def test_absent_attributes_fail_positive_and_pass_negative_matchers() -> None:
    e = engine(ap("p", "rules: [{from: [{source: {notPrincipals: ['*']}}]}]"))
    assert decide(e).allowed  # plaintext: notPrincipals ['*'] holds
    assert not decide(e, source_principal="spiffe://cluster.local/ns/foo/sa/x").allowed
    e = engine(ap("p", "rules: [{when: [{key: connection.sni, values: ['*']}]}]"))
    assert not decide(e).allowed  # Istio sends no SNI


def test_repeated_headers_are_matched_value_by_value_when_envoy_sends_them_so() -> None:
    e = engine(ap("p", "rules: [{when: [{key: 'request.headers[x-role]', values: [user]}]}]"))
    assert decide(e, headers={"x-role": "admin,user"}, header_values={"x-role": ("admin", "user")}).allowed
    assert not decide(e, headers={"x-role": "admin,user"}).allowed  # joined value only


def test_claims_of_the_wrong_type_never_match() -> None:
    e = engine(ap("p", "rules: [{when: [{key: 'request.auth.claims[level]', values: ['42']}]}]")
               + ap("q", "action: DENY\nrules: [{when: [{key: 'request.auth.claims[org][team]', notValues: [core]}]}]"))
    auth = RequestAuth("https://a", "u", {"level": 42, "org": {"team": "core"}})
    assert not decide(e, auth=auth).allowed
    auth = RequestAuth("https://a", "u", {"level": "42", "org": {"team": "core"}})
    assert decide(e, auth=auth).allowed


def test_experimental_filter_metadata_is_never_present() -> None:
    e = engine(ap("p", "rules: [{when: [{key: 'experimental.envoy.filters.network.mysql_proxy[db.table]', values: ['[update]']}]}]"))
    assert not decide(e).allowed


def test_ip_conditions() -> None:
    e = engine(ap("p", "rules: [{when: [{key: destination.port, values: ['80']}, {key: remote.ip, notValues: [203.0.113.0/24]}]}]"))
    assert decide(e, destination_port=80, remote_ip=parse_ip("198.51.100.1")).allowed
    assert not decide(e, destination_port=80, remote_ip=parse_ip("203.0.113.9")).allowed
    assert not decide(e, destination_port=8080).allowed


ADMIN_DENY = ap("admin-api-deny-admin", """\
    selector: {matchLabels: {app: admin-api}}
    action: DENY
    rules: [{to: [{operation: {paths: ["/admin/*"]}}]}]""")
MESH_DENY = ap("mesh-deny-debug", "action: DENY\nrules: [{to: [{operation: {paths: ['/debug']}}]}]",
               namespace="istio-system")


@pytest.mark.parametrize("fail_open", [False, True])
def test_a_selector_policy_is_never_skipped_for_unknown_labels(fail_open: bool) -> None:
    """The issue's bypass: a DENY for app=admin-api must not let /admin/users through merely because
    the Check carried no labels; the request is denied with a reason that says what is missing."""
    e = engine(ADMIN_DENY)
    verdict = decide(e, VerdictSettings(fail_open=fail_open), path="/admin/users", workload=Workload("foo", None))
    assert verdict.allowed is fail_open and verdict.reason == "unknown_workload_labels"
    assert "foo/admin-api-deny-admin" in verdict.detail and "labels unknown" in verdict.detail
    if not fail_open:
        assert ("x-ext-authz-policy", "unknown_workload_labels") in verdict.deny_headers
        assert verdict.http_status == 403
    # with the labels known, each workload gets its own policies
    assert not decide(e, path="/admin/users", workload=Workload("foo", {"app": "admin-api"})).allowed
    assert decide(e, path="/admin/users", workload=Workload("foo", {"app": "httpbin"})).allowed


def test_unknown_identity_denies_only_where_a_policy_depends_on_it() -> None:
    # Mesh-wide and namespace-wide policies need no labels: decided normally.
    e = engine(MESH_DENY + ap("ns-wide", "rules: [{to: [{operation: {methods: [GET]}}]}]"))
    assert decide(e, workload=Workload("foo", None)).reason == "allowed_by_policy"
    assert decide(e, path="/debug", workload=Workload("foo", None)).policy == "istio-system/mesh-deny-debug"
    # Without a namespace, a namespaced policy might apply: unknown; with root policies only, not.
    verdict = decide(e, workload=Workload(None, {"app": "httpbin"}))
    assert verdict.reason == "unknown_workload_namespace" and "foo/ns-wide" in verdict.detail
    assert decide(engine(MESH_DENY), path="/debug", workload=Workload(None, None)).policy == \
        "istio-system/mesh-deny-debug"
    # An empty selector selects everything: it depends on nothing.
    empty = engine(ap("all", "selector: {matchLabels: {}}\naction: DENY\nrules: [{to: [{operation: {paths: [/x]}}]}]"))
    assert decide(empty, path="/x", workload=Workload("foo", None)).policy == "foo/all"


def test_dry_run_policies_never_deny_for_an_unknown_identity() -> None:
    dry = ap("dry", "selector: {matchLabels: {app: x}}\naction: DENY\nrules: [{}]",
             annotations=", annotations: {istio.io/dry-run: 'true'}")
    assert decide(engine(dry), workload=Workload("foo", None)).allowed


def test_a_request_authentication_is_never_skipped_for_unknown_labels() -> None:
    ra = ("---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\n"
          "metadata: {name: jwt, namespace: foo}\nspec:\n  selector: {matchLabels: {app: httpbin}}\n"
          "  jwtRules: [{issuer: 'https://issuer.example', jwksUri: 'https://issuer.example/jwks'}]\n")
    verdict = decide(engine(ra), workload=Workload("foo", None))
    assert verdict.reason == "unknown_workload_labels" and "foo/jwt" in verdict.detail


def test_no_policy_set_loaded_fails_closed() -> None:
    def missing() -> PolicyEngine:
        raise LookupError("no valid policy set loaded from x")
    verdict = asyncio.run(Authorizer(missing).check(RequestAttributes(method="GET", path="/", workload=HTTPBIN)))
    assert not verdict.allowed and verdict.reason == "no_policy_set" and verdict.http_status == 403
