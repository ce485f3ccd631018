"""Drive load at a target and charge the CPU it cost to Envoy and to the backend.

Two load generators, both Debian packages:

* ``wrk`` (HTTP/1.1, closed loop, ``-c`` connections) for maximum throughput, with
  ``wrk_report.lua`` reporting percentiles as JSON and optionally rotating a token pool;
* ``h2load --rps`` (HTTP/2 cleartext: its rate pacing only works over h2) for a fixed request rate,
  with per-request latencies taken from its ``--log-file`` (h2load prints no percentiles).

CPU comes from ``/proc/<pid>/stat`` (utime + stime) before and after each run, summed over the
process and all its descendants, so a multi-process server is charged for every worker.
Context switches (``/proc/<pid>/status``) are summed the same way, over every thread. The
machine's total busy CPU (``/proc/stat``) and the load generator's (``RUSAGE_CHILDREN``) are taken
too, so the report can show how much CPU *other* work on the machine took during a trial.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_LUA = Path(__file__).with_name("wrk_report.lua")


@dataclass(frozen=True)
class LoadResult:
    """What one load-generator run saw."""

    requests: int
    duration_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0


@dataclass(frozen=True)
class Usage:
    """CPU seconds and context switches of a process tree, per pid (for the worker split)."""

    cpu_s: dict[int, float] = field(default_factory=dict)
    switches: int = 0

    def minus(self, before: "Usage") -> "Usage":
        cpu = {pid: s - before.cpu_s.get(pid, 0.0) for pid, s in self.cpu_s.items()}
        return Usage(cpu, self.switches - before.switches)

    @property
    def total_s(self) -> float:
        return sum(self.cpu_s.values())


def run_wrk(
    port: int,
    *,
    duration_s: float,
    connections: int,
    threads: int,
    token: str | None = None,
    token_file: Path | None = None,
) -> LoadResult:
    """Closed-loop max throughput: one static token (*token*) or a rotating pool (*token_file*)."""
    argv = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration_s))}s",
        "--timeout", "5s", "-s", str(_LUA),
    ]
    if token is not None:
        argv += ["-H", f"Authorization: Bearer {token}"]
    env = {**os.environ}
    env.pop("WRK_TOKENS", None)
    if token_file is not None:
        env["WRK_TOKENS"] = str(token_file)
    argv.append(f"http://127.0.0.1:{port}/")
    out = subprocess.run(argv, capture_output=True, text=True, env=env, check=True).stdout
    line = next((l for l in out.splitlines() if l.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no WRK_JSON line:\n{out}")
    data = json.loads(line.removeprefix("WRK_JSON "))
    return LoadResult(
        requests=data["requests"],
        duration_s=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1e3,
        p90_ms=data["p90_us"] / 1e3,
        p99_ms=data["p99_us"] / 1e3,
        non_2xx=data["non2xx"],
        socket_errors=sum(data[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts")),
    )


def run_h2load_fixed_rate(
    port: int, *, rate: int, duration_s: float, clients: int, token: str, log_path: Path
) -> LoadResult:
    """Open-ish loop at *rate* req/s over *clients* h2 connections (up to 8 streams each)."""
    per_client = max(1, round(rate / clients))
    total = per_client * clients * max(1, round(duration_s))
    argv = [
        "h2load", "-c", str(clients), "-m", "8", "--rps", str(per_client), "-n", str(total),
        "-H", f"authorization: Bearer {token}", "--log-file", str(log_path),
        f"http://127.0.0.1:{port}/",
    ]
    log_path.unlink(missing_ok=True)  # h2load appends to an existing log
    subprocess.run(argv, capture_output=True, text=True, check=True)
    logged = h2load_log(log_path)
    if not logged:
        raise RuntimeError("h2load logged no request")
    starts = [start for start, _, _ in logged]
    ends = [start + elapsed for start, _, elapsed in logged]
    latencies_us = [elapsed for _, _, elapsed in logged]
    non_2xx = sum(not 200 <= status < 400 for _, status, _ in logged)
    cuts = statistics.quantiles(latencies_us, n=100, method="inclusive")
    return LoadResult(
        requests=len(latencies_us),
        duration_s=(max(ends) - min(starts)) / 1e6,
        p50_ms=cuts[49] / 1e3,
        p90_ms=cuts[89] / 1e3,
        p99_ms=cuts[98] / 1e3,
        non_2xx=non_2xx,
        socket_errors=total - len(latencies_us),
    )


def h2load_log(log_path: Path) -> list[tuple[int, int, int]]:
    """Every request of an h2load ``--log-file``: (start µs, HTTP status, latency µs)."""
    requests = []
    for line in log_path.read_text().splitlines():
        start, status, elapsed = line.split("\t")
        requests.append((int(start), int(status), int(elapsed)))
    return requests


def usage(root_pid: int) -> Usage:
    """CPU seconds per process and total context switches of *root_pid* and its descendants."""
    pids = [root_pid, *_descendants(root_pid)]
    cpu: dict[int, float] = {}
    switches = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            cpu[pid] = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime
            switches += _switches(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited between the listing and the read
    return Usage(cpu, switches)


def rss_mb(root_pid: int) -> float:
    """Resident memory of *root_pid* and its descendants (``VmRSS``), in MiB."""
    total_kb = 0
    for pid in (root_pid, *_descendants(root_pid)):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total_kb / 1024


def checks_per_worker(log_path: Path) -> list[int]:
    """Decision-log lines per worker (``"worker":N``) in a server's log, the busiest first.

    The exact split of Checks over a multi-worker server, where the CPU split only suggests it.
    """
    counts: dict[int, int] = {}
    with log_path.open("rb") as log:
        for line in log:
            at = line.find(b'"worker":')
            if line.startswith(b"{") and at >= 0:
                worker = int(line[at + 9:].split(b",", 1)[0].split(b"}", 1)[0])
                counts[worker] = counts.get(worker, 0) + 1
    return sorted(counts.values(), reverse=True)


def machine_busy_s() -> float:
    """CPU seconds all cores spent not idle since boot (``/proc/stat``, idle and iowait excluded)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / _CLOCK_TICKS


def children_cpu_s() -> float:
    """CPU seconds of this process's reaped children: wrk and h2load, once each run returns."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _switches(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def _descendants(root_pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [root_pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found
