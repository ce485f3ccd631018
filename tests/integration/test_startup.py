"""Starting ``authz-server serve``: what is wrong is refused at once, in one line, and nothing is
left behind.

Every case runs the real command in a subprocess and checks its exit status and message, in the
default multi-worker mode and with ``--workers 1``: a configuration error must never become a
worker restarting for ever.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from authz_server.demo.processes import ProcessGroup, authz_server_command, free_port, grpc_serving
from authz_server.startup import usable_cpus
from tests.integration.test_operations import children, http_get, wait_for
from tests.integration.test_server import ALLOW_GET_FROM_SLEEP, DENY_ALL

ROOT = Path(__file__).resolve().parents[2]
WORKER_MODES = pytest.mark.parametrize("workers", ["2", "1"], ids=["workers-2", "workers-1"])


def serve(policies: Path, *args: str, env: dict[str, str] | None = None,
          timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``serve`` to its end (these starts are expected to fail quickly)."""
    argv = [*authz_server_command(), "serve", "--policies", str(policies), "--decision-log", "off", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The failure is exactly one ``error:`` line, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(ALLOW_GET_FROM_SLEEP)
    return path


@WORKER_MODES
def test_a_second_server_on_the_same_port_refuses_to_start(tmp_path: Path, policies: Path, workers: str) -> None:
    other = tmp_path / "deny.yaml"
    other.write_text(DENY_ALL)
    port = free_port()
    with ProcessGroup(tmp_path / "logs") as group:
        first = group.start_authz_server(policies, port, ["--workers", "2"])
        line = one_error_line(serve(other, "--listen", f"127.0.0.1:{port}", "--workers", workers,
                                    "--metrics-listen", "off"))
        assert f"--listen 127.0.0.1:{port}" in line and f"pid {first.pid}" in line
        assert "already serves port" in line
        assert grpc_serving(f"127.0.0.1:{port}")  # the first one is untouched


@WORKER_MODES
def test_a_port_held_by_another_program_is_a_start_error(policies: Path, workers: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        line = one_error_line(serve(policies, "--listen", f"127.0.0.1:{port}", "--workers", workers,
                                    "--metrics-listen", "off"))
    assert f"--listen 127.0.0.1:{port}: cannot bind: Address already in use" in line


@WORKER_MODES
def test_a_busy_metrics_port_is_one_line_naming_the_flag(policies: Path, workers: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        metrics = f"127.0.0.1:{holder.getsockname()[1]}"
        line = one_error_line(serve(policies, "--listen", f"127.0.0.1:{free_port()}", "--workers", workers,
                                    "--metrics-listen", metrics))
    assert f"--metrics-listen {metrics}: cannot bind: Address already in use" in line
    assert "AUTHZ_METRICS_LISTEN" in line


@WORKER_MODES
@pytest.mark.parametrize("tls_args, expected", [
    (["--tls-cert", "cert.pem"], "--tls-cert and --tls-key (AUTHZ_TLS_CERT, AUTHZ_TLS_KEY) go together"),
    (["--tls-client-ca", "ca.pem"], "--tls-client-ca needs --tls-cert and --tls-key"),
    (["--tls-cert", "missing.pem", "--tls-key", "missing.key"], "No such file or directory"),
], ids=["cert-without-key", "client-ca-without-cert", "missing-files"])
def test_tls_misconfiguration_is_a_start_error(policies: Path, workers: str, tls_args: list[str],
                                               expected: str) -> None:
    line = one_error_line(serve(policies, "--listen", f"127.0.0.1:{free_port()}", "--workers", workers,
                                "--metrics-listen", "off", *tls_args))
    assert expected in line


def test_a_missing_policy_path_is_a_start_error(tmp_path: Path) -> None:
    line = one_error_line(serve(tmp_path / "nowhere", "--listen", f"127.0.0.1:{free_port()}",
                                "--metrics-listen", "off"))
    assert f"--policies {tmp_path / 'nowhere'}: no such file or directory" in line


def test_an_invalid_log_level_is_a_usage_error(policies: Path) -> None:
    result = serve(policies, "--log-level", "chatty")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "authz-server serve: error: argument --log-level: invalid log level 'chatty': one of DEBUG, INFO, WARNING, "
        "ERROR (see authz-server serve --help)"]


def test_workers_need_a_writable_temporary_directory_and_say_which(policies: Path) -> None:
    line = one_error_line(serve(policies, "--listen", f"127.0.0.1:{free_port()}", "--workers", "2",
                                "--metrics-listen", f"127.0.0.1:{free_port()}", env={"TMPDIR": "/proc"}))
    assert "/proc" in line and "TMPDIR" in line and "emptyDir" in line


def test_nothing_is_left_in_the_temporary_directory(tmp_path: Path, policies: Path) -> None:
    """A supervised start with metrics writes its workers' metrics under TMPDIR and removes them
    on exit; without metrics it creates nothing; a directory left by a killed supervisor is
    removed by the next start."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    stale = tmp / "authz-metrics-stale"
    stale.mkdir()
    (stale / ".lock").write_text("")
    (stale / "counter_1.db").write_bytes(b"x")
    env = {"TMPDIR": str(tmp)}
    for metrics in ([f"127.0.0.1:{free_port()}"], ["off"]):
        port = free_port()
        with ProcessGroup(tmp_path / "logs") as group:
            server = group.start(
                "authz-server",
                [*authz_server_command(), "serve", "--policies", str(policies), "--listen", f"127.0.0.1:{port}",
                 "--workers", "2", "--metrics-listen", *metrics],
                ready=lambda: grpc_serving(f"127.0.0.1:{port}"), env=env)
            made = sorted(p.name for p in tmp.iterdir())
            assert len(made) == (1 if metrics != ["off"] else 0), made  # the stale one is gone
            server.popen.send_signal(signal.SIGTERM)
            assert server.popen.wait(timeout=60) == 0
        assert list(tmp.iterdir()) == []


def test_the_default_worker_count_follows_cpu_affinity(tmp_path: Path, policies: Path) -> None:
    """Pinned to one CPU, ``--workers 0`` (the default) runs one process, not one per host CPU."""
    port = free_port()
    with ProcessGroup(tmp_path / "logs") as group:
        server = group.start(
            "authz-server",
            ["taskset", "-c", str(min(os.sched_getaffinity(0))), *authz_server_command(), "serve",
             "--policies", str(policies), "--listen", f"127.0.0.1:{port}", "--metrics-listen", "off"],
            ready=lambda: grpc_serving(f"127.0.0.1:{port}"))
        assert children(server.pid) == []  # serving itself: no supervisor, no workers
        assert "worker 0 started" not in server.log_tail()


def test_usable_cpus_honours_the_cgroup_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert usable_cpus(tmp_path) == min(2, len(os.sched_getaffinity(0)))
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert usable_cpus(tmp_path) == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(tmp_path) == len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(tmp_path) == 1


def test_a_worker_configuration_error_stops_the_supervisor(tmp_path: Path) -> None:
    """What only a worker finds (the command checks first, so here the supervisor runs on its
    own with a policy path that is missing) ends the server with status 2 instead of a restart
    loop."""
    script = ("import sys; from authz_server.workers import Supervisor; "
              "sys.exit(Supervisor(sys.argv[1:], 2, '', 1.0).run())")
    argv = ["serve", "--policies", str(tmp_path / "nowhere"), "--listen", f"127.0.0.1:{free_port()}"]
    result = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "exited on a configuration error; stopping" in result.stderr
    assert result.stderr.count("started (pid") <= 2  # each worker started once, never restarted


def test_the_reload_hint_says_how_the_path_is_reread(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(DENY_ALL.replace("rules: [{}]", "rules: [{to: []}]"))
    for args, hint in ((["--reload-interval", "2"], "it is re-read every 2s"),
                       (["--reload-interval", "0"], "send SIGHUP to reload it")):
        port = free_port()
        with ProcessGroup(tmp_path / "logs") as group:
            server = group.start(
                "authz-server",
                [*authz_server_command(), "serve", "--policies", str(bad), "--listen", f"127.0.0.1:{port}",
                 "--workers", "1", "--metrics-listen", "off", *args],
                ready=lambda: "gRPC listening" in (tmp_path / "logs" / "authz-server.log").read_text())
            assert hint in server.log_tail()


def test_health_command_follows_the_configured_ports(tmp_path: Path, policies: Path) -> None:
    port, ops = free_port(), free_port()
    health = [*authz_server_command(), "health", "--listen", f"127.0.0.1:{port}"]
    down = subprocess.run([*health, "--metrics-listen", f"127.0.0.1:{ops}"], capture_output=True, text=True,
                          timeout=30)
    assert down.returncode == 1 and down.stderr.startswith(f"unhealthy: http://127.0.0.1:{ops}/healthz")
    with ProcessGroup(tmp_path / "logs") as group:
        group.start_authz_server(policies, port, ["--metrics-listen", f"0.0.0.0:{ops}"])
        wait_for(lambda: http_get(ops, "/healthz")[0] == 200)
        up = subprocess.run([*health, "--metrics-listen", f"0.0.0.0:{ops}"], capture_output=True, text=True,
                            timeout=30)
        assert up.returncode == 0 and up.stdout.startswith(f"healthy: http://127.0.0.1:{ops}/healthz: HTTP 200")
        grpc_only = subprocess.run([*health, "--metrics-listen", "off"], capture_output=True, text=True, timeout=30)
        assert grpc_only.returncode == 0 and "gRPC health at 127.0.0.1" in grpc_only.stdout


def test_bench_jwt_help_is_help(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "loadtests/bench_jwt.py", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "iterations" in result.stdout and not result.stderr
