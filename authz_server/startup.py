"""What ``serve`` checks before it serves: configuration errors end the start, clearly, at once.

Why here and not in the workers: a worker that fails on its configuration would be restarted
by the supervisor for ever while ``/healthz`` stays green. Everything a start can get wrong —
TLS files, a busy or foreign-held port, an unwritable metrics directory — is found in the
process the operator started, before any worker exists, and reported as one line naming the
flag (or environment variable) and what to do.
"""

from __future__ import annotations

import math
import os
import socket
import struct
import sys
from pathlib import Path


class StartupError(Exception):
    """A configuration problem that prevents serving; ``str()`` is the one line to print."""


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may really use: its affinity mask, capped by a cgroup CPU quota.

    ``os.cpu_count()`` counts the host's CPUs, so a pod limited to one CPU (or a process pinned
    with ``taskset``) would start more workers than it can run.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def _cgroup_quota(root: Path) -> float | None:
    """CPUs allowed by cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``; ``None`` = unlimited."""
    try:
        text = (root / "cpu.max").read_text().split()
        if len(text) == 2 and text[0] != "max":
            return int(text[0]) / int(text[1])
        return None
    except (OSError, ValueError, ZeroDivisionError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def _split(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def check_bindable(listen: str, flag: str, *, reuse_port: bool) -> None:
    """Bind (and release) ``listen`` as the server will, so a busy port fails the start."""
    host, port = _split(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise StartupError(f"{flag} {listen}: cannot bind: {exc.strerror or exc}; "
                           "is another program using the port?") from None


class PortGuard:
    """Claims a port for one server (its own workers included) in this network namespace.

    The workers share the gRPC port with SO_REUSEPORT, which lets *any* process of the same
    user join the port: a second, independent ``serve`` would silently get half the Checks and
    answer them with its own policies. The guard is a listening abstract Unix socket named after
    the port; abstract sockets live in the network namespace (one pod, one container host) and
    vanish with their process, so a crash never leaves a stale claim. A second server finds the
    name taken and learns the holder's pid from the socket's peer credentials.
    """

    def __init__(self, listen: str, flag: str = "--listen") -> None:
        _, port = _split(listen)
        self.name = f"\0authz-server/port/{port}"
        self._socket: socket.socket | None = None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.name)
            sock.listen(1)
        except OSError:
            sock.close()
            holder = self._holder()
            who = f"another authz-server (pid {holder})" if holder else "another authz-server"
            raise StartupError(
                f"{flag} {listen}: {who} already serves port {port} here; two servers sharing a port "
                "(SO_REUSEPORT) would split the Checks between their policy sets. Stop it or choose "
                "another port (use --workers to run more processes of one server)."
            ) from None
        self._socket = sock

    def _holder(self) -> int | None:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(1.0)
                probe.connect(self.name)
                pid, _, _ = struct.unpack("3i", probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                 struct.calcsize("3i")))
                return pid or None
        except OSError:
            return None

    def release(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def claim_port(listen: str) -> PortGuard | None:
    """The port guard for this server; ``None`` on platforms without abstract sockets."""
    if not sys.platform.startswith("linux"):
        return None
    return PortGuard(listen)
