"""Soak benchmark: every attack against each serving layer, and drains under load through Envoy.

    python -m loadtests.soak                       # both layers, every attack, 10 drains (~5 min)
    python -m loadtests.soak --layers fast --seconds 2 --drains 3

Part one — for each layer and each attack of :mod:`loadtests.h2_attacks` (plus the ``h2``
package parking request bodies): a fresh single-worker server, a legitimate client doing Checks at
``--rate`` per second on its own connection, the attack on another for ``--seconds``. Printed per
attack × layer: the legitimate Checks' failures (a 2 s deadline, Envoy's ext_authz timeout in the
kit) and p99, the server's peak RSS, how the abusive connection ended, and whether the server
logged a traceback. Targets (issue 10): 0 failures, p99 ≤ 50 ms, RSS ≤ 256 MB, GOAWAY where a limit
applies, no traceback.

Part two — SIGTERM drains: two instances of the server on one port (SO_REUSEPORT) behind a real
Envoy, h2load at ``--drain-rate`` req/s through Envoy; ``--drains`` times, one instance gets
SIGTERM, drains, exits, and a fresh one takes its place. Every request that does not come back 200
is a lost Check (Envoy answers 403 when ext_authz fails). Target: 0 lost.

Loopback only, bounded in time. Run it alone: ``flock /work/cpu.lock python -m loadtests.soak``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import re
import signal
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from authz_server.demo.processes import ManagedProcess, ProcessGroup, exit_on_sigterm, free_port
from authz_server.explain import check_request_from_description

from . import h2_attacks, measure, tokens
from .target import server_args
from .variants import Variant, envoy_config

LAYERS = ("fast", "grpcio")
CHECK_DEADLINE_S = 2.0
CODES = {0x0: "NO_ERROR", 0x1: "PROTOCOL_ERROR", 0x2: "INTERNAL_ERROR", 0xB: "ENHANCE_YOUR_CALM"}


@dataclass(frozen=True)
class SoakResult:
    attack: str
    layer: str
    checks: int
    failures: int
    p99_ms: float
    peak_rss_mb: float
    ended: str
    traceback: bool


def check_message(key: tokens.SigningKey) -> bytes:
    """A Check the bench policies allow (valid token, allowed group), as Envoy would send it."""
    return check_request_from_description({
        "method": "GET", "host": "bench.local", "path": "/",
        "headers": {"authorization": f"Bearer {key.mint('soak-legitimate')}"},
        "source": {"address": "127.0.0.1", "port": 40000},
        "destination": {"address": "127.0.0.1", "port": 8080, "labels": dict(tokens.WORKLOAD_LABELS)},
    }).SerializeToString()


def start_instance(group: ProcessGroup, policies: Path, port: int, layer: str, name: str) -> ManagedProcess:
    """One more server process on ``port``, as the replacement in a rolling restart.

    Started as a worker (``AUTHZ_WORKER_ID``), which the port claim lets share the port with the
    instance it replaces, as a supervisor's workers do; ready once *its own* log says it listens
    (the port is served already, so a health probe on it would prove nothing)."""
    args = [*server_args(1, layer), "--log-level", "INFO", "--grace-period", "5"]
    log = group.workdir / f"{name}.log"
    return group.start_authz_server(policies, port, args, name=name, env={"AUTHZ_WORKER_ID": name},
                                    ready=lambda: log.exists() and "gRPC listening on" in log.read_text())


def limits_counted(metrics_port: int) -> list[str]:
    """The limits the server counted (authz_http2_limit_exceeded_total), from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    found = re.findall(r'^authz_http2_limit_exceeded_total\{limit="([^"]+)"\} ([0-9.e+]+)$', text, re.MULTILINE)
    return [limit for limit, value in found if float(value) > 0]


def ended(received: h2_attacks.Received, limits: list[str]) -> str:
    """How the abusive connection ended: the GOAWAY it read (a peer that never reads may be reset
    before it can), and the limit the server counted."""
    seen = ("GOAWAY " + CODES.get(received.goaway_code or 0, hex(received.goaway_code or 0))
            if received.goaway else "closed" if received.closed else "open")
    return seen + (f" ({', '.join(limits)})" if limits else "")


def _attack_process(attack: str, port: int, message: bytes, seconds: float,
                    results: multiprocessing.Queue[h2_attacks.Received]) -> None:
    """The attacker, in a process of its own: it must not share the legitimate client's GIL."""
    known = {a.name: a for a in h2_attacks.ATTACKS}
    with h2_attacks.Running(known.get(attack, attack), port, message) as run:  # type: ignore[arg-type]
        run.stop.wait(seconds)
    results.put(run.received)


def soak_attack(group: ProcessGroup, policies: Path, message: bytes, layer: str, attack: str,
                seconds: float, rate: float) -> SoakResult:
    port, metrics_port = free_port(), free_port()
    process = group.start_authz_server(policies, port, [*server_args(1, layer), "--metrics-listen",
                                                        f"127.0.0.1:{metrics_port}"], name=f"{layer}-{attack}")
    spawn = multiprocessing.get_context("spawn")  # no fork of a process running grpc threads
    results: multiprocessing.Queue[h2_attacks.Received] = spawn.Queue()
    try:
        with h2_attacks.LegitimateClient(f"127.0.0.1:{port}", message, rate, CHECK_DEADLINE_S) as legit, \
                h2_attacks.PeakRss(process.pid) as rss:
            attacker = spawn.Process(target=_attack_process, args=(attack, port, message, seconds, results))
            attacker.start()
            time.sleep(seconds)
            legit.stop.set()  # measured while the attack runs, not after
            received = results.get(timeout=60)
            attacker.join(timeout=10)
        return SoakResult(attack, layer, len(legit.latencies) + len(legit.failures), len(legit.failures),
                          legit.p99_ms(), rss.peak / 2**20, ended(received, limits_counted(metrics_port)),
                          "Traceback" in process.log_path.read_text(errors="replace"))
    finally:
        process.popen.send_signal(signal.SIGTERM)
        process.popen.wait(timeout=30)


@dataclass(frozen=True)
class DrainResult:
    layer: str
    drains: int
    requests: int
    lost: int
    p99_ms: float


def soak_drains(group: ProcessGroup, key: tokens.SigningKey, policies: Path, layer: str, drains: int,
                rate: int, interval_s: float) -> DrainResult:
    """Two instances on one port behind Envoy; drain and replace one every ``interval_s``."""
    port = free_port()
    instances = [start_instance(group, policies, port, layer, f"drain-{layer}-{n}") for n in range(2)]
    variant = Variant(f"soak-{layer}", "server", serving=layer)
    envoy_port = free_port()
    group.start_envoy(f"envoy-{layer}", envoy_config(variant, listen_port=envoy_port, admin_port=free_port(),
                                                     authz_port=port, jwks=key.jwks))
    outcome: dict[str, measure.LoadResult] = {}
    load_s = drains * interval_s + 2 * interval_s
    load = threading.Thread(target=lambda: outcome.setdefault("load", measure.run_h2load_fixed_rate(
        envoy_port, rate=rate, duration_s=load_s, clients=4, token=key.mint("soak-drain"),
        log_path=group.workdir / f"h2load-{layer}.log")), daemon=True)
    load.start()
    time.sleep(interval_s)
    done = 0
    for n in range(drains):
        started = time.monotonic()
        victim = instances[n % 2]
        victim.popen.send_signal(signal.SIGTERM)
        if victim.popen.wait(timeout=30) != 0:
            raise RuntimeError(f"{victim.name} exited with {victim.popen.returncode}:\n{victim.log_tail()}")
        instances[n % 2] = start_instance(group, policies, port, layer, f"drain-{layer}-{n + 2}")
        done += 1
        time.sleep(max(0.0, interval_s - (time.monotonic() - started)))
    load.join(timeout=load_s + 60)
    result = outcome["load"]
    return DrainResult(layer, done, result.requests, result.non_2xx + result.socket_errors, result.p99_ms)


def table(results: list[SoakResult], drains: list[DrainResult]) -> str:
    lines = ["| attack | layer | legitimate Checks | failed | p99 ms | peak RSS MB | abusive connection | traceback |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.attack} | {r.layer} | {r.checks} | {r.failures} | {r.p99_ms:.1f} | {r.peak_rss_mb:.0f} "
              f"| {r.ended} | {'YES' if r.traceback else 'no'} |" for r in results]
    if drains:
        lines += ["", "| SIGTERM drains through Envoy | layer | drains | requests | lost Checks | p99 ms |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| two instances, one port | {d.layer} | {d.drains} | {d.requests} | {d.lost} | {d.p99_ms:.1f} |"
                  for d in drains]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    names = [a.name for a in h2_attacks.ATTACKS] + ["body_parking"]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default=",".join(LAYERS), help="comma-separated serving layers [fast,grpcio]")
    parser.add_argument("--attacks", default=",".join(names), help=f"comma-separated, of: {', '.join(names)}")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per attack [4]")
    parser.add_argument("--rate", type=float, default=100.0, help="legitimate Checks per second [100]")
    parser.add_argument("--drains", type=int, default=10, help="SIGTERM drains per layer (0 = none) [10]")
    parser.add_argument("--drain-rate", type=int, default=400, help="req/s through Envoy while draining [400]")
    parser.add_argument("--drain-interval", type=float, default=3.0, help="seconds between drains [3]")
    parser.add_argument("--workdir", type=Path, help="logs and keys [a temporary directory]")
    args = parser.parse_args(argv)
    layers = [layer for layer in args.layers.split(",") if layer]
    attacks = [name for name in args.attacks.split(",") if name]
    unknown = sorted(set(attacks) - set(names)) + sorted(set(layers) - set(LAYERS))
    if unknown:
        parser.error(f"unknown attack or layer: {', '.join(unknown)}")
    exit_on_sigterm()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    key = tokens.SigningKey.generate()
    policies = tokens.write_policies(key, workdir / "policies.yaml")
    message = check_message(key)
    results: list[SoakResult] = []
    drains: list[DrainResult] = []
    with ProcessGroup(workdir / "processes") as group:
        for layer in layers:
            for attack in attacks:
                result = soak_attack(group, policies, message, layer, attack, args.seconds, args.rate)
                results.append(result)
                print(f"  {layer:<7} {attack:<24} failed {result.failures:>4}/{result.checks:<5} "
                      f"p99 {result.p99_ms:7.1f} ms  RSS {result.peak_rss_mb:5.0f} MB  {result.ended}", flush=True)
        for layer in layers if args.drains else ():
            drain = soak_drains(group, key, policies, layer, args.drains, args.drain_rate, args.drain_interval)
            drains.append(drain)
            print(f"  {layer:<7} {drain.drains} drains: {drain.lost} of {drain.requests} Checks lost", flush=True)
    print(table(results, drains))
    print(f"logs: {workdir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
