"""A policy path never loses a policy silently: broken entries invalidate the set, an empty set
is not an allow-all unless asked for, and a reload that would lose policies keeps the last set."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from authz_server.authorizer import Authorizer
from authz_server.cli import main
from authz_server.engine.engine import MeshSettings
from authz_server.engine.request import RequestAttributes, Workload
from authz_server.policy.loader import load_policies
from authz_server.policy.watch import fingerprint
from authz_server.policy_store import PolicyStore

DENY_ALL = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: foo}
spec: {action: DENY, rules: [{}]}
"""
ALLOW_GET = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-get, namespace: foo}
spec: {rules: [{to: [{operation: {methods: [GET]}}]}]}
"""


def _decide(store: PolicyStore) -> tuple[bool, str]:
    verdict = asyncio.run(Authorizer(store.engine).check(
        RequestAttributes(method="GET", host="h", path="/", raw_path="/", workload=Workload("foo"))))
    return verdict.allowed, verdict.reason


@pytest.mark.parametrize("breakage", ["dangling symlink", "symlink loop", "directory"])
def test_a_policy_named_entry_that_is_not_a_readable_file_invalidates_the_set(tmp_path: Path, breakage: str) -> None:
    (tmp_path / "allow.yaml").write_text(ALLOW_GET)
    broken = tmp_path / "deny.yaml"
    if breakage == "dangling symlink":
        broken.symlink_to("gone.yaml")
    elif breakage == "symlink loop":
        broken.symlink_to("deny.yaml")
    else:
        broken.mkdir()
    errors = [str(e) for e in load_policies(tmp_path).errors]
    assert len(errors) == 1 and "deny.yaml" in errors[0] and breakage in errors[0]


def test_a_deny_file_becoming_a_dangling_link_keeps_the_last_good_set(tmp_path: Path) -> None:
    """Regression: the reload skipped the broken DENY file and published the rest: live, the
    denied request became allowed."""
    target = tmp_path / "..v1"
    target.mkdir()
    (target / "deny.yaml").write_text(DENY_ALL)
    (tmp_path / "allow.yaml").write_text(ALLOW_GET)
    (tmp_path / "deny.yaml").symlink_to("..v1/deny.yaml")
    store = PolicyStore(tmp_path, MeshSettings())
    assert store.reload().ok and _decide(store) == (False, "denied_by_policy")
    seen = fingerprint(tmp_path)
    (target / "deny.yaml").unlink()
    assert fingerprint(tmp_path) != seen  # the watcher notices the link breaking
    result = store.reload()
    assert not result.ok and "dangling symlink" in str(result.errors[0])
    assert store.generation == 1 and _decide(store) == (False, "denied_by_policy")


def test_a_reload_that_drops_every_policy_keeps_the_last_good_set(tmp_path: Path) -> None:
    (tmp_path / "deny.yaml").write_text(DENY_ALL)
    store = PolicyStore(tmp_path, MeshSettings())
    assert store.reload().ok
    (tmp_path / "deny.yaml").unlink()
    result = store.reload()
    assert not result.ok and "empty set allows every request" in str(result.errors[0])
    assert _decide(store) == (False, "denied_by_policy")


def test_a_start_without_policies_is_not_ready_unless_allowed(tmp_path: Path) -> None:
    store = PolicyStore(tmp_path, MeshSettings())
    assert not store.reload().ok and not store.loaded
    assert _decide(store) == (False, "no_policy_set")
    explicit = PolicyStore(tmp_path, MeshSettings(), allow_empty=True)
    assert explicit.reload().ok and _decide(explicit) == (True, "no_allow_policies")


def test_validate_reports_broken_entries_and_ignored_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "allow.yaml").write_text(ALLOW_GET)
    (tmp_path / "README.md").write_text("notes")
    (tmp_path / "old").mkdir()
    (tmp_path / "deny.yml").symlink_to("missing.yml")
    assert main(["validate", str(tmp_path)]) != 0
    out = capsys.readouterr()
    assert "deny.yml: named like a policy file but is a dangling symlink" in out.out
    assert "warning: " + str(tmp_path / "README.md") + ": ignored: not a policy file" in out.out
    assert "old: directory ignored" in out.out
    assert "INVALID" in out.out


def test_validate_of_an_empty_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(tmp_path)]) != 0
    assert "empty set allows every request" in capsys.readouterr().out
    assert main(["validate", "--allow-empty-policies", "true", str(tmp_path)]) == 0
