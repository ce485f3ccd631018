"""The last good policy set, kept by the supervisor for the workers it (re)starts.

A worker keeps serving its last good set when the policy files turn invalid. A worker started
after that — the supervisor restarting one that crashed — would find only the invalid files
and serve nothing, so one server would deny on one connection what it allows on another. The
supervisor therefore follows the policy path itself (parsing only, no engine; at the same
interval, and on SIGHUP) and hands each worker it starts the texts of the last good set it
saw, in an anonymous memory file (memfd) the worker inherits. The worker uses them only when
the path's own set is invalid, and reports the path's errors as it would without them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from authz_server.policy.loader import load_policies
from authz_server.policy.watch import SettledChange, fingerprint

log = logging.getLogger(__name__)

#: the inherited descriptor's number; set by the supervisor for its workers only
ENV = "AUTHZ_LAST_GOOD_POLICIES_FD"

Sources = tuple[tuple[str, str], ...]


class LastGoodPolicies:
    """The supervisor's side: the newest valid set seen at ``path``, as file texts."""

    def __init__(self, path: str | Path, allow_empty: bool, interval: float) -> None:
        self.path = Path(path)
        self.allow_empty = allow_empty
        #: seconds between looks at the path; 0 = only at start and on SIGHUP (as the workers)
        self.interval = interval
        self.sources: Sources | None = None
        self._change = SettledChange()
        self._next = 0.0

    def poll(self, now: float, force: bool = False) -> None:
        """Load the path when it has changed (or when forced): keep it if it is valid."""
        if not force and (now < self._next or (self.interval <= 0 and self._change.seen is not None)):
            return
        self._next = now + self.interval
        current = fingerprint(self.path)
        if not force and self._change.seen is not None and not self._change.settled(current):
            return
        self._change.seen = current
        policy_set = load_policies(self.path, self.allow_empty)
        if not policy_set.ok or policy_set.sources == self.sources:
            return
        if self.sources is not None:
            log.info("policy set at %s changed and is valid: a worker that restarts starts from it", self.path)
        self.sources = policy_set.sources

    def handover_fd(self) -> int | None:
        """A memfd holding the last good set for one worker (the caller passes and closes it)."""
        if self.sources is None:
            return None
        data = json.dumps(self.sources).encode()
        try:
            fd = os.memfd_create("authz-last-good-policies")
        except OSError as exc:  # out of descriptors or memory: the worker reads the path alone
            log.warning("cannot hand the last good policy set to a worker: %s", exc.strerror or exc)
            return None
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.lseek(fd, 0, os.SEEK_SET)
        except OSError as exc:
            os.close(fd)
            log.warning("cannot hand the last good policy set to a worker: %s", exc.strerror or exc)
            return None
        return fd


def inherited() -> Sources | None:
    """The worker's side: the last good set its supervisor handed over, if any (read once)."""
    value = os.environ.pop(ENV, None)
    if not value:
        return None
    try:
        with os.fdopen(int(value), "rb") as handover:
            pairs = json.loads(handover.read())
        return tuple((str(name), str(text)) for name, text in pairs)
    except (ValueError, TypeError, OSError) as exc:
        log.warning("the supervisor's last good policy set could not be read (%s); the path's set alone counts", exc)
        return None
