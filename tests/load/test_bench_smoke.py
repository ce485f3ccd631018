"""The benchmark's smoke mode end to end: every variant starts, takes load and answers 2xx.

Runs ``python -m loadtests.bench --smoke`` (a few seconds of real Envoy, wrk and h2load). It checks
that the harness works, not performance: the targets live in the benchmark's report, never in a
timed test. Needs the Debian packages ``wrk`` and ``nghttp2-client`` (h2load) and matplotlib.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import matplotlib  # noqa: F401 - the chart; a missing package must fail, not skip

from authz_server.demo.processes import envoy_binary


ROOT = Path(__file__).resolve().parents[2]
EXPECTED_VARIANTS = {"envoy", "native", "noop", "server-grpcio-w1", "server-w1", "server-w2", "server-w1-default",
                     "server-w2-chart", "server-w2-demo", "scale-50", "scale-50-distinct"}


def test_load_tools_are_installed() -> None:
    """wrk and h2load come from Debian (``apt-get install wrk nghttp2-client``; .ci/run does it)."""
    envoy_binary()
    missing = [tool for tool in ("wrk", "h2load") if shutil.which(tool) is None]
    assert not missing, f"missing {missing}: apt-get install wrk nghttp2-client"


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench")
    subprocess.run(
        [sys.executable, "-m", "loadtests.bench", "--smoke", "--out", str(out)],
        cwd=ROOT, check=True, timeout=240, capture_output=True,
    )
    return json.loads((out / "results.json").read_text()), out


def test_every_variant_and_scenario_measured(results: tuple[dict, Path]) -> None:
    data, _ = results
    variants = {v["name"] for v in data["variants"]}
    assert EXPECTED_VARIANTS <= variants
    scenarios = {r["scenario"] for r in data["rows"]}
    assert {"max/repeated", "max/pool"} <= scenarios and any(s.startswith("fixed-") for s in scenarios)
    for row in data["rows"]:
        assert row["variant"] in variants
        assert row["rps"] > 0, row
        assert row["non_2xx"] == 0, row  # every benchmark token is valid and allowed
        assert row["socket_errors"] == 0, row


def test_cpu_charged_to_the_backends(results: tuple[dict, Path]) -> None:
    data, _ = results
    for row in data["rows"]:
        if row["scenario"].startswith("max/") and row["variant"] not in ("envoy", "native"):
            assert row["server_cpu_us_per_req"] > 0, row


def test_reports_written(results: tuple[dict, Path]) -> None:
    data, out = results
    assert (out / "results.png").stat().st_size > 0
    assert (out / "scale.png").stat().st_size > 0
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in EXPECTED_VARIANTS)
    assert "## Policies in scope" in table and "## Checks per worker" in table
    assert data["targets"], "the issue's targets are evaluated"


def test_policy_scale_servers_report_start_time_and_memory(results: tuple[dict, Path]) -> None:
    data, _ = results
    for name in ("scale-50", "scale-50-distinct", "server-w1"):
        server = data["servers"][name]
        assert server["ready_s"] > 0 and server["rss_mb"] > 0, server
    scale_rows = [r for r in data["rows"] if r["variant"].startswith("scale-")]
    assert {r["scenario"] for r in scale_rows} == {"max/repeated"}


def test_checks_are_split_per_worker_from_the_decision_log(results: tuple[dict, Path]) -> None:
    data, _ = results
    for name in ("server-w2-chart", "server-w2-demo"):
        counts = data["servers"][name]["checks_per_worker"]
        requests = sum(r["requests"] for r in data["rows"] if r["variant"] == name)
        assert 1 <= len(counts) <= 2 and sum(counts) >= requests, (name, counts, requests)


def test_the_overload_scenario_measures_capacity_and_overload(tmp_path: Path) -> None:
    """``--overload --smoke``: capacity, then twice that, through Envoy; every answer is an allow
    or Envoy's statusOnError (503), never a policy deny, and the table is written."""
    subprocess.run(
        [sys.executable, "-m", "loadtests.bench", "--overload", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT, check=True, timeout=240, capture_output=True,
    )
    data = json.loads((tmp_path / "overload.json").read_text())
    (row,) = data["rows"]
    assert row["variant"] == "server-w1" and row["capacity_rps"] > 0 and row["offered_rps"] > row["capacity_rps"]
    for trial in data["trials"]:
        for phase in ("capacity", "overload"):
            assert set(trial[phase]["statuses"]) <= {200, 503}, trial
    assert "| server-w1 |" in (tmp_path / "overload.md").read_text()
