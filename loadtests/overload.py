"""The overload scenario of the benchmark: ``python -m loadtests.bench --overload [--baseline PATH]``.

Issue 15: with more Checks offered than a worker can evaluate, a server that evaluates every Check
in arrival order spends its CPU on Checks Envoy has already given up on, and useful throughput
falls to nothing. This scenario makes the server the bottleneck — N AuthorizationPolicies in the
workload's scope (DENY rules with only ``notPaths``/``notMethods``: no rule index can narrow
them, so every Check tries them all) — and drives it through a real Envoy whose ext_authz filter
has the timeout istiod renders for the provider (``--authz-timeout``; the chart's default is
500 ms) and ``statusOnError: 503`` (so a failed Check is told from a policy deny):

1. **capacity** — h2load closed loop at moderate concurrency (the server saturated, its queue
   short): allowed requests per second and their p99;
2. **overload** — h2load at ``--overload-factor`` × that capacity (2× by default), open loop
   (enough streams that the rate holds while answers take up to the timeout): **goodput**
   (allowed requests per second, each within Envoy's timeout, or it would have failed), the share
   **refused early** (the server's ``authz_checks_refused_total``, answered at once), the share
   **failed late** (503 after half the timeout or more: Envoy's timeout, or a Check expired in the
   server), and the **p99 of accepted Checks** (the allowed requests).

Each variant — this server (``server-w1``) and, with ``--baseline``, the same server from another
source tree (``baseline-w1``, e.g. main) — gets the same policies and Envoy; rounds interleave
them. Targets (the issue's): goodput ≥ 80 % of capacity, p99 of accepted ≤ 2× their p99 at
capacity. Results: ``overload.json`` and ``overload.md`` in the output directory.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import yaml

from authz_server.demo import envoy_config as ec
from authz_server.demo.processes import ProcessGroup

from . import measure, tokens
from .target import Target, start_target
from .variants import STREAMS_PER_CONNECTION, Variant

#: goodput under overload at least this share of capacity; accepted p99 at most this multiple
GOODPUT_TARGET = 0.8
P99_TARGET = 2.0
STATUS_ON_ERROR = 503


@dataclass(frozen=True)
class OverloadSettings:
    trials: int = 3
    duration_s: float = 10.0
    warmup_s: float = 2.0
    #: Envoy's ext_authz timeout (istiod renders the provider's ``timeout``)
    authz_timeout_s: float = 0.5
    #: AuthorizationPolicies in scope: what makes a Check expensive
    policies: int = 2000
    factor: float = 2.0
    #: closed-loop concurrency of the capacity run: h2load clients × streams
    capacity_clients: int = 4
    capacity_streams: int = 4
    #: the open-loop run: enough streams that the rate holds while answers take the timeout
    overload_clients: int = 32
    overload_streams: int = 32


SMOKE = OverloadSettings(trials=1, duration_s=2.0, warmup_s=0.0, policies=500)


def policy_documents(key: tokens.SigningKey, count: int) -> list[dict[str, Any]]:
    """The benchmark's RequestAuthentication and ALLOW, plus *count* DENY policies that never
    match a real request and that every Check must try (``notPaths: ["/*"]``: no index key)."""
    deny = [{
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": f"overload-{i:05d}", "namespace": tokens.NAMESPACE},
        "spec": {"selector": {"matchLabels": dict(tokens.WORKLOAD_LABELS)}, "action": "DENY",
                 "rules": [{"to": [{"operation": {"notPaths": ["/*"], "notMethods": [f"M{i}"]}}]}]},
    } for i in range(count)]
    return [*tokens.policy_documents(key), *deny]


def variants(baseline: str) -> list[Variant]:
    found = [Variant("server-w1", "server", 1, label="authz-server (this tree), 1 worker")]
    if baseline:
        found.append(Variant("baseline-w1", "server", 1, label=f"authz-server from {baseline}, 1 worker",
                             source=baseline))
    return found


def run(settings: OverloadSettings, out: Path, baseline: str = "") -> dict[str, Any]:
    """Start every variant behind its Envoy, run the interleaved rounds, write and return results."""
    out.mkdir(parents=True, exist_ok=True)
    key = tokens.SigningKey.generate()
    policies = out / "overload-policies.yaml"
    policies.write_text(yaml.safe_dump_all(policy_documents(key, settings.policies), sort_keys=False))
    token = key.mint("bench-overload")
    authz = ec.AuthzSettings(port=0, timeout_s=settings.authz_timeout_s,
                             max_concurrent_streams=STREAMS_PER_CONNECTION, status_on_error=STATUS_ON_ERROR)
    chosen = variants(baseline)
    trials: list[dict[str, Any]] = []
    with ProcessGroup(out / "overload-processes") as group:
        targets = [start_target(group, variant, key, policies, authz=authz) for variant in chosen]
        log = out / "overload-processes" / "h2load.log"
        if settings.warmup_s:
            for target in targets:
                closed_loop(target, settings, settings.warmup_s, token, log)
        for round_no in range(settings.trials):
            order = targets[round_no % len(targets):] + targets[: round_no % len(targets)]
            for target in order:
                cpu_before = server_cpu_s(target)
                capacity = measured(closed_loop(target, settings, settings.duration_s, token, log), settings)
                capacity["server_busy"] = (server_cpu_s(target) - cpu_before) / capacity["duration_s"]
                rate = round(capacity["goodput_rps"] * settings.factor)
                refused_before, cpu_before = refused(target), server_cpu_s(target)
                overload = measured(open_loop(target, settings, rate, token, log), settings)
                overload["refused_early"] = (refused(target) - refused_before) / max(1, overload["requests"])
                overload["server_busy"] = (server_cpu_s(target) - cpu_before) / overload["duration_s"]
                overload["drain_s"] = drained(target)
                trial = {"variant": target.variant.name, "round": round_no, "capacity": capacity,
                         "offered_rps": rate, "overload": overload}
                trials.append(trial)
                print(f"  round {round_no} {target.variant.name:<12} capacity {capacity['goodput_rps']:6.0f}/s "
                      f"p99 {capacity['p99_ms']:6.1f} ms | offered {rate}/s: goodput {overload['goodput_rps']:6.0f}/s "
                      f"refused {overload['refused_early']:5.1%} late {overload['failed_late']:5.1%} "
                      f"p99 {overload['p99_ms']:6.1f} ms | server CPU {capacity['server_busy']:.0%} / "
                      f"{overload['server_busy']:.0%}, busy {overload['drain_s']:.1f} s after", flush=True)
    results = {"settings": asdict(settings), "variants": [{"name": v.name, "label": v.label} for v in chosen],
               "rows": [summarise(v.name, [t for t in trials if t["variant"] == v.name]) for v in chosen],
               "trials": trials}
    (out / "overload.json").write_text(json.dumps(results, indent=2))
    (out / "overload.md").write_text(markdown(results))
    return results


def closed_loop(target: Target, settings: OverloadSettings, duration_s: float, token: str,
                log: Path) -> tuple[list[tuple[int, int, int]], float]:
    return _h2load(target, settings.capacity_clients, settings.capacity_streams, duration_s, None, token, log)


def open_loop(target: Target, settings: OverloadSettings, rate: int, token: str,
              log: Path) -> tuple[list[tuple[int, int, int]], float]:
    per_client = max(1, round(rate / settings.overload_clients))
    return _h2load(target, settings.overload_clients, settings.overload_streams, settings.duration_s, per_client,
                   token, log)


def _h2load(target: Target, clients: int, streams: int, duration_s: float, rate_per_client: int | None,
            token: str, log: Path) -> tuple[list[tuple[int, int, int]], float]:
    """h2load for *duration_s* (open loop when *rate_per_client* is set): every request, and the
    duration they span."""
    argv = ["h2load", "-c", str(clients), "-m", str(streams), "-D", str(max(1, round(duration_s))),
            "-H", f"authorization: Bearer {token}", "--log-file", str(log)]
    if rate_per_client is not None:
        argv += ["--rps", str(rate_per_client)]
    log.unlink(missing_ok=True)  # h2load appends to an existing log
    subprocess.run([*argv, f"http://127.0.0.1:{target.envoy_port}/"], capture_output=True, check=True)
    requests = measure.h2load_log(log)
    if not requests:
        raise RuntimeError(f"h2load logged no request against {target.variant.name}")
    span_us = max(s + e for s, _, e in requests) - min(s for s, _, _ in requests)
    return requests, span_us / 1e6


def measured(run_result: tuple[list[tuple[int, int, int]], float], settings: OverloadSettings) -> dict[str, Any]:
    """Goodput, failures early and late, the p99 of allowed requests."""
    requests, duration_s = run_result
    allowed = sorted(elapsed for _, status, elapsed in requests if status == 200)
    late = settings.authz_timeout_s * 1e6 / 2
    failed = [elapsed for _, status, elapsed in requests if status != 200]
    return {
        "requests": len(requests),
        "duration_s": duration_s,
        "goodput_rps": len(allowed) / duration_s if duration_s else 0.0,
        "allowed": len(allowed),
        "failed_late": sum(e >= late for e in failed) / len(requests),
        "failed_early": sum(e < late for e in failed) / len(requests),
        "p99_ms": _p99(allowed) / 1e3,
        "statuses": sorted({status for _, status, _ in requests}),
    }


def server_cpu_s(target: Target) -> float:
    return measure.usage(target.backend_pid).total_s if target.backend_pid else 0.0


def drained(target: Target, idle: float = 0.1, step_s: float = 0.5, limit_s: float = 60.0) -> float:
    """Wait until the server is idle (under *idle* of a core over *step_s*), at most *limit_s*:
    seconds waited. A server that queued Checks Envoy gave up on keeps evaluating them after the
    load stops; that backlog must not be charged to the next phase (its own or another variant's)."""
    start = time.monotonic()
    before = server_cpu_s(target)
    while time.monotonic() - start < limit_s:
        time.sleep(step_s)
        now = server_cpu_s(target)
        if now - before < idle * step_s:
            break
        before = now
    return time.monotonic() - start


def refused(target: Target) -> float:
    """The server's authz_checks_refused_total, every reason (0 for a server without it)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{target.metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("authz_checks_refused_total{"))


def _p99(sorted_values: Sequence[int]) -> float:
    if not sorted_values:
        return float("nan")
    return float(sorted_values[min(len(sorted_values) - 1, int(0.99 * len(sorted_values)))])


def summarise(variant: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds, and the targets on them."""
    def median(path: tuple[str, ...]) -> float:
        values = []
        for run_ in runs:
            value: Any = run_
            for key in path:
                value = value[key]
            values.append(value)
        return statistics.median(values)

    row = {
        "variant": variant,
        "trials": len(runs),
        "capacity_rps": median(("capacity", "goodput_rps")),
        "capacity_p99_ms": median(("capacity", "p99_ms")),
        "offered_rps": median(("offered_rps",)),
        "goodput_rps": median(("overload", "goodput_rps")),
        "refused_early": median(("overload", "refused_early")),
        "failed_late": median(("overload", "failed_late")),
        "p99_ms": median(("overload", "p99_ms")),
        "capacity_server_busy": median(("capacity", "server_busy")),
        "server_busy": median(("overload", "server_busy")),
    }
    row["goodput_share"] = row["goodput_rps"] / row["capacity_rps"] if row["capacity_rps"] else 0.0
    row["p99_ratio"] = row["p99_ms"] / row["capacity_p99_ms"] if row["capacity_p99_ms"] else float("inf")
    row["goodput_target_met"] = row["goodput_share"] >= GOODPUT_TARGET
    row["p99_target_met"] = row["p99_ratio"] <= P99_TARGET
    return row


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        f"### Overload: {s['factor']:g}× capacity through Envoy (ext_authz timeout {s['authz_timeout_s'] * 1000:.0f} ms, "
        f"{s['policies']:,} policies in scope, 1 worker)",
        "",
        f"Medians of {s['trials']} interleaved rounds of {s['duration_s']:g} s per phase. Capacity: h2load closed loop, "
        f"{s['capacity_clients'] * s['capacity_streams']} streams. Overload: h2load open loop at "
        f"{s['factor']:g}× that. Goodput = allowed requests/s (each within Envoy's timeout); refused early = the "
        "server's RESOURCE_EXHAUSTED answers; failed late = 503 after half the timeout or more (Envoy's timeout, "
        "or expired in the server).",
        "",
        "| variant | capacity req/s | p99 at capacity | offered req/s | goodput req/s | goodput / capacity "
        "| refused early | failed late | p99 of accepted | p99 / p99 at capacity | server CPU (capacity / overload) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['variant']} | {row['capacity_rps']:,.0f} | {row['capacity_p99_ms']:.1f} ms | {row['offered_rps']:,.0f} "
            f"| {row['goodput_rps']:,.0f} | {_mark(row['goodput_share'], row['goodput_target_met'], '{:.0%}')} "
            f"| {row['refused_early']:.1%} | {row['failed_late']:.1%} | {row['p99_ms']:.1f} ms "
            f"| {_mark(row['p99_ratio'], row['p99_target_met'], '{:.2f}×')} "
            f"| {row['capacity_server_busy']:.0%} / {row['server_busy']:.0%} |")
    lines += ["", f"Targets: goodput ≥ {GOODPUT_TARGET:.0%} of capacity, p99 of accepted ≤ {P99_TARGET:g}× "
              "their p99 at capacity (✅ met, ❌ not).", ""]
    return "\n".join(lines)


def _mark(value: float, met: bool, fmt: str) -> str:
    return f"{fmt.format(value)} {'✅' if met else '❌'}"
