"""Admission validation as Istio's webhook does it (SPEC 10), reported as file/document/field/what."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from authz_server.policy.loader import load_policies


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def policy(spec: str, *, kind: str = "AuthorizationPolicy", extra_meta: str = "") -> str:
    body = textwrap.indent(textwrap.dedent(spec).strip(), "  ")
    return f"""\
apiVersion: security.istio.io/v1
kind: {kind}
metadata:
  name: p
  namespace: foo
{extra_meta}spec:
{body}
"""


def errors_of(tmp_path: Path, text: str) -> list[str]:
    return [str(i) for i in load_policies(write(tmp_path, text)).errors]


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        ("selector: {matchLabels: {app: a}}\ntargetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: g}]",
         "spec.selector", "only one of selector or targetRef"),
        ("selector: {matchLabels: {'*': a}}\nrules: [{}]", "spec.selector.matchLabels[*]", "wildcard"),
        ("action: DENY", "spec.rules", "without rules is meaningless"),
        ("action: CUSTOM\nrules: [{}]", "spec.provider", "requires provider.name"),
        ("action: CUSTOM\nprovider: {name: x}\nrules: [{from: [{source: {principals: [a]}}]}]",
         "spec.rules[0].from[0].source.principals", "cannot be used in a CUSTOM policy"),
        ("action: CUSTOM\nprovider: {name: x}\nrules: [{when: [{key: 'request.auth.claims[group]', values: [a]}]}]",
         "spec.rules[0].when[0].key", "cannot be used in a CUSTOM policy"),
        ("action: DENY\nprovider: {name: x}\nrules: [{}]", "spec.provider", "only be used with CUSTOM"),
        ("rules: [{from: []}]", "spec.rules[0].from", "empty `from`"),
        ("rules: [{to: []}]", "spec.rules[0].to", "empty `to`"),
        ("rules: [{from: [{source: {}}]}]", "spec.rules[0].from[0].source", "empty source"),
        ("rules: [{to: [{operation: {}}]}]", "spec.rules[0].to[0].operation", "empty operation"),
        ("rules: [{to: [{operation: {methods: ['']}}]}]", "spec.rules[0].to[0].operation.methods[0]", "empty string"),
        ("rules: [{from: [{source: {ipBlocks: [1.2.3.999]}}]}]", "spec.rules[0].from[0].source.ipBlocks[0]",
         "invalid IP"),
        ("rules: [{to: [{operation: {ports: ['70000']}}]}]", "spec.rules[0].to[0].operation.ports[0]", "invalid port"),
        ("rules: [{to: [{operation: {ports: [80]}}]}]", "spec.rules[0].to[0].operation.ports[0]", "quote it"),
        ("rules: [{to: [{operation: {paths: ['/a/{**}/b/{*}']}}]}]", "spec.rules[0].to[0].operation.paths[0]",
         "must be the last operator"),
        ("rules: [{to: [{operation: {paths: ['/a/{x}']}}]}]", "spec.rules[0].to[0].operation.paths[0]",
         "only {*} and {**}"),
        ("rules: [{when: [{key: 'destination.labels[app]', values: [a]}]}]", "spec.rules[0].when[0].key",
         "unknown attribute"),
        ("rules: [{when: [{key: 'request.headers[x]'}]}]", "spec.rules[0].when[0]", "needs values or notValues"),
        ("rules: [{when: [{key: source.ip, values: [nope]}]}]", "spec.rules[0].when[0].values[0]", "invalid IP"),
        ("rules: [{from: [{source: {serviceAccounts: ['a*']}}]}]",
         "spec.rules[0].from[0].source.serviceAccounts[0]", "wildcard"),
        ("rules: [{from: [{source: {serviceAccounts: [a/b/c]}}]}]",
         "spec.rules[0].from[0].source.serviceAccounts[0]", "'name' or 'namespace/name'"),
        ("rules: [{from: [{source: {serviceAccounts: [a], principals: [b]}}]}]",
         "spec.rules[0].from[0].source.serviceAccounts", "cannot be combined"),
        ("action: deny\nrules: [{}]", "spec.action", "invalid action"),
        ("rules: [{to: [{operation: {method: [GET]}}]}]", "spec.rules[0].to[0].operation.method", "unknown field"),
        ("rule: [{}]", "spec.rule", "unknown field"),
    ],
)
def test_invalid_authorization_policy(tmp_path: Path, spec: str, field: str, message: str) -> None:
    errors = errors_of(tmp_path, policy(spec))
    expected_prefix = f"{tmp_path / 'p.yaml'}: AuthorizationPolicy/foo/p: {field}: "
    assert any(e.startswith(expected_prefix) and message in e for e in errors), errors


def test_service_accounts_limit(tmp_path: Path) -> None:
    accounts = ", ".join(f"sa{i}" for i in range(17))
    errors = errors_of(tmp_path, policy(f"rules: [{{from: [{{source: {{serviceAccounts: [{accounts}]}}}}]}}]"))
    assert any("at most 16" in e for e in errors)


def test_every_problem_is_reported_not_just_the_first(tmp_path: Path) -> None:
    spec = "rules: [{from: [{source: {ipBlocks: [x]}}], to: [{operation: {ports: ['-1'], paths: ['']}}]}]"
    assert len(errors_of(tmp_path, policy(spec))) == 3


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("jwtRules: [{issuer: a, audiences: ['']}]", "empty"),
        ("jwtRules: [{audiences: [x]}]", "issuer"),
        ("jwtRules: [{issuer: a, jwksUri: 'ftp://x/jwks'}]", "jwksUri"),
        ("jwtRules: [{issuer: a, jwks: 'not json'}]", "jwks"),
        ("jwtRules: [{issuer: a, fromHeaders: [{name: ''}]}]", "fromHeaders"),
        ("jwtRules: [{issuer: a, jwks: '{\"keys\": []}', jwksUri: 'https://x/jwks'}]", "jwks"),
    ],
)
def test_invalid_request_authentication(tmp_path: Path, spec: str, message: str) -> None:
    errors = errors_of(tmp_path, policy(spec, kind="RequestAuthentication"))
    assert errors and any(message in e for e in errors), errors
    assert all(e.startswith(f"{tmp_path / 'p.yaml'}: RequestAuthentication/foo/p: spec.jwtRules") for e in errors)


def test_documents_are_strict_about_their_envelope(tmp_path: Path) -> None:
    text = """\
    apiVersion: security.istio.io/v2
    kind: AuthorizationPolicy
    metadata: {name: a, namespace: foo}
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: b}
    ---
    - just a list
    """
    errors = errors_of(tmp_path, text)
    assert any("apiVersion" in e and "unsupported" in e for e in errors)
    assert any("AuthorizationPolicy/?/b: metadata.namespace: is required" in e for e in errors)
    assert any("document 2: document must be an object" in e for e in errors)


def test_broken_yaml_names_the_line(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, "a: [1, 2\nb: c\n")
    assert len(errors) == 1 and "invalid YAML: line" in errors[0]


def test_duplicate_names_are_rejected(tmp_path: Path) -> None:
    write(tmp_path, policy("rules: [{}]"), "a.yaml")
    write(tmp_path, policy("rules: [{}]"), "b.yaml")
    errors = [str(e) for e in load_policies(tmp_path).errors]
    assert len(errors) == 1 and "duplicate AuthorizationPolicy foo/p" in errors[0]


def test_directory_reads_configmap_volumes_without_hidden_entries(tmp_path: Path) -> None:
    data = tmp_path / "..2026_11_23_00_00_00.000"
    data.mkdir()
    write(data, policy("rules: [{}]"), "policies.yaml")
    (tmp_path / "..data").symlink_to(data.name)
    (tmp_path / "policies.yaml").symlink_to("..data/policies.yaml")
    policy_set = load_policies(tmp_path)
    assert policy_set.ok and len(policy_set.authorization_policies) == 1


def test_warnings_do_not_reject(tmp_path: Path) -> None:
    text = policy("selector: {matchLabels: {}}\naction: CUSTOM\nprovider: {name: ext}\nrules: [{}]",
                  extra_meta="  annotations: {istio.io/dry-run: maybe}\n")
    policy_set = load_policies(write(tmp_path, text), allow_empty=True)  # CUSTOM alone enforces nothing
    assert policy_set.ok
    warnings = " ".join(str(w) for w in policy_set.warnings)
    assert "empty selector" in warnings and "CUSTOM" in warnings and "policy is enforced" in warnings
    assert policy_set.authorization_policies[0].dry_run is False


def test_other_kinds_are_ignored_with_a_warning(tmp_path: Path) -> None:
    text = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: a, namespace: foo}\n"
    policy_set = load_policies(write(tmp_path, text), allow_empty=True)
    assert policy_set.ok and "ignored" in str(policy_set.warnings[0])


def test_missing_path_is_an_error(tmp_path: Path) -> None:
    assert "does not exist" in str(load_policies(tmp_path / "nope").errors[0])
