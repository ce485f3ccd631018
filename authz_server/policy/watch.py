"""Notice when the policy path changes, including Kubernetes ConfigMap volume updates.

A ConfigMap volume is updated by writing a new hidden directory and swapping the ``..data``
symlink, so inotify on the visible files sees nothing. Polling a fingerprint of what the path
*resolves to* (real paths, sizes, modification times) catches every form of update — in place
edits, new files, symlink swaps — with one cheap ``stat`` per file per interval.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Callable

from authz_server.policy.loader import policy_files

log = logging.getLogger(__name__)

Fingerprint = tuple[tuple[str, str, int, int], ...]


def fingerprint(path: Path) -> Fingerprint:
    """What the policy path currently resolves to; changes whenever its content can have."""
    entries = []
    try:
        files = policy_files(path) if path.exists() else []
    except OSError:
        files = []
    for file in files:
        try:
            real = os.path.realpath(file)
            st = os.stat(real)
        except OSError:  # a dangling link or a loop: its appearance is a change the reload reports
            entries.append((str(file), "", -1, -1))
            continue
        entries.append((str(file), real, st.st_mtime_ns, st.st_size))
    return tuple(entries)


class SettledChange:
    """Tells when a fingerprint has changed and then stayed the same for one more poll, so a
    reload never reads a half-written file."""

    def __init__(self) -> None:
        self.seen: Fingerprint | None = None
        self._pending: Fingerprint | None = None

    def settled(self, current: Fingerprint) -> bool:
        """Feed one poll's fingerprint; True once a change has settled (then it counts as seen)."""
        if current == self.seen:
            self._pending = None
            return False
        if current != self._pending:
            self._pending = current  # wait one more interval for the writer to finish
            return False
        self.seen, self._pending = current, None
        return True


class PolicyWatcher:
    """Polls ``path`` every ``interval`` seconds and calls ``on_change`` after a change settles
    (seen unchanged on two consecutive polls)."""

    def __init__(self, path: str | Path, interval: float, on_change: Callable[[], object]) -> None:
        self.path = Path(path)
        self.interval = interval
        self.on_change = on_change
        self._change = SettledChange()

    async def run(self) -> None:
        self._change.seen = await asyncio.to_thread(fingerprint, self.path)
        while True:
            await asyncio.sleep(self.interval)
            if not self._change.settled(await asyncio.to_thread(fingerprint, self.path)):
                continue
            log.info("policy path %s changed; reloading", self.path)
            result = self.on_change()
            if asyncio.iscoroutine(result):
                await result
