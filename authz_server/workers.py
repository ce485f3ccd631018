"""Several worker processes on one gRPC port, supervised: the way to use every core.

One Python process decides on one core. ``--workers N`` starts N copies of the single-process
server, each binding the same port with SO_REUSEPORT (the kernel spreads *connections* among
them — Envoy must open several, see the deploy docs). The supervisor restarts a worker that
dies, forwards SIGHUP, drains everyone on SIGTERM, and serves the aggregated metrics and the
health endpoints (Prometheus multiprocess mode over a private directory).
"""

from __future__ import annotations

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
    from authz_server.observability.http_endpoint import OpsEndpoint

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2
MAX_BACKOFF_SECONDS = 30.0


@dataclass
class Worker:
    index: int
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default=0.0)


class Supervisor:
    def __init__(self, argv: list[str], workers: int, metrics_listen: str, grace_period: float) -> None:
        self.argv = argv
        self.workers = [Worker(i) for i in range(workers)]
        self.metrics_listen = metrics_listen
        self.grace_period = grace_period
        self._stopping = False
        self._hup = False

    def _command(self) -> list[str]:
        # Later flags win in argparse: each worker is a plain single-process server.
        return [sys.executable, "-m", "authz_server", *self.argv, "--workers", "1", "--metrics-listen", "off"]

    def _start(self, worker: Worker) -> None:
        env = {**os.environ, "AUTHZ_WORKER_ID": str(worker.index)}
        worker.process = subprocess.Popen(self._command(), env=env, stdin=subprocess.DEVNULL)
        worker.started_at = time.monotonic()
        log.info("worker %d started (pid %d)", worker.index, worker.process.pid)

    def run(self) -> int:
        metrics_dir = tempfile.mkdtemp(prefix="authz-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        endpoint = self._ops_endpoint(metrics_dir) if self.metrics_listen else None
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        try:
            for worker in self.workers:
                self._start(worker)
            if endpoint is not None:
                endpoint.start()
            while not self._stopping:
                self._supervise(metrics_dir)
                time.sleep(POLL_SECONDS)
            self._drain()
        finally:
            if endpoint is not None:
                endpoint.stop()
            shutil.rmtree(metrics_dir, ignore_errors=True)
        log.info("all workers stopped")
        return 0

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self._hup = True

    def _supervise(self, metrics_dir: str) -> None:
        from prometheus_client import multiprocess

        now = time.monotonic()
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
            multiprocess.mark_process_dead(worker.process.pid, metrics_dir)
            # Quick crash loops back off; a worker that ran a while restarts at once.
            stable = now - worker.started_at > MAX_BACKOFF_SECONDS
            worker.restarts = 0 if stable else worker.restarts + 1
            delay = min(MAX_BACKOFF_SECONDS, 0.5 * 2 ** worker.restarts) if worker.restarts else 0.0
            log.error("worker %d (pid %d) exited with %s; restarting in %.1fs",
                      worker.index, worker.process.pid, code, delay)
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

        return OpsEndpoint(self.metrics_listen, registry, ready, self.alive)
