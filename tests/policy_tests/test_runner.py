"""``authz-server test``: test files next to the policies, decided offline as the server would."""

from __future__ import annotations

import json
import shutil
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from authz_server.cli import main

WORKSHOP = Path(__file__).resolve().parents[2] / "examples" / "workshop"

POLICIES = """\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: idp, namespace: foo}
spec:
  jwtRules:
  - issuer: https://idp.test
    jwksUri: https://idp.test/jwks.json
    fromHeaders: [{name: x-jwt, prefix: "Token "}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: readers, namespace: foo}
spec:
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/foo/sa/sleep"]}
    - source: {namespaces: ["ops"]}
    to: [{operation: {methods: ["GET"]}}]
  - from: [{source: {requestPrincipals: ["https://idp.test/*"]}}]
    when: [{key: "request.auth.claims[role]", values: ["reader"]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: never-applies, namespace: bar}
spec:
  action: DENY
  rules: [{}]
"""


def write(directory: Path, tests: str, policies: str = POLICIES) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "policies.yaml").write_text(policies)
    (directory / "policies_test.yaml").write_text(textwrap.dedent(tests))
    return directory


SLEEP = ("{method: GET, path: /get, source: {principal: spiffe://cluster.local/ns/foo/sa/sleep}, "
         "destination: {principal: spiffe://cluster.local/ns/foo/sa/httpbin}}")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    code = main(["test", *argv, "--log-level", "WARNING"])
    return code, capsys.readouterr().out.splitlines()


def test_the_workshop_suite_passes_and_exercises_every_rule(tmp_path: Path, capsys) -> None:
    junit = tmp_path / "out" / "junit.xml"
    code, lines = run(capsys, str(WORKSHOP), "--coverage", "--junit", str(junit))
    assert code == 0, "\n".join(lines)
    results = [line for line in lines if line.startswith(("PASS", "FAIL", "ERROR"))]
    assert len(results) >= 20 and all(line.startswith("PASS") for line in results)
    assert lines[-1] == f"{len(results)} passed, 0 failed, 0 errors"
    coverage = next(line for line in lines if line.startswith("coverage:"))
    assert "not exercised" not in "\n".join(lines), coverage
    suites = ET.parse(junit).getroot()
    assert suites.get("tests") == str(len(results)) and suites.get("failures") == "0"
    assert {s.get("name") for s in suites} == {str(WORKSHOP / "httpbin_test.yaml"), str(WORKSHOP / "egress_test.yaml")}


def test_a_failing_test_says_what_differed_and_why(tmp_path: Path, capsys) -> None:
    write(tmp_path, f"""\
        kind: PolicyTest
        tests:
        - name: sleep may POST
          request: {{<<: {SLEEP}, method: POST}}
          expect: {{decision: allow, policy: foo/readers}}
        - name: sleep may GET
          request: {SLEEP}
          expect: {{decision: allow, policy: foo/readers, rule: 0}}
        """)
    junit = tmp_path / "junit.xml"
    code, lines = run(capsys, str(tmp_path), "--junit", str(junit))
    assert code == 1
    test_file = tmp_path / "policies_test.yaml"
    assert lines[0] == f"FAIL  {test_file}: sleep may POST"
    assert lines[1:3] == ["      decision: expected allow, got deny", "      policy: expected foo/readers, got none"]
    assert "        decision: DENY (HTTP 403)" in lines  # explain's account follows
    assert f"PASS  {test_file}: sleep may GET" in lines
    assert lines[-1] == "1 passed, 1 failed, 0 errors"
    [failure] = ET.parse(junit).getroot().iter("failure")
    assert failure.get("message") == "decision: expected allow, got deny"


def test_bad_test_files_get_one_line_per_problem(tmp_path: Path, capsys) -> None:
    write(tmp_path, """\
        kind: PolicyTest
        settings: {workload-kind: spaceship, colour: blue}
        extra: 1
        tests:
        - name: first
          request: {method: GET, source: {port: 80, nickname: x}}
          expect: {decision: maybe, status: 9000, dryRun: {DENY: perhaps}, policies: x}
        - name: first
          request: {jwt: {claims: {sub: alice}}}
          expect: {decision: deny}
        - request: {}
          expect: {decision: deny}
        - name: third
          request: {headers: [x-a]}
          expect: {decision: deny}
        """)
    code, lines = run(capsys, str(tmp_path))
    assert code == 1
    f = tmp_path / "policies_test.yaml"
    assert lines == [
        f"ERROR {f}: extra: unknown field (expected kind, policies, settings, jwks, tests)",
        f"ERROR {f}: settings.workload-kind: invalid workload kind 'spaceship': one of sidecar, gateway, k8s-gateway, waypoint",
        f"ERROR {f}: settings.colour: unknown setting (expected one of " + lines[2].split("one of ", 1)[1],
        f"ERROR {f}: test 'first': request: source: unknown fields ['nickname']",
        f"ERROR {f}: test 'first': expect.policies: unknown field (expected decision, status, reason, policy, rule, "
        "dryRun, upstreamHeaders, removedHeaders, responseHeaders)",
        f"ERROR {f}: test 'first': expect.decision: must be allow or deny, got 'maybe'",
        f"ERROR {f}: test 'first': expect.status: must be an integer between 100 and 599, got 9000",
        f"ERROR {f}: test 'first': expect.dryRun.DENY.result: must be allowed or denied, got 'perhaps'",
        f"ERROR {f}: test 'first': name: duplicate test name in this file",
        f"ERROR {f}: test 'first': request: jwt.claims.iss must be the issuer (a non-empty string)",
        f"ERROR {f}: tests[2]: name: required: a non-empty string",
        f"ERROR {f}: test 'third': request: headers must be an object: name -> value or list of values",
        "0 passed, 0 failed, 12 errors",
    ]


@pytest.mark.parametrize("text, problem", [
    ("kind: PolicyTest\ntests: [{name: a, request: {}, expect: {decision: deny}\n", "invalid YAML: line 3, column 1"),
    ("kind: Something\n", "kind: not a test file: no document with kind: PolicyTest"),
    ("kind: PolicyTest\npolicies: missing/\ntests: []\n", "policies: "),
])
def test_unusable_test_files_are_one_line_each(tmp_path: Path, capsys, text: str, problem: str) -> None:
    (tmp_path / "x_test.yaml").write_text(text)
    code, lines = run(capsys, str(tmp_path / "x_test.yaml"))
    assert code == 1
    assert lines[0].startswith(f"ERROR {tmp_path / 'x_test.yaml'}: ") and problem in lines[0]
    assert lines[-1].startswith("0 passed, 0 failed, ")


def test_an_invalid_policy_set_errors_every_test_and_is_listed_once(tmp_path: Path, capsys) -> None:
    broken = POLICIES.replace('methods: ["GET"]', 'methods: "GET"')
    write(tmp_path, f"""\
        kind: PolicyTest
        tests:
        - {{name: a, request: {SLEEP}, expect: {{decision: allow}}}}
        - {{name: b, request: {SLEEP}, expect: {{decision: allow}}}}
        """, broken)
    code, lines = run(capsys, str(tmp_path))
    assert code == 1
    assert lines[0].startswith("ERROR") and lines[1] == f"      policy set {tmp_path} is invalid:"
    assert "spec.rules[0].to[0].operation.methods" in lines[2]
    assert lines[3] == f"ERROR {tmp_path / 'policies_test.yaml'}: b"
    assert lines[4] == f"      policy set {tmp_path} is invalid: (listed above)"
    assert lines[-1] == "0 passed, 0 failed, 2 errors"


def test_claims_given_directly_go_through_the_real_jwt_path(tmp_path: Path, capsys) -> None:
    """The run's key signs the claims; the token sits where the rule looks (x-jwt, prefix
    "Token "), is verified, and its claims decide — a token elsewhere is not seen."""
    write(tmp_path, """\
        kind: PolicyTest
        tests:
        - name: reader
          request: {method: POST, path: /x, jwt: {claims: {iss: https://idp.test, sub: a, role: reader}}}
          expect: {decision: allow, policy: foo/readers, rule: 1, removedHeaders: [x-jwt]}
        - name: writer
          request: {method: POST, path: /x, jwt: {claims: {iss: https://idp.test, sub: a, role: writer}}}
          expect: {decision: deny, reason: no_allow_match}
        - name: expired
          request: {method: POST, path: /x, jwt: {claims: {iss: https://idp.test, sub: a, role: reader, exp: 1}}}
          expect: {decision: deny, status: 401, reason: jwt_expired}
        - name: in the default location the rule does not read
          request: {method: POST, path: /x, jwt: {claims: {iss: https://idp.test, sub: a, role: reader}, header: authorization, prefix: "Bearer "}}
          expect: {decision: deny, reason: no_allow_match}
        - name: as a query parameter
          request: {method: POST, path: "/x?a=1", jwt: {claims: {iss: https://idp.test, sub: a, role: reader}, param: access_token}}
          expect: {decision: deny, reason: no_allow_match}
        - name: unknown issuer
          request: {method: POST, path: /x, jwt: {claims: {iss: https://other.test, sub: a}}}
          expect: {decision: deny}
        """.replace("method: POST,", "method: POST, destination: {principal: spiffe://cluster.local/ns/foo/sa/httpbin},"))
    code, lines = run(capsys, str(tmp_path))
    f = tmp_path / "policies_test.yaml"
    assert [line for line in lines if line.startswith(("PASS", "ERROR"))] == [
        f"PASS  {f}: reader", f"PASS  {f}: writer", f"PASS  {f}: expired",
        f"PASS  {f}: in the default location the rule does not read", f"PASS  {f}: as a query parameter",
        f"ERROR {f}: unknown issuer",
    ]
    assert lines[-2] == ("      request: jwt.claims.iss 'https://other.test': no jwtRule in the policy set has this "
                         "issuer (issuers: https://idp.test)")
    assert code == 1


def test_a_token_signed_by_your_own_test_key(tmp_path: Path, capsys) -> None:
    """``jwks`` in the test file publishes your test signer's public key for the run."""
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = {**pyjwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": "mine"}
    claims = {"iss": "https://idp.test", "sub": "a", "role": "reader", "exp": int(time.time()) + 3600}
    good = pyjwt.encode(claims, key, algorithm="ES256", headers={"kid": "mine"})
    stranger = pyjwt.encode(claims, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256",
                            headers={"kid": "mine"})
    dest = "destination: {principal: spiffe://cluster.local/ns/foo/sa/httpbin}"
    write(tmp_path, f"""\
        kind: PolicyTest
        jwks:
          https://idp.test: '{json.dumps({"keys": [jwk]})}'
        tests:
        - name: signed by my key
          request: {{method: POST, {dest}, headers: {{x-jwt: "Token {good}"}}}}
          expect: {{decision: allow, policy: foo/readers, rule: 1}}
        - name: signed by a key nobody published
          request: {{method: POST, {dest}, headers: {{x-jwt: "Token {stranger}"}}}}
          expect: {{decision: deny, status: 401, reason: jwt_bad_signature}}
        """)
    code, lines = run(capsys, str(tmp_path))
    assert code == 0, "\n".join(lines)


def test_coverage_lists_what_no_test_exercised(tmp_path: Path, capsys) -> None:
    write(tmp_path, f"""\
        kind: PolicyTest
        tests:
        - {{name: sleep reads, request: {SLEEP}, expect: {{decision: allow}}}}
        """)
    code, lines = run(capsys, str(tmp_path), "--coverage")
    assert code == 0
    origin = tmp_path / "policies.yaml"
    assert lines[1] == "coverage: 1 of 3 rules, 2 of 5 from/to/when entries, 0 of 1 jwtRules exercised"
    assert lines[2:-1] == [
        f"  not exercised: ALLOW foo/readers ({origin}#1) rule[0] from[1] (source.namespaces)",
        f"  not exercised: ALLOW foo/readers ({origin}#1) rule[1]",
        f"  not exercised: ALLOW foo/readers ({origin}#1) rule[1] from[0] (source.requestPrincipals)",
        f"  not exercised: ALLOW foo/readers ({origin}#1) rule[1] when[0] (request.auth.claims[role])",
        f"  not exercised: DENY bar/never-applies ({origin}#2): applied to no tested workload",
        f"  not exercised: RequestAuthentication foo/idp ({origin}#0) jwtRules[0] (issuer https://idp.test): "
        "no test presented a token",
    ]


def test_policies_flag_tests_another_policy_set_with_the_same_tests(tmp_path: Path, capsys) -> None:
    write(tmp_path / "suite", f"""\
        kind: PolicyTest
        tests:
        - {{name: sleep reads, request: {SLEEP}, expect: {{decision: allow}}}}
        """)
    other = tmp_path / "other"
    other.mkdir()
    (other / "deny.yaml").write_text("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
                                     "metadata: {name: deny-all, namespace: foo}\nspec: {action: DENY, rules: [{}]}\n")
    assert run(capsys, str(tmp_path / "suite"))[0] == 0
    code, lines = run(capsys, str(tmp_path / "suite"), "--policies", str(other))
    assert code == 1 and "      decision: expected allow, got deny" in lines


def test_test_files_next_to_the_policies_are_not_policies(tmp_path: Path, capsys) -> None:
    shutil.copytree(WORKSHOP, tmp_path / "workshop")
    assert main(["validate", str(tmp_path / "workshop")]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["OK: 6 AuthorizationPolicies, 1 RequestAuthentications, 0 errors, 0 warnings"]


def test_the_readme_example_runs_against_the_workshop_policies(tmp_path: Path, capsys) -> None:
    readme = (WORKSHOP.parents[1] / "README.md").read_text()
    section = readme.split("## Testing your policies", 1)[1]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    shutil.copytree(WORKSHOP, tmp_path / "workshop")
    (tmp_path / "workshop" / "readme_test.yaml").write_text(example)
    code, lines = run(capsys, str(tmp_path / "workshop" / "readme_test.yaml"))
    assert (code, lines[-1]) == (0, "1 passed, 0 failed, 0 errors"), "\n".join(lines)
