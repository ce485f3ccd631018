"""Turn the benchmark's trials into a summary, the issue's ratios and targets, and JSON/MD/PNG.

Per variant and scenario: the median over rounds of RPS and of each latency percentile (medians
resist the one round a background job disturbed), and CPU per request as total CPU over total
requests across rounds (a ratio of sums: rounds with more requests weigh more, as they should).
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from .variants import Variant

GO_REFERENCE_RPS = 4800
"""The issue's minimal Go ext_authz server (RS256 on every request) through Envoy on this machine.
Not measured by this benchmark (no Go toolchain in the project); compared against as given."""


def summarise(trials: list[dict], variants: Sequence[Variant], *, settings: dict, workers: int,
              servers: dict[str, dict] | None = None) -> dict:
    """Rows per (variant, scenario); *servers* adds each server's start time, RSS, worker split."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for trial in trials:
        groups[(trial["variant"], trial["scenario"])].append(trial)
    rows = []
    for (variant, scenario), runs in groups.items():
        requests = sum(r["requests"] for r in runs)
        per_process = _sum_columns([r["server_cpu_s_per_process"] for r in runs])
        busy = sum(per_process)
        rows.append({
            "variant": variant,
            "scenario": scenario,
            "trials": len(runs),
            "rps": statistics.median(r["rps"] for r in runs),
            "rps_min": min(r["rps"] for r in runs),
            "rps_max": max(r["rps"] for r in runs),
            **{p: statistics.median(r[p] for r in runs) for p in ("p50_ms", "p90_ms", "p99_ms")},
            "requests": requests,
            "non_2xx": sum(r["non_2xx"] for r in runs),
            "socket_errors": sum(r["socket_errors"] for r in runs),
            "envoy_cpu_us_per_req": _per_request(sum(r["envoy_cpu_s"] for r in runs), requests),
            "server_cpu_us_per_req": _per_request(sum(r["server_cpu_s"] for r in runs), requests),
            "server_switches_per_req": sum(r["server_switches"] for r in runs) / requests if requests else 0,
            "other_cpu_cores": statistics.median(r["other_cpu_s"] / r["duration_s"] for r in runs),
            "server_cpu_share_per_process": [round(s / busy, 3) for s in per_process] if busy else [],
        })
    results = {
        "settings": settings,
        "workers": workers,
        "variants": [{"name": v.name, "label": v.label, "policies": v.policies, "mix": v.mix, "pool": v.pool,
                      "workers": v.workers, "decision_log": v.decision_log} for v in variants],
        "servers": servers or {},
        "rows": rows,
        "trials": trials,
    }
    results["targets"] = targets(results)
    return results


def row(results: dict, variant: str, scenario: str) -> dict | None:
    return next((r for r in results["rows"] if r["variant"] == variant and r["scenario"] == scenario), None)


def targets(results: dict) -> list[dict]:
    """The issue's performance targets, each with the measured value and whether it is met."""
    found: list[dict] = []

    def check(name: str, value: float | None, limit: float, at_least: bool, unit: str = "") -> None:
        if value is not None:
            met = value >= limit if at_least else value <= limit
            found.append({"target": name, "value": round(value, 3), "limit": limit,
                          "comparison": ">=" if at_least else "<=", "unit": unit, "met": met})

    def ratio(a: dict | None, b: dict | None, key: str = "rps") -> float | None:
        return a[key] / b[key] if a and b and b[key] else None

    # Issue 6's targets, for the server variants as tuned then (decision log off, benchmark pool).
    servers = [v["name"] for v in results["variants"]
               if v["name"].startswith("server-") and not v.get("decision_log") and v.get("pool", "bench") == "bench"]
    noop = row(results, "noop", "max/repeated")
    for name in servers:
        repeated = row(results, name, "max/repeated")
        check(f"{name}: RPS repeated token / framework floor", ratio(repeated, noop), 0.95, True, "x")
        check(f"{name}: RPS token pool / repeated token", ratio(row(results, name, "max/pool"), repeated),
              0.6, True, "x")
        if repeated:
            check(f"{name}: server CPU per Check, cached token", repeated["server_cpu_us_per_req"], 200, False, "µs")
            check(f"{name}: RPS vs minimal Go server ({GO_REFERENCE_RPS} from the issue)",
                  repeated["rps"], GO_REFERENCE_RPS, True, "req/s")
        fixed = [s for s in {r["scenario"] for r in results["rows"]} if s.startswith("fixed-1000/")]
        for scenario in fixed:
            mine, alone = row(results, name, scenario), row(results, "envoy", scenario)
            if mine and alone:
                check(f"{name}: p99 added over Envoy alone at 1,000 req/s",
                      mine["p99_ms"] - alone["p99_ms"], 2.0, False, "ms")
    # Issue 13: the default configuration as fast as the tuned one.
    for scenario, shape, limit in (("max/repeated", "A", 80), ("max/pool", "B", 140)):
        default, tuned = row(results, "server-w1-default", scenario), row(results, "server-w1", scenario)
        check(f"default settings RPS / --decision-log off, {shape} ({scenario})", ratio(default, tuned), 0.9, True, "x")
        if default:
            check(f"default settings: server CPU per Check, {shape} ({scenario})",
                  default["server_cpu_us_per_req"], limit, False, "µs")
    # Issue 13: cost per Check that does not grow with the number of policies.
    base = row(results, "server-w1", "max/repeated")
    for variant in scale_variants(results):
        scaled = row(results, variant["name"], "max/repeated")
        if variant["policies"] == max_policies(results):
            check(f"{variant['name']}: server CPU per Check / 1 policy", ratio(scaled, base, "server_cpu_us_per_req"),
                  2.0, False, "x")
            server = results.get("servers", {}).get(variant["name"], {})
            if server.get("ready_s") is not None:
                check(f"{variant['name']}: start → ready", server["ready_s"], 2.0, False, "s")
            if server.get("rss_mb"):
                check(f"{variant['name']}: RSS", server["rss_mb"], 150, False, "MB")
    return found


def scale_variants(results: dict) -> list[dict]:
    """The policy-count variants, fewest policies first."""
    return sorted((v for v in results["variants"] if v["name"].startswith("scale-")),
                  key=lambda v: (v["policies"], v["mix"]))


def max_policies(results: dict) -> int:
    return max((v["policies"] for v in scale_variants(results)), default=0)


def headline(results: dict) -> list[str]:
    """The issue's table: Envoy's own jwt_authn + RBAC and this server's configurations, one run."""
    names = ["native", "server-w1", "server-w1-default", *(v["name"] for v in results["variants"]
                                                            if v["name"].startswith("server-w2-")),
             *(v["name"] for v in scale_variants(results) if v["policies"] == max_policies(results))]
    lines = ["| variant | A RPS | A server µs/Check | B RPS | B server µs/Check |", "|---|---|---|---|---|"]
    for name in names:
        cells = []
        for scenario in ("max/repeated", "max/pool"):
            r = row(results, name, scenario)
            cells += [f"{r['rps']:,.0f}", f"{r['server_cpu_us_per_req']:.0f}" if r["server_cpu_us_per_req"] else "–"] \
                if r else ["–", "–"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def scale_table(results: dict) -> list[str]:
    """RPS, server CPU per Check, start → ready and RSS per number of policies in scope."""
    lines = ["| policies in scope | mix | variant | RPS | server µs/Check | × 1 policy | start → ready s | RSS MB |",
             "|---|---|---|---|---|---|---|---|"]
    base = row(results, "server-w1", "max/repeated")
    points = [({"name": "server-w1", "policies": 1, "mix": "realistic"}), *scale_variants(results)]
    for v in points:
        r = row(results, v["name"], "max/repeated")
        if not r:
            continue
        server = results.get("servers", {}).get(v["name"], {})
        times = (f"{r['server_cpu_us_per_req'] / base['server_cpu_us_per_req']:.2f}"
                 if base and base["server_cpu_us_per_req"] else "–")
        ready = f"{server['ready_s']:.2f}" if server.get("ready_s") is not None else "–"
        rss = f"{server['rss_mb']:.0f}" if server.get("rss_mb") else "–"
        lines.append(f"| {v['policies']:,} | {v['mix']} | {v['name']} | {r['rps']:,.0f} "
                     f"| {r['server_cpu_us_per_req']:.0f} | {times} | {ready} | {rss} |")
    return lines


def worker_split(results: dict) -> list[str]:
    """Checks per worker (from the decision log) for the multi-worker variants that log."""
    lines = ["| variant | pool caps | Checks per worker | share |", "|---|---|---|---|"]
    for v in results["variants"]:
        counts = results.get("servers", {}).get(v["name"], {}).get("checks_per_worker")
        if counts is None:
            continue
        counts = counts + [0] * (v["workers"] - len(counts))
        total = sum(counts) or 1
        lines.append(f"| {v['name']} | {v['pool']} | {' / '.join(f'{c:,}' for c in counts)} "
                     f"| {' / '.join(f'{c / total:.0%}' for c in counts)} |")
    return lines


def markdown(results: dict) -> str:
    labels = {v["name"]: v["label"] for v in results["variants"]}
    lines = [
        "| scenario | variant | RPS (min–max) | p50 ms | p90 ms | p99 ms | Envoy µs/req | server µs/req "
        "| server ctx sw/req | server CPU split | non-2xx | other CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {v["name"]: i for i, v in enumerate(results["variants"])}
    for r in sorted(results["rows"], key=lambda r: (_scenario_key(r["scenario"]), order[r["variant"]])):
        split = "/".join(f"{s:.0%}" for s in r["server_cpu_share_per_process"]) or "–"
        lines.append(
            f"| {r['scenario']} | {r['variant']} | {r['rps']:,.0f} ({r['rps_min']:,.0f}–{r['rps_max']:,.0f}) "
            f"| {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | {r['envoy_cpu_us_per_req']:.0f} "
            f"| {r['server_cpu_us_per_req']:.0f} | {r['server_switches_per_req']:.1f} | {split} | {r['non_2xx']} "
            f"| {r['other_cpu_cores']:.2f} |"
        )
    noisy = max((r["other_cpu_cores"] for r in results["rows"]), default=0.0)
    lines += ["", "*other CPU*: cores busy with work outside Envoy, the backend and the load generator "
              "(median over rounds)" + (f"; up to {noisy:.2f} here, so treat these figures as disturbed."
                                        if noisy > 0.1 else ".")]
    lines += ["", "Variants: " + "; ".join(f"`{name}` {label}" for name, label in labels.items()),
              "", "## Side by side (A: one token repeated, B: a pool of distinct tokens)", "", *headline(results)]
    if scale_variants(results):
        lines += ["", "## Policies in scope (max/repeated)", "", *scale_table(results)]
    if len(worker_split(results)) > 2:
        lines += ["", "## Checks per worker (decision log, whole run)", "", *worker_split(results)]
    lines += ["", "## Targets", "", "| target | measured | limit | met |", "|---|---|---|---|"]
    for t in results["targets"]:
        lines.append(f"| {t['target']} | {t['value']:,} {t['unit']} | {t['comparison']} {t['limit']:,} {t['unit']} "
                     f"| {'yes' if t['met'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def chart(results: dict, path: Path) -> Path:
    """RPS per variant (both shapes) and latency percentiles at max load and at each fixed rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [v["name"] for v in results["variants"] if not v["name"].startswith("scale-")]
    latency_scenarios = sorted({r["scenario"] for r in results["rows"] if r["scenario"] != "max/pool"},
                               key=_scenario_key)
    fig, axes = plt.subplots(1, 1 + len(latency_scenarios), figsize=(5 * (1 + len(latency_scenarios)), 4.5))
    width = 0.38
    ax = axes[0]
    for i, scenario in enumerate(("max/repeated", "max/pool")):
        values = [(row(results, n, scenario) or {}).get("rps", 0) for n in names]
        ax.bar([x + (i - 0.5) * width for x in range(len(names))], values, width, label=scenario)
    ax.set_title("max throughput (wrk)")
    ax.set_ylabel("requests/s")
    _label_axis(ax, names)
    for ax, scenario in zip(axes[1:], latency_scenarios):
        for i, p in enumerate(("p50_ms", "p90_ms", "p99_ms")):
            values = [(row(results, n, scenario) or {}).get(p, 0) for n in names]
            ax.bar([x + (i - 1) * 0.27 for x in range(len(names))], values, 0.27, label=p.removesuffix("_ms"))
        ax.set_title(f"latency, {scenario}")
        ax.set_ylabel("ms")
        _label_axis(ax, names)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scale_chart(results: dict, path: Path) -> Path:
    """Server CPU per Check and RPS against the number of policies in scope (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cpu, rps) = plt.subplots(1, 2, figsize=(10, 4.2))
    base = row(results, "server-w1", "max/repeated")
    for mix, style in (("realistic", "o-"), ("distinct", "s--")):
        # every series starts at the one-policy point, server-w1
        points = [(1, base), *((v["policies"], row(results, v["name"], "max/repeated"))
                               for v in scale_variants(results) if v["mix"] == mix)]
        points = [(n, r) for n, r in points if r]
        cpu.plot([n for n, _ in points], [r["server_cpu_us_per_req"] for _, r in points], style, label=mix)
        rps.plot([n for n, _ in points], [r["rps"] for _, r in points], style, label=mix)
    for ax, title, unit in ((cpu, "server CPU per Check", "µs"), (rps, "throughput through Envoy", "requests/s")):
        ax.set_xscale("log")
        ax.set_xlabel("AuthorizationPolicies in scope")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(results: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    (out / "results.md").write_text(markdown(results))
    chart(results, out / "results.png")
    if scale_variants(results):
        scale_chart(results, out / "scale.png")


def _label_axis(ax: Any, names: list[str]) -> None:
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20)
    ax.legend(fontsize=8)


def _scenario_key(scenario: str) -> tuple[int, str]:
    kind = scenario.split("/")[0]
    return (0, scenario) if kind == "max" else (1, f"{int(kind.removeprefix('fixed-')):08d}")


def _per_request(cpu_s: float, requests: int) -> float:
    return cpu_s / requests * 1e6 if requests else 0.0


def _sum_columns(lists: list[list[float]]) -> list[float]:
    width = max((len(x) for x in lists), default=0)
    return [sum(x[i] for x in lists if i < len(x)) for i in range(width)]
