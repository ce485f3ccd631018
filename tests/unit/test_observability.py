"""Batched observability: per-Check metrics and decision-log lines, cheap, complete and never blocking."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import threading

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from authz_server.authorizer import Verdict
from authz_server.engine.decide import DryRunResult
from authz_server.engine.request import RequestAttributes, Workload, parse_ip
from authz_server.observability import decision_log, metrics
from authz_server.policy.model import Action


def verdict(allowed: bool = True, policy: str = "foo/p", **kw) -> Verdict:
    return Verdict(allowed, 200 if allowed else 403, "", "allowed_by_policy" if allowed else "no_allow_match",
                   "detail", policy, 0 if policy else None, **kw)


@pytest.fixture
def prometheus(monkeypatch: pytest.MonkeyPatch) -> CollectorRegistry:
    """Fresh Prometheus metrics of the same names, so counts start at zero."""
    registry = CollectorRegistry()
    monkeypatch.setattr(metrics, "CHECKS", Counter("authz_checks_total", "", ["decision", "reason"], registry=registry))
    monkeypatch.setattr(metrics, "CHECK_POLICY", Counter("authz_check_policy_total", "", ["policy", "decision"],
                                                         registry=registry))
    monkeypatch.setattr(metrics, "CHECK_LATENCY", Histogram("authz_check_duration_seconds", "", registry=registry,
                                                            buckets=metrics.LATENCY_BUCKETS))
    monkeypatch.setattr(metrics, "JWT_RESULTS", Counter("authz_jwt_total", "", ["issuer", "result"], registry=registry))
    monkeypatch.setattr(metrics, "DRY_RUN", Counter("authz_dry_run_total", "", ["action", "result", "policy"],
                                                    registry=registry))
    return registry


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def test_recorded_checks_reach_prometheus_on_flush_with_their_labels(prometheus: CollectorRegistry) -> None:
    recorder = metrics.CheckRecorder()
    dry = (DryRunResult(Action.DENY, "denied", "ns[foo]-policy[d]-rule[0]", "foo/d"),)
    for _ in range(3):
        recorder.record(verdict(jwt_result="ok", jwt_issuer="https://attacker.example"), 0.0003)
    recorder.record(verdict(False, "", dry_run=dry), 0.002)
    assert sample(prometheus, "authz_checks_total", decision="allow", reason="allowed_by_policy") == 0
    recorder.flush()
    assert sample(prometheus, "authz_checks_total", decision="allow", reason="allowed_by_policy") == 3
    assert sample(prometheus, "authz_checks_total", decision="deny", reason="no_allow_match") == 1
    assert sample(prometheus, "authz_check_policy_total", policy="foo/p", decision="allow") == 3
    assert sample(prometheus, "authz_jwt_total", issuer="unconfigured", result="ok") == 3
    assert sample(prometheus, "authz_dry_run_total", action="DENY", result="denied", policy="foo/d") == 1
    assert sample(prometheus, "authz_check_duration_seconds_count") == 4
    assert sample(prometheus, "authz_check_duration_seconds_bucket", le="0.0005") == 3
    assert sample(prometheus, "authz_check_duration_seconds_bucket", le="0.0025") == 4
    assert sample(prometheus, "authz_check_duration_seconds_sum") == pytest.approx(0.0029)
    recorder.flush()  # nothing new: nothing added twice
    assert sample(prometheus, "authz_checks_total", decision="allow", reason="allowed_by_policy") == 3


def test_checks_answered_in_one_pass_of_the_loop_are_in_prometheus_once_it_comes_round(
    prometheus: CollectorRegistry,
) -> None:
    recorder = metrics.CheckRecorder()

    async def serve() -> tuple[float, float]:
        for _ in range(5):
            recorder.record(verdict(), 0.0001)
        before = sample(prometheus, "authz_checks_total", decision="allow", reason="allowed_by_policy")
        await asyncio.sleep(0)  # the loop's next pass: the flush scheduled by the first record runs
        after = sample(prometheus, "authz_checks_total", decision="allow", reason="allowed_by_policy")
        recorder.record(verdict(), 0.0001)
        await asyncio.sleep(0)
        return before, after

    assert asyncio.run(serve()) == (0, 5)
    assert sample(prometheus, "authz_checks_total", decision="allow", reason="allowed_by_policy") == 6
    assert sample(prometheus, "authz_check_duration_seconds_count") == 6


def test_many_label_combinations_are_flushed_early_and_forgotten(
    prometheus: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics, "MAX_PENDING_KEYS", 10)
    recorder = metrics.CheckRecorder()
    for i in range(100):
        recorder.record(verdict(jwt_result=f"r{i}"), 0.0001)
    assert len(recorder._counts) <= metrics.MAX_PENDING_KEYS + 1
    recorder.flush()
    assert sample(prometheus, "authz_checks_total", decision="allow", reason="allowed_by_policy") == 100


ATTRS = RequestAttributes(method="GET", host="h", path="/p", raw_path="/p", headers={"x-request-id": "r"},
                          source_ip=parse_ip("10.0.0.1"), workload=Workload("foo"))


def test_lines_are_written_by_the_writer_thread_in_atomic_runs_of_whole_lines(tmp_path) -> None:
    read_fd, write_fd = os.pipe()
    out = os.fdopen(write_fd, "w")
    log = decision_log.DecisionLog(out)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(read_fd, 1 << 20), b"")))
    reader.start()
    long_path = RequestAttributes(method="GET", host="h", path="/" + "x" * 10_000, workload=Workload("foo"))
    for i in range(2_000):
        log.record(verdict(), long_path if i == 1_000 else ATTRS, 0.0001)
    log.close()
    out.close()
    reader.join(timeout=30)
    lines = b"".join(chunks).decode().splitlines()
    assert len(lines) == 2_000
    assert all(json.loads(line)["decision"] == "allow" for line in lines)
    # Writes of up to PIPE_BUF are atomic, so no read ends inside a short line; the one line longer
    # than that is written alone, and the kernel may hand the reader part of it.
    data = b"".join(chunks)
    long_start = data.index(b"x" * 100)
    long_end = data.index(b"\n", long_start)
    read_ends = itertools.accumulate(len(chunk) for chunk in chunks)
    assert all(data[end - 1:end] == b"\n" or long_start < end <= long_end for end in read_ends)


def test_a_blocked_output_drops_counted_lines_instead_of_blocking_checks(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(decision_log, "MAX_QUEUED_BYTES", 256 * 1024)
    read_fd, write_fd = os.pipe()  # nobody reads until the end: the pipe fills and the writer blocks
    out = os.fdopen(write_fd, "w")
    dropped: list[int] = []
    log = decision_log.DecisionLog(out, on_drop=dropped.append)
    total = 20_000

    def checks() -> None:
        for _ in range(total):
            log.record(verdict(), ATTRS, 0.0001)
        log.flush()

    worker = threading.Thread(target=checks)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive(), "recording blocked on the output"
    data = bytearray()
    reader = threading.Thread(target=lambda: data.extend(b"".join(iter(lambda: os.read(read_fd, 1 << 20), b""))))
    reader.start()
    log.close(timeout=30)
    out.close()
    reader.join(timeout=30)
    lines = data.decode().splitlines()
    assert dropped and sum(dropped) + len(lines) == total
    warned = [int(n) for n in re.findall(r"(\d+) lines dropped", caplog.text)]
    assert sum(warned) == sum(dropped)  # said once the output moved again
    assert all(json.loads(line)["status"] == 200 for line in lines)


def test_a_regular_file_gets_whole_batches_and_every_line(tmp_path) -> None:
    path = tmp_path / "decisions.log"
    with path.open("w") as out:
        log = decision_log.DecisionLog(out)
        for _ in range(3_000):
            log.record(verdict(), ATTRS, 0.0001)
        log.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 3_000 and all(json.loads(line)["request_id"] == "r" for line in lines)
