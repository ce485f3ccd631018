"""The last good policy set reaches a worker the supervisor (re)starts, and is used only when
the path's own set is invalid (``authz_server.policy.handover``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from authz_server.engine.engine import MeshSettings
from authz_server.policy import handover
from authz_server.policy.handover import LastGoodPolicies
from authz_server.policy_store import PolicyStore
from tests.integration.test_server import ALLOW_GET_FROM_SLEEP, DENY_ALL

BROKEN = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
MESH = MeshSettings("istio-system", "cluster.local", ())


def names(store: PolicyStore) -> list[str]:
    assert store.policy_set is not None
    return [p.name for p in store.policy_set.authorization_policies]


def settle(kept: LastGoodPolicies, now: float) -> float:
    """Two polls one interval apart: a change counts once seen unchanged twice."""
    for _ in range(2):
        now += kept.interval
        kept.poll(now)
    return now


def test_the_supervisor_keeps_the_newest_valid_set_and_not_an_invalid_one(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(DENY_ALL)
    kept = LastGoodPolicies(tmp_path, allow_empty=False, interval=1.0)
    kept.poll(0.0)
    assert kept.sources == ((str(tmp_path / "p.yaml"), DENY_ALL),)
    (tmp_path / "p.yaml").write_text(ALLOW_GET_FROM_SLEEP)
    now = settle(kept, 0.0)
    assert kept.sources == ((str(tmp_path / "p.yaml"), ALLOW_GET_FROM_SLEEP),)
    (tmp_path / "broken.yaml").write_text(BROKEN)
    settle(kept, now)
    assert kept.sources == ((str(tmp_path / "p.yaml"), ALLOW_GET_FROM_SLEEP),)


def test_with_interval_zero_the_path_is_read_at_start_and_on_sighup_only(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(DENY_ALL)
    kept = LastGoodPolicies(tmp_path, allow_empty=False, interval=0.0)
    kept.poll(0.0)
    (tmp_path / "p.yaml").write_text(ALLOW_GET_FROM_SLEEP)
    settle(kept, 0.0)
    assert kept.sources == ((str(tmp_path / "p.yaml"), DENY_ALL),)
    kept.poll(5.0, force=True)
    assert kept.sources == ((str(tmp_path / "p.yaml"), ALLOW_GET_FROM_SLEEP),)


def test_a_worker_reads_the_handed_over_set_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "p.yaml").write_text(ALLOW_GET_FROM_SLEEP)
    kept = LastGoodPolicies(tmp_path, allow_empty=False, interval=1.0)
    kept.poll(0.0)
    fd = kept.handover_fd()
    assert fd is not None
    monkeypatch.setenv(handover.ENV, str(fd))
    assert handover.inherited() == kept.sources
    assert handover.ENV not in os.environ  # not passed on to anything the worker starts
    assert handover.inherited() is None


def test_nothing_to_hand_over_before_a_valid_set_was_seen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "p.yaml").write_text(BROKEN)
    kept = LastGoodPolicies(tmp_path, allow_empty=False, interval=1.0)
    kept.poll(0.0)
    assert kept.handover_fd() is None
    monkeypatch.setenv(handover.ENV, "not-a-descriptor")
    assert handover.inherited() is None  # logged; the path's set alone counts


def test_the_store_serves_the_handed_over_set_only_while_the_path_is_invalid(tmp_path: Path) -> None:
    fallback = (("kept/p.yaml", ALLOW_GET_FROM_SLEEP),)
    (tmp_path / "p.yaml").write_text(BROKEN)
    store = PolicyStore(tmp_path, MESH, fallback=fallback)
    result = store.reload()
    assert not result.ok and result.errors  # the path's errors are reported as ever
    assert names(store) == ["allow-sleep"]
    (tmp_path / "p.yaml").write_text(DENY_ALL)
    assert store.reload().ok and names(store) == ["deny-all"]
    (tmp_path / "p.yaml").write_text(BROKEN)
    assert not store.reload().ok and names(store) == ["deny-all"]  # its own last good set now


def test_a_valid_path_wins_over_the_handed_over_set(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(DENY_ALL)
    store = PolicyStore(tmp_path, MESH, fallback=(("kept/p.yaml", ALLOW_GET_FROM_SLEEP),))
    assert store.reload().ok and names(store) == ["deny-all"]
    (tmp_path / "p.yaml").write_text(BROKEN)
    assert not store.reload().ok and names(store) == ["deny-all"]


def test_an_invalid_handed_over_set_is_not_served(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(BROKEN)
    store = PolicyStore(tmp_path, MESH, fallback=(("kept/p.yaml", BROKEN),))
    assert not store.reload().ok and not store.loaded


def test_a_large_set_is_handed_over_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(300):  # well over one write's worth
        (tmp_path / f"p{i:03}.yaml").write_text(DENY_ALL.replace("deny-all", f"deny-{i}") + "#" * 4096 + "\n")
    kept = LastGoodPolicies(tmp_path, allow_empty=False, interval=1.0)
    kept.poll(0.0)
    fd = kept.handover_fd()
    assert fd is not None
    monkeypatch.setenv(handover.ENV, str(fd))
    assert handover.inherited() == kept.sources and len(kept.sources) == 300


def test_without_a_descriptor_to_spare_the_worker_reads_the_path_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "p.yaml").write_text(DENY_ALL)
    kept = LastGoodPolicies(tmp_path, allow_empty=False, interval=1.0)
    kept.poll(0.0)

    def no_descriptor(name: str) -> int:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(os, "memfd_create", no_descriptor)
    assert kept.handover_fd() is None
