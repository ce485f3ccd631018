"""The policy watcher sees every kind of update, ConfigMap symlink swaps included."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from authz_server.policy.watch import PolicyWatcher, fingerprint


def configmap_volume(root: Path, version: str, text: str) -> None:
    """Lay out a ConfigMap volume as the kubelet does: ..<ts>/file, ..data -> ..<ts>, file -> ..data/file."""
    data = root / f"..{version}"
    data.mkdir()
    (data / "policies.yaml").write_text(text)
    tmp = root / "..data_tmp"
    tmp.symlink_to(data.name)
    os.replace(tmp, root / "..data")  # atomic swap, as the kubelet does
    link = root / "policies.yaml"
    if not link.is_symlink():
        link.symlink_to("..data/policies.yaml")


def test_fingerprint_changes_on_a_configmap_symlink_swap(tmp_path: Path) -> None:
    configmap_volume(tmp_path, "v1", "a: 1\n")
    before = fingerprint(tmp_path)
    configmap_volume(tmp_path, "v2", "a: 1\n")  # same size, new target
    assert fingerprint(tmp_path) != before


def test_fingerprint_ignores_hidden_entries_and_other_files(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("x")
    before = fingerprint(tmp_path)
    (tmp_path / ".hidden.yaml").write_text("y")
    (tmp_path / "notes.txt").write_text("z")
    assert fingerprint(tmp_path) == before


def test_watcher_calls_back_once_per_settled_change(tmp_path: Path) -> None:
    configmap_volume(tmp_path, "v1", "a: 1\n")
    calls: list[int] = []

    async def scenario() -> None:
        watcher = PolicyWatcher(tmp_path, 0.02, lambda: calls.append(1))
        task = asyncio.create_task(watcher.run())
        await asyncio.sleep(0.1)
        configmap_volume(tmp_path, "v2", "a: 2\n")
        for _ in range(100):
            if calls:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        task.cancel()

    asyncio.run(scenario())
    assert calls == [1]
