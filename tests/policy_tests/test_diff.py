"""``authz-server diff``: the same requests under two policy sets, only the changes printed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from authz_server.cli import main

WORKSHOP = Path(__file__).resolve().parents[2] / "examples" / "workshop"
TESTS = [str(WORKSHOP / "httpbin_test.yaml"), str(WORKSHOP / "egress_test.yaml")]


def diff(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    code = main(["diff", *argv, "--log-level", "WARNING"])
    return code, capsys.readouterr().out.splitlines()


def changed_copy(tmp_path: Path) -> Path:
    new = tmp_path / "new"
    shutil.copytree(WORKSHOP, new)
    (new / "20-httpbin-deny.yaml").unlink()  # drop the explicit DENY
    allow_list = new / "50-egress-allow-list.yaml"
    allow_list.write_text(allow_list.read_text().replace('paths: ["/v1/*"]', 'paths: ["/v1/*", "/internal/*"]'))
    return new


def test_only_requests_whose_decision_changes_are_printed(tmp_path: Path, capsys) -> None:
    new = changed_copy(tmp_path)
    code, lines = diff(capsys, "--from", str(WORKSHOP), "--to", str(new), "--requests", *TESTS)
    assert code == 1
    assert lines == [
        f"CHANGED {TESTS[0]}: an admin from outside foo cannot write to /admin/*",
        "  before: DENY (HTTP 403) denied_by_policy by foo/deny-admin-writes-from-outside rule[0]",
        "  after:  ALLOW (HTTP 200) allowed_by_policy by foo/httpbin-admins rule[0]",
        f"CHANGED {TESTS[1]}: but nothing outside /v1/",
        "  before: DENY (HTTP 403) no_allow_match",
        "  after:  ALLOW (HTTP 200) allowed_by_policy by istio-system/egress-allow-list rule[0]",
        f"21 requests decided under {WORKSHOP} and {new}: 2 changed",
    ]


def test_a_change_of_deciding_policy_alone_is_a_change(tmp_path: Path, capsys) -> None:
    new = tmp_path / "new"
    shutil.copytree(WORKSHOP, new)
    readers = new / "10-httpbin-principals.yaml"
    readers.write_text(readers.read_text().replace("name: httpbin-readers", "name: httpbin-readers-v2"))
    code, lines = diff(capsys, "--from", str(WORKSHOP), "--to", str(new), "--requests", TESTS[0])
    assert code == 1
    changed = [line for line in lines if line.startswith("CHANGED")]
    assert f"CHANGED {TESTS[0]}: sleep may GET" in changed
    assert f"CHANGED {TESTS[0]}: sleep may not POST" not in changed  # denied by no policy either way


def test_no_change_prints_only_the_summary_and_exits_0(tmp_path: Path, capsys) -> None:
    requests = tmp_path / "requests.yaml"
    requests.write_text("- {method: GET, path: /get, source: {principal: spiffe://cluster.local/ns/foo/sa/sleep},"
                        " destination: {principal: spiffe://cluster.local/ns/foo/sa/httpbin, labels: {app: httpbin}}}\n"
                        "- {method: DELETE, path: /x}\n")
    code, lines = diff(capsys, "--from", str(WORKSHOP), "--to", str(WORKSHOP), "--requests", str(requests))
    assert (code, lines) == (0, [f"2 requests decided under {WORKSHOP} and {WORKSHOP}: 0 changed"])


def test_policies_env_is_the_old_set_and_problems_are_one_line_each(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("AUTHZ_POLICIES", str(WORKSHOP))
    bad = tmp_path / "requests.yaml"
    bad.write_text("- {method: GET, bogus: 1}\n- {method: GET, jwt: {claims: {iss: https://nobody.example}}}\n")
    code, lines = diff(capsys, "--to", str(WORKSHOP), "--requests", str(bad))
    assert code == 2
    assert lines[0] == (f"ERROR {bad}: request[0]: unknown fields ['bogus'] "
                        "(expected method, host, path, headers, source, destination, sni, metadata, encode_raw_headers)")
    assert lines[1].startswith(f"ERROR {bad}: request[1]: request: jwt.claims.iss 'https://nobody.example': "
                               "no jwtRule in the policy set has this issuer")
    assert lines[2] == f"1 requests decided under {WORKSHOP} and {WORKSHOP}: 0 changed"


def test_an_invalid_new_policy_set_is_trouble(tmp_path: Path, capsys) -> None:
    new = tmp_path / "new"
    shutil.copytree(WORKSHOP, new)
    (new / "broken.yaml").write_text("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n")
    code, lines = diff(capsys, "--from", str(WORKSHOP), "--to", str(new), "--requests", TESTS[0])
    assert code == 2
    assert lines[0] == f"policy set {new} is invalid:"
    assert lines[1].startswith(f"  {new / 'broken.yaml'}: ")
