"""Side-by-side benchmark through a real Envoy: ``python -m loadtests.bench [--smoke]``.

All variants (:mod:`loadtests.variants`) run at once, idle but for the one under load, and the
trials are interleaved: each round runs every scenario on every variant in turn (the variant order
rotating per round), so machine noise spreads over all variants alike instead of biasing the one
that happened to run during it. Scenarios:

* ``max/repeated`` — wrk, one valid token on every request (a cached token for the server);
* ``max/pool`` — wrk rotating a pool of distinct valid tokens, fresh for every round, so each
  round's tokens are new to every cache and verified once per token;
* ``fixed-<R>/repeated`` — h2load at R req/s: latency when nothing is saturated;
* the policy-count scale — ``max/repeated`` on ``scale-<N>`` variants: the same server with N
  AuthorizationPolicies in scope (only the benchmark's own matching, and it last), with the time
  from start to ready and the resident memory of each.
* ``--overload`` instead: the overload scenario (:mod:`loadtests.overload`) — goodput, early
  refusals and the p99 of accepted Checks at twice the server's capacity, with its own table.

Every server variant also reports its start-to-ready time and RSS after the load; multi-worker
variants with the decision log on report the exact split of Checks over their workers.

Results (JSON, Markdown, PNG) go to ``loadtests/results/<timestamp>/`` unless ``--out`` says.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from authz_server.demo.processes import ProcessGroup, exit_on_sigterm

from . import measure, overload, report, tokens
from .target import Target, start_target
from .variants import Variant, scale_variants, standard_variants

RESULTS = Path(__file__).with_name("results")


@dataclass(frozen=True)
class Scenario:
    """A load shape: closed-loop max throughput, or a fixed rate (req/s)."""

    name: str
    shape: str  # "repeated" | "pool"
    rate: int | None = None


@dataclass(frozen=True)
class Settings:
    trials: int
    duration_s: float
    fixed_duration_s: float
    warmup_s: float
    connections: int
    wrk_threads: int
    pool_size: int
    rates: tuple[int, ...]
    fixed_clients: int
    workers: int
    #: policies in scope for the policy-count scale (the 1-policy point is ``server-w1``)
    policy_counts: tuple[int, ...]


FULL = Settings(trials=3, duration_s=3, fixed_duration_s=3, warmup_s=2, connections=64, wrk_threads=1,
                pool_size=5000, rates=(300, 1000), fixed_clients=10, workers=2, policy_counts=(100, 1000, 5000))
SMOKE = Settings(trials=1, duration_s=1, fixed_duration_s=1, warmup_s=0, connections=32, wrk_threads=1,
                 pool_size=200, rates=(100,), fixed_clients=4, workers=2, policy_counts=(50,))
SCALE_SCENARIO = "max/repeated"


def scenarios(settings: Settings) -> list[Scenario]:
    fixed = [Scenario(f"fixed-{rate}/repeated", "repeated", rate) for rate in settings.rates]
    return [Scenario("max/repeated", "repeated"), Scenario("max/pool", "pool"), *fixed]


def run_trial(
    target: Target, scenario: Scenario, settings: Settings, token: str, pool_file: Path, log_path: Path
) -> dict:
    """One load run on one variant, with the CPU Envoy and the backend spent during it."""
    backend_before = measure.usage(target.backend_pid) if target.backend_pid else measure.Usage()
    envoy_before = measure.usage(target.envoy_pid)
    machine_before, loadgen_before = measure.machine_busy_s(), measure.children_cpu_s()
    if scenario.rate is not None:
        load = measure.run_h2load_fixed_rate(
            target.envoy_port, rate=scenario.rate, duration_s=settings.fixed_duration_s,
            clients=settings.fixed_clients, token=token, log_path=log_path,
        )
    else:
        load = measure.run_wrk(
            target.envoy_port, duration_s=settings.duration_s, connections=settings.connections,
            threads=settings.wrk_threads, token=token if scenario.shape == "repeated" else None,
            token_file=pool_file if scenario.shape == "pool" else None,
        )
    envoy = measure.usage(target.envoy_pid).minus(envoy_before)
    backend = (measure.usage(target.backend_pid).minus(backend_before)
               if target.backend_pid else measure.Usage())
    loadgen_s = measure.children_cpu_s() - loadgen_before
    other_s = measure.machine_busy_s() - machine_before - envoy.total_s - backend.total_s - loadgen_s
    return {
        "variant": target.variant.name,
        "scenario": scenario.name,
        **asdict(load),
        "rps": load.rps,
        "envoy_cpu_s": envoy.total_s,
        "server_cpu_s": backend.total_s,
        "server_cpu_s_per_process": sorted(backend.cpu_s.values(), reverse=True),
        "server_switches": backend.switches,
        "loadgen_cpu_s": loadgen_s,
        "other_cpu_s": max(0.0, other_s),
    }


def run(settings: Settings, out: Path, only: Sequence[str] = (), baseline: str = "") -> dict:
    """Start every variant (or those in *only*), interleave the trials, return the results (also
    written to *out*). *baseline*: also run ``server-w1`` from that source tree, as ``baseline-w1``."""
    out.mkdir(parents=True, exist_ok=True)
    workers = settings.workers
    variants = standard_variants(workers) + scale_variants(settings.policy_counts, SCALE_SCENARIO)
    if baseline:
        variants.append(Variant("baseline-w1", "server", 1, label=f"Envoy + authz-server from {baseline}, 1 worker",
                                source=baseline))
    if only:
        variants = [v for v in variants if v.name in only]
    key = tokens.SigningKey.generate()
    policies = tokens.write_policies(key, out / "policies.yaml")
    token = key.mint("bench-repeated")
    print(f"minting {settings.trials} pools of {settings.pool_size} tokens ...", flush=True)
    pools = [tokens.write_tokens(key.pool(settings.pool_size, f"r{n}"), out / f"pool-{n}.txt")
             for n in range(settings.trials)]
    trials: list[dict] = []
    with ProcessGroup(out / "processes") as group:
        targets = [start_target(group, variant, key, policies) for variant in variants]
        if settings.warmup_s:
            for target in targets:
                measure.run_wrk(target.envoy_port, duration_s=settings.warmup_s,
                                connections=settings.connections, threads=settings.wrk_threads, token=token)
        for round_no, pool in enumerate(pools):
            order = targets[round_no % len(targets):] + targets[: round_no % len(targets)]
            for scenario in scenarios(settings):
                for target in (t for t in order if t.variant.runs(scenario.name)):
                    log = out / "processes" / "h2load.log"
                    trial = run_trial(target, scenario, settings, token, pool, log)
                    trial["round"] = round_no
                    trials.append(trial)
                    print(f"  round {round_no} {scenario.name:<20} {target.variant.name:<10} "
                          f"{trial['rps']:8.0f} req/s  p99 {trial['p99_ms']:6.2f} ms", flush=True)
        servers = {t.variant.name: {"ready_s": t.ready_s, "rss_mb": measure.rss_mb(t.backend_pid)}
                   for t in targets if t.variant.backend == "server" and t.backend_pid}
    for target in targets:  # the logs are complete once the group has stopped every process
        if target.variant.name in servers and target.variant.decision_log and target.variant.workers > 1:
            servers[target.variant.name]["checks_per_worker"] = measure.checks_per_worker(target.backend_log)
    results = report.summarise(trials, variants, settings=asdict(settings), workers=workers, servers=servers)
    report.write_all(results, out)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few seconds: every variant, 1 short trial")
    parser.add_argument("--out", type=Path, help="output dir [loadtests/results/<timestamp>]")
    parser.add_argument("--trials", type=int, help="rounds of interleaved trials [3]")
    parser.add_argument("--duration", type=float, help="seconds per trial [3]")
    parser.add_argument("--workers", type=int, help="authz-server workers for the N-worker variant [2]")
    parser.add_argument("--pool-size", type=int, help="distinct tokens per pool [5000]")
    parser.add_argument("--variants", default="", help="comma-separated variants to run [all]")
    parser.add_argument("--baseline", default="", help="also run server-w1 from this source tree "
                        "(e.g. a checkout of main) as variant baseline-w1, side by side")
    parser.add_argument("--policy-counts", type=lambda t: tuple(int(n) for n in t.split(",") if n),
                        help="policies in scope for the policy-count scale, comma-separated [100,1000,5000]")
    parser.add_argument("--overload", action="store_true", help="run the overload scenario instead "
                        "(server-w1, and baseline-w1 with --baseline)")
    parser.add_argument("--authz-timeout", type=float, help="overload: Envoy's ext_authz timeout, seconds [0.5]")
    parser.add_argument("--overload-policies", type=int, help="overload: policies in scope [2000]")
    parser.add_argument("--overload-factor", type=float, help="overload: offered load over capacity [2]")
    args = parser.parse_args(argv)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    exit_on_sigterm()
    if args.overload:
        return _overload(args, args.out or RESULTS / (f"overload-smoke-{stamp}" if args.smoke else f"overload-{stamp}"))
    base = SMOKE if args.smoke else FULL
    overrides = {
        name: value for name, value in (
            ("trials", args.trials), ("duration_s", args.duration), ("fixed_duration_s", args.duration),
            ("workers", args.workers), ("pool_size", args.pool_size), ("policy_counts", args.policy_counts),
        ) if value is not None
    }
    settings = Settings(**{**asdict(base), **overrides})
    out = args.out or RESULTS / (f"smoke-{stamp}" if args.smoke else stamp)
    only = [name for name in args.variants.split(",") if name] + (["baseline-w1"] if args.baseline else [])
    results = run(settings, out, only if args.variants else (), args.baseline)
    print(report.markdown(results))
    print(f"results: {out}", file=sys.stderr)
    return 0


def _overload(args: argparse.Namespace, out: Path) -> int:
    base = overload.SMOKE if args.smoke else overload.OverloadSettings()
    overrides = {name: value for name, value in (
        ("trials", args.trials), ("duration_s", args.duration), ("authz_timeout_s", args.authz_timeout),
        ("policies", args.overload_policies), ("factor", args.overload_factor),
    ) if value is not None}
    results = overload.run(overload.OverloadSettings(**{**asdict(base), **overrides}), out, args.baseline)
    print(overload.markdown(results))
    print(f"results: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
