"""``authz-server demo`` as a user runs it: a subprocess, its table, its exit code, no leftovers.

Every child the demo starts names the demo's workdir on its command line (Envoy's ``-c`` config,
the servers' ``--policies``), so "no orphans" is checked as "no process mentions the workdir".
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from authz_server.demo.processes import authz_server_command

_KEEP_RUNNING_MARKER = b"press Ctrl-C to stop"


def _demo(workdir: Path, *args: str) -> list[str]:
    return [*authz_server_command(), "demo", "--workdir", str(workdir), *args]


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain *text*."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def test_demo_runs_the_script_and_stops_cleanly(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    result = subprocess.run(_demo(workdir), capture_output=True, text=True, timeout=60)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "22/22 requests as expected" in out and "FAIL" not in out
    for expected in (
        "client->ingress GET /headers",
        "decided by  httpbin sidecar: allowed by ALLOW policy foo/ingress-users rule[0]",
        "reached httpbin, x-jwt-group: users, authorization removed",
        "JWT rejected (expired): Jwt is expired",
        "JWT rejected (bad_signature): Jwt verification fails",
        "foo/ingress-admins rule[0]: when[0][request.auth.claims[group]] not satisfied",
        "ingress gateway: denied by DENY policy istio-system/ingress-block-internal rule[0]",
        # remote.ip is what the trusted LB saw: a spoofed XFF entry does not ban, the address does
        "ingress gateway: denied by DENY policy istio-system/ingress-deny-banned-client rule[0]",
        "foo/sleep-reads rule[0]: no to entry matched (failed: to[0].operation.methods)",
        "DENY policy foo/deny-debug would have denied",
        # one server, two apps of one namespace, each with its own selector policies
        "admin-api sidecar: denied by DENY policy foo/admin-api-lockdown rule[0]",
        "admin-api sidecar: denied by DENY policy foo/admin-api-no-role-claims rule[0]",
        "foo/sleep-reads rule[0]: no from entry matched (failed: from[0].source.principals)",
        "legacy sidecar: unknown_workload_labels: workload labels unknown",
        "legacy sidecar: unknown_workload_namespace: workload namespace unknown",
        "egress gateway: allowed by ALLOW policy istio-system/egress-allow-list rule[0]",
        "istio-system/egress-allow-list rule[0]: no to entry matched (failed: to[0].operation.hosts)",
        f"logs: {workdir}/",
    ):
        assert expected in out, f"{expected!r} not in:\n{out}"
    lines = out.splitlines()
    by_label = {line.split()[1] + " " + line.split()[3]: line for line in lines if line[:5].strip().isdigit()}
    assert by_label["outside->admin-api /status"].split()[-2:] == ["200", "ok"]  # plaintext, identified
    assert "MISMATCH" not in out  # Explain agrees with what the proxies did
    assert (workdir / "authz-server.log").exists() and (workdir / "ingress-gateway.log").exists()
    assert not list(workdir.glob("authz-*-*.log"))  # one server for the whole mesh
    decisions = [json.loads(line) for line in (workdir / "authz-server.log").read_text().splitlines()
                 if line.startswith("{")]
    workloads = {(d["workload"]["namespace"], (d["workload"]["labels"] or {}).get("app")) for d in decisions}
    assert {("istio-system", "istio-ingressgateway"), ("foo", "httpbin"), ("foo", "admin-api"),
            ("istio-system", "istio-egressgateway"), ("foo", None), (None, None)} <= workloads
    assert _processes_mentioning(str(workdir)) == []


def test_demo_without_a_workdir_leaves_nothing_behind(tmp_path: Path) -> None:
    """Run outside a checkout, as a newcomer might: no ./.demo, nothing left in TMPDIR."""
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    result = subprocess.run([*authz_server_command(), "demo"], cwd=cwd, capture_output=True, text=True,
                            timeout=90, env={**os.environ, "TMPDIR": str(tmp)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert list(cwd.iterdir()) == [] and list(tmp.iterdir()) == []
    assert _processes_mentioning(str(tmp)) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_keep_running_stops_on_signal_without_orphans(tmp_path: Path, signum: int) -> None:
    workdir = tmp_path / "demo"
    # Started with SIGINT ignored, as a shell starts background jobs (and as CI may run us):
    # Ctrl-C must still stop the demo.
    demo = subprocess.Popen(_demo(workdir, "--keep-running"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, bufsize=0,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert demo.stdout is not None
    output = b""
    try:
        deadline = time.monotonic() + 60
        while _KEEP_RUNNING_MARKER not in output and time.monotonic() < deadline:
            ready, _, _ = select.select([demo.stdout], [], [], max(0.0, deadline - time.monotonic()))
            chunk = demo.stdout.read(4096) if ready else b""
            if not chunk:
                break
            output += chunk
        assert _KEEP_RUNNING_MARKER in output, output.decode(errors="replace")
        assert b"curl -si -H 'host: www.example.com'" in output and (workdir / "tokens" / "admin.jwt").exists()
        assert _processes_mentioning(str(workdir))  # the mesh is up
        demo.send_signal(signum)
        try:
            rest, _ = demo.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            demo.send_signal(signal.SIGUSR1)  # the CLI dumps every thread's stack on SIGUSR1
            time.sleep(2)
            demo.kill()
            rest, _ = demo.communicate(timeout=30)
            pytest.fail("the demo did not stop within 60 s of the signal:\n" + (output + rest).decode(errors="replace"))
        output += rest
        code = demo.returncode
    finally:
        if demo.poll() is None:
            os.kill(demo.pid, signal.SIGKILL)
            demo.wait()
    assert code == 128 + signum, output.decode(errors="replace")
    assert _processes_mentioning(str(workdir)) == []
