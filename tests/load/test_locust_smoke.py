"""The locustfile end to end: headless Locust against a local target it starts itself.

A few seconds of both users (gRPC Check and HTTP through Envoy) with the whole task mix; every
task's expected status (allow, 403 on the claim, 403 without a token, 401 on a bad signature) must
hold, so Locust records no failure.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_locust_mix_meets_expectations(tmp_path: Path) -> None:
    # Never import locust here: importing it monkey-patches the whole test process with gevent.
    assert importlib.util.find_spec("locust"), "pip install '.[load]' (locust)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTHZ_")}
    env["AUTHZ_LOCAL_TOKENS"] = "200"
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env["TMPDIR"] = str(tmp)  # where the local target keeps its logs and minted tokens
    subprocess.run(
        [sys.executable, "-m", "locust", "-f", "loadtests/locustfile.py", "--headless", "-u", "6", "-r", "6",
         "-t", "4s", "--csv", str(tmp_path / "run"), "--only-summary", "--exit-code-on-error", "0"],
        cwd=ROOT, env=env, check=True, timeout=120, capture_output=True,
    )
    with (tmp_path / "run_stats.csv").open() as stats:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(stats)}
    for kind in ("grpc", "GET"):
        for name in ("cached", "fresh", "claim", "none", "invalid"):
            row = rows[(kind, name)]
            assert int(row["Request Count"]) > 0, row
            assert int(row["Failure Count"]) == 0, row
    assert list(tmp.iterdir()) == [], "the local target's workdir (logs, tokens) must be removed on exit"
