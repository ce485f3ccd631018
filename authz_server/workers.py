"""Several worker processes on one gRPC port, supervised: the way to use every core.

One Python process decides on one core. ``--workers N`` starts N copies of the single-process
server, each binding the same port with SO_REUSEPORT (the kernel spreads *connections* among
them — Envoy must open several, see the deploy docs). The supervisor restarts a worker that
dies, forwards SIGHUP, drains everyone on SIGTERM, and serves the aggregated metrics and the
health endpoints (Prometheus multiprocess mode over a private directory).
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import Counter

    from authz_server.observability.http_endpoint import OpsEndpoint
    from authz_server.policy.handover import LastGoodPolicies

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2
MAX_BACKOFF_SECONDS = 30.0
#: a worker's exit status for "this configuration cannot serve" (the CLI's usage error)
EXIT_CONFIG = 2
METRICS_PREFIX = "authz-metrics-"
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the forked worker: get SIGTERM when the supervisor dies, even by SIGKILL.

    An orphaned worker would keep answering on the port without the supervisor's port claim.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class MetricsDirectory:
    """The Prometheus multiprocess directory of one supervisor: created on start, removed on exit.

    Workers write their samples there (``PROMETHEUS_MULTIPROC_DIR``). A supervisor killed with
    SIGKILL cannot remove it, so each directory holds a lock for as long as its supervisor lives,
    and a new supervisor removes the directories whose lock nobody holds.
    """

    def __init__(self, path: str, lock: int) -> None:
        self.path = path
        self._lock = lock

    @classmethod
    def create(cls) -> MetricsDirectory:
        from authz_server.startup import StartupError

        # TMPDIR or /tmp, never tempfile's silent fall-back to the working directory.
        parent = os.environ.get("TMPDIR") or "/tmp"
        try:
            cls.sweep(parent)
            # Locked under a name the sweep ignores, then renamed: never swept while being made.
            staging = tempfile.mkdtemp(prefix="." + METRICS_PREFIX, dir=parent)
            lock = os.open(os.path.join(staging, ".lock"), os.O_CREAT | os.O_RDWR, 0o600)
            fcntl.flock(lock, fcntl.LOCK_EX)
            path = os.path.join(parent, os.path.basename(staging)[1:])
            os.rename(staging, path)
        except OSError as exc:
            raise StartupError(
                f"--workers with --metrics-listen keeps the workers' metrics in a temporary directory, and "
                f"{parent} (TMPDIR) is not writable: {exc.strerror or exc}. Mount a writable directory there "
                "(the chart mounts an emptyDir at /tmp), set TMPDIR, or use --workers 1 or --metrics-listen off"
            ) from None
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
        return cls(path, lock)

    @staticmethod
    def sweep(parent: str) -> None:
        """Remove metrics directories left by supervisors that no longer run."""
        for entry in os.scandir(parent):
            if not entry.name.startswith(METRICS_PREFIX) or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                fd = os.open(os.path.join(entry.path, ".lock"), os.O_RDWR)
            except OSError:
                continue  # not ours, or being created right now
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its supervisor is alive
            finally:
                os.close(fd)
            shutil.rmtree(entry.path, ignore_errors=True)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._lock)


@dataclass
class Worker:
    index: int
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default=0.0)


class Supervisor:
    def __init__(self, argv: list[str], workers: int, metrics_listen: str, grace_period: float,
                 policies: LastGoodPolicies | None = None) -> None:
        self.argv = argv
        #: followed here too, so a restarted worker gets the set its siblings serve (policy.handover)
        self.policies = policies
        self.workers = [Worker(i) for i in range(workers)]
        self.metrics_listen = metrics_listen
        self.grace_period = grace_period
        self._stopping = False
        self._hup = False
        #: 0, or EXIT_CONFIG when a worker exited because of its configuration
        self.exit_code = 0
        #: the restart counter, when there is an aggregated /metrics to show it
        self._restarts: Counter | None = None

    def _command(self) -> list[str]:
        # Later flags win in argparse: each worker is a plain single-process server.
        return [sys.executable, "-m", "authz_server", *self.argv, "--workers", "1", "--metrics-listen", "off"]

    def _start(self, worker: Worker) -> None:
        from authz_server.policy import handover

        env = {**os.environ, "AUTHZ_WORKER_ID": str(worker.index)}
        last_good = self.policies.handover_fd() if self.policies is not None else None
        if last_good is not None:
            env[handover.ENV] = str(last_good)
        try:
            worker.process = subprocess.Popen(self._command(), env=env, stdin=subprocess.DEVNULL,
                                              preexec_fn=_die_with_parent,
                                              pass_fds=() if last_good is None else (last_good,))
        finally:
            if last_good is not None:
                os.close(last_good)
        worker.started_at = time.monotonic()
        log.info("worker %d started (pid %d)", worker.index, worker.process.pid)

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT (0), or until a worker reports a configuration error (2)."""
        metrics = MetricsDirectory.create() if self.metrics_listen else None
        if metrics is not None:
            from prometheus_client import Counter

            # Made here, after the directory is set, so its samples join the workers' in the
            # aggregated /metrics; not the workers' metrics module, whose zero-valued gauges would.
            self._restarts = Counter("authz_worker_restarts", "Worker processes the supervisor restarted after "
                                     "they exited", registry=None)
        try:
            endpoint = self._ops_endpoint(metrics.path) if metrics is not None else None
            signal.signal(signal.SIGTERM, self._on_stop)
            signal.signal(signal.SIGINT, self._on_stop)
            signal.signal(signal.SIGHUP, self._on_hup)
            try:
                for worker in self.workers:
                    self._start(worker)
                if endpoint is not None:
                    endpoint.start()
                while not self._stopping:
                    self._supervise(metrics.path if metrics else None)
                    time.sleep(POLL_SECONDS)
                self._drain()
            finally:
                if endpoint is not None:
                    endpoint.stop()
        finally:
            if metrics is not None:
                metrics.remove()
        if self.exit_code:
            log.error("stopped: a worker could not start with this configuration (see its error above)")
        else:
            log.info("all workers stopped")
        return self.exit_code

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self._hup = True

    def _supervise(self, metrics_dir: str | None) -> None:
        from prometheus_client import multiprocess

        now = time.monotonic()
        if self.policies is not None:
            self.policies.poll(now, force=self._hup)
        if self._hup:
            self._hup = False
            for worker in self.workers:
                if worker.process is not None and worker.process.poll() is None:
                    worker.process.send_signal(signal.SIGHUP)
        for worker in self.workers:
            if worker.process is None:
                if now >= worker.next_start:
                    self._start(worker)
                continue
            code = worker.process.poll()
            if code is None:
                continue
            if metrics_dir is not None:
                multiprocess.mark_process_dead(worker.process.pid, metrics_dir)
            if code == EXIT_CONFIG:
                # The start-up checks passed here, so this is what a worker alone can see (e.g. the
                # port taken meanwhile): restarting would fail the same way for ever.
                log.error("worker %d (pid %d) exited on a configuration error; stopping",
                          worker.index, worker.process.pid)
                worker.process = None
                self.exit_code = EXIT_CONFIG
                self._stopping = True
                return
            # Quick crash loops back off; a worker that ran a while restarts at once.
            stable = now - worker.started_at > MAX_BACKOFF_SECONDS
            worker.restarts = 0 if stable else worker.restarts + 1
            delay = min(MAX_BACKOFF_SECONDS, 0.5 * 2 ** worker.restarts) if worker.restarts else 0.0
            log.error("worker %d (pid %d) exited with %s; restarting in %.1fs",
                      worker.index, worker.process.pid, code, delay)
            if self._restarts is not None:
                self._restarts.inc()
            worker.process = None
            worker.next_start = now + delay

    def _drain(self) -> None:
        running = [w.process for w in self.workers if w.process is not None and w.process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_period + 5
        for process in running:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker pid %d did not stop in time; killing it", process.pid)
                process.kill()
                process.wait()

    def alive(self) -> bool:
        return any(w.process is not None and w.process.poll() is None for w in self.workers)

    def _ops_endpoint(self, metrics_dir: str) -> OpsEndpoint:
        """The aggregated /metrics and the health endpoints, bound before any worker starts."""
        from prometheus_client import CollectorRegistry, multiprocess

        from authz_server.observability.http_endpoint import OpsEndpoint

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, metrics_dir)

        def ready() -> tuple[bool, str]:
            running = sum(1 for w in self.workers if w.process is not None and w.process.poll() is None)
            if running < len(self.workers):
                return False, f"{running} of {len(self.workers)} workers running"
            for family in registry.collect():
                if family.name == "authz_worker_ready":
                    values = [s.value for s in family.samples]
                    if values and min(values) >= 1:
                        return True, f"{running} workers ready"
            return False, "workers not ready (policies or JWKS not loaded yet)"

        return OpsEndpoint.bind(self.metrics_listen, registry, ready, self.alive)
