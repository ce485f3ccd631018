"""Operating the server: metrics, decision log and redaction, hot reload under load, workers."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from envoy.service.auth.v3 import external_auth_pb2_grpc

from authz_server.demo.processes import ProcessGroup, authz_server_command, free_port
from tests.integration.test_server import ALLOW_GET_FROM_SLEEP, DENY_ALL, request


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_for(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def test_metrics_after_a_known_sequence_of_checks(tmp_path: Path) -> None:
    policies = tmp_path / "p.yaml"
    policies.write_text(ALLOW_GET_FROM_SLEEP)
    port, ops = free_port(), free_port()
    with ProcessGroup(tmp_path / "logs") as group:
        group.start_authz_server(policies, port, ["--metrics-listen", f"127.0.0.1:{ops}"])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = external_auth_pb2_grpc.AuthorizationStub(channel).Check
            for _ in range(3):
                check(request(), timeout=5)
            for _ in range(2):
                check(request(method="POST"), timeout=5)
        status, text = http_get(ops, "/metrics")
        assert status == 200
        assert metric(text, "authz_checks_total", decision="allow", reason="allowed_by_policy") == 3
        assert metric(text, "authz_checks_total", decision="deny", reason="no_allow_match") == 2
        assert metric(text, "authz_check_policy_total", policy="foo/allow-sleep", decision="allow") == 3
        assert metric(text, "authz_check_duration_seconds_count") == 5
        assert metric(text, "authz_policy_reloads_total", result="success") == 1
        assert metric(text, "authz_policies_loaded", kind="AuthorizationPolicy") == 1
        assert http_get(ops, "/healthz")[0] == 200
        assert http_get(ops, "/readyz") == (200, "ready: policy generation 1\n")


def test_decision_log_lines_and_no_token_anywhere_in_the_logs(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk["kid"] = "k1"
    token = pyjwt.encode({"iss": "https://idp.test", "sub": "alice", "exp": int(time.time()) + 600}, key,
                         algorithm="RS256", headers={"kid": "k1"})
    (tmp_path / "p.yaml").write_text(ALLOW_GET_FROM_SLEEP + f"""---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: foo}}
spec:
  jwtRules:
  - issuer: https://idp.test
    jwks: '{json.dumps({"keys": [jwk]})}'
  - issuer: https://idp2.test
    jwks: '{json.dumps({"keys": [jwk]})}'
    fromParams: [jwt]
""")
    port = free_port()
    with ProcessGroup(tmp_path / "logs") as group:
        server = group.start_authz_server(tmp_path / "p.yaml", port, ["--log-level", "DEBUG",
                                                                     "--decision-log-query", "true"])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = external_auth_pb2_grpc.AuthorizationStub(channel).Check
            good = request()
            good.attributes.request.http.headers["authorization"] = f"Bearer {token}"
            good.attributes.request.http.headers["x-request-id"] = "req-1"
            good.attributes.request.http.headers["cookie"] = f"session={token}"
            assert check(good, timeout=5).status.code == 0
            bad = request()
            bad.attributes.request.http.path = f"/get?access_token={token[:-4]}AAAA"
            bad.attributes.request.http.headers["x-request-id"] = "req-2"
            assert check(bad, timeout=5).denied_response.status.code == 401
            # Regression: only a fixed list of names was redacted, so a token in a configured
            # fromParams name (or in any other parameter) was logged verbatim.
            in_param = request()
            in_param.attributes.request.http.path = f"/get?jwt=not-shaped-like-a-jwt&page=2&other={token}"
            in_param.attributes.request.http.headers["x-request-id"] = "req-3"
            assert check(in_param, timeout=5).denied_response.status.code == 401
        server.popen.send_signal(signal.SIGTERM)
        server.popen.wait(timeout=20)
        text = server.log_path.read_text()
    entries = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    by_id = {e["request_id"]: e for e in entries}
    assert by_id["req-1"]["decision"] == "allow" and by_id["req-1"]["request_principal"] == "https://idp.test/alice"
    assert by_id["req-1"]["policy"] == "foo/allow-sleep" and by_id["req-1"]["jwt"]["result"] == "ok"
    assert by_id["req-2"]["status"] == 401 and by_id["req-2"]["path"] == "/get?access_token=REDACTED"
    assert by_id["req-3"]["path"] == "/get?jwt=REDACTED&page=2&other=REDACTED"
    signature = token.rsplit(".", 1)[1]
    for part in (token, signature, token.split(".")[1], "not-shaped-like-a-jwt"):
        assert part not in text


class Load:
    """Checks in a loop from a few threads, counting every answer by outcome; bounded in time.

    ``codes`` counts failed calls by gRPC status code, for tests that tell a refused call
    (UNAVAILABLE: nothing listens, or the stream was refused during a drain) from a dropped one.
    """

    def __init__(self, address: str, seconds: float = 60.0) -> None:
        self.channel = grpc.insecure_channel(address)
        self.check = external_auth_pb2_grpc.AuthorizationStub(self.channel).Check
        self.counts = {"allow": 0, "deny": 0, "error": 0}
        self.codes: dict[str, int] = {}
        self.deadline = time.monotonic() + seconds
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(4)]
        self.lock = threading.Lock()

    def _run(self) -> None:
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            code = ""
            try:
                outcome = "allow" if self.check(request(), timeout=10).status.code == 0 else "deny"
            except grpc.RpcError as exc:
                outcome, code = "error", exc.code().name
            with self.lock:
                self.counts[outcome] += 1
                if code:
                    self.codes[code] = self.codes.get(code, 0) + 1

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=15)
        self.channel.close()


def test_reload_under_load_switches_decisions_without_errors(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "allow.yaml").write_text(ALLOW_GET_FROM_SLEEP)
    port = free_port()
    with ProcessGroup(tmp_path / "logs") as group:
        group.start_authz_server(policies, port, ["--reload-interval", "0.2", "--decision-log", "off"])
        with Load(f"127.0.0.1:{port}") as load:
            wait_for(lambda: load.counts["allow"] > 50)
            (policies / "deny.yaml").write_text(DENY_ALL)  # picked up by the watcher, no signal
            wait_for(lambda: load.counts["deny"] > 50)
            (policies / "broken.yaml").write_text("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n")
            before = load.counts["deny"]
            wait_for(lambda: load.counts["deny"] > before + 100)
        assert load.counts["error"] == 0
        assert load.counts["allow"] > 50 and load.counts["deny"] > 150


def test_workers_share_the_port_restart_after_a_crash_and_drain_on_sigterm(tmp_path: Path) -> None:
    """Properties, not counts: a killed worker is replaced and the server is ready again within
    30 s; once it is, Checks succeed without a single error; SIGTERM under load drains — no call
    fails other than by being refused (UNAVAILABLE) — and the supervisor exits 0."""
    policies = tmp_path / "p.yaml"
    policies.write_text(ALLOW_GET_FROM_SLEEP)
    port, ops = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    with ProcessGroup(tmp_path / "logs") as group:
        supervisor = group.start_authz_server(
            policies, port, ["--workers", "2", "--metrics-listen", f"127.0.0.1:{ops}", "--decision-log", "off"])
        wait_for(lambda: http_get(ops, "/readyz")[0] == 200, timeout=30)
        first = children(supervisor.pid)
        assert len(first) == 2
        with Load(address) as load:
            wait_for(lambda: load.counts["allow"] > 20, timeout=30)
            os.kill(first[0], signal.SIGKILL)
            wait_for(lambda: len(children(supervisor.pid)) == 2 and first[0] not in children(supervisor.pid),
                     timeout=30)
            wait_for(lambda: http_get(ops, "/readyz")[0] == 200, timeout=30)
        assert load.counts["deny"] == 0  # calls may fail while the worker dies; none is answered wrongly
        assert "restarting" in supervisor.log_tail(40)

        with Load(address) as after:  # recovered: a fresh client sees no failure at all
            wait_for(lambda: after.counts["allow"] > 50, timeout=30)
        assert after.counts["error"] == 0 and after.counts["deny"] == 0, after.codes
        text = http_get(ops, "/metrics")[1]
        assert metric(text, "authz_checks_total", decision="allow", reason="allowed_by_policy") > 0

        with Load(address) as draining:
            wait_for(lambda: draining.counts["allow"] > 20, timeout=30)
            supervisor.popen.send_signal(signal.SIGTERM)
            assert supervisor.popen.wait(timeout=60) == 0
        assert set(draining.codes) <= {"UNAVAILABLE"}, draining.codes
        assert draining.counts["deny"] == 0
        assert "all workers stopped" in supervisor.log_tail(10)


def test_tls_listener_rejects_plaintext_and_serves_tls(tmp_path: Path) -> None:
    from authz_server.demo.pki import issue_workload_cert, make_ca

    ca = make_ca(tmp_path / "ca")
    cert = issue_workload_cert(ca, None, dns_names=("localhost",), name="server")
    policies = tmp_path / "p.yaml"
    policies.write_text(ALLOW_GET_FROM_SLEEP)
    port = free_port()
    address = f"localhost:{port}"
    with ProcessGroup(tmp_path / "logs") as group:
        group.start(
            "authz-server",
            [*authz_server_command(), "serve", "--policies", str(policies), "--listen", f"127.0.0.1:{port}", "--workers", "1",
             "--metrics-listen", "off", "--tls-cert", str(cert.cert_path), "--tls-key", str(cert.key_path)],
            ready=lambda: re.search("gRPC listening", (tmp_path / "logs" / "authz-server.log").read_text()) is not None,
        )
        credentials = grpc.ssl_channel_credentials(Path(ca.cert_path).read_bytes())
        with grpc.secure_channel(address, credentials) as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            wait_for(lambda: _ok(stub))
        with grpc.insecure_channel(address) as channel:
            with pytest.raises(grpc.RpcError):
                external_auth_pb2_grpc.AuthorizationStub(channel).Check(request(), timeout=3)


def _ok(stub: external_auth_pb2_grpc.AuthorizationStub) -> bool:
    try:
        return stub.Check(request(), timeout=3).status.code == 0
    except grpc.RpcError:
        return False


def test_a_restarted_worker_serves_the_last_good_set_its_siblings_serve(tmp_path: Path) -> None:
    """The files turn invalid, then a worker dies: its replacement must not start with no set
    (denying what the other worker allows), but with the newest valid set, as its siblings."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "p.yaml").write_text(DENY_ALL)
    port, ops = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    with ProcessGroup(tmp_path / "logs") as group:
        supervisor = group.start_authz_server(policies, port, [
            "--workers", "2", "--metrics-listen", f"127.0.0.1:{ops}", "--decision-log", "off",
            "--reload-interval", "0.2"])
        wait_for(lambda: http_get(ops, "/readyz")[0] == 200, timeout=30)
        (policies / "p.yaml").write_text(ALLOW_GET_FROM_SLEEP)  # a valid change: the newest good set
        wait_for(lambda: "changed and is valid" in supervisor.log_tail(200), timeout=30)
        wait_for(lambda: supervisor.log_tail(200).count("generation 2 loaded") == 2, timeout=30)
        (policies / "broken.yaml").write_text("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n")
        wait_for(lambda: supervisor.log_tail(200).count("keeping generation 2") == 2, timeout=30)

        first = children(supervisor.pid)
        os.kill(first[0], signal.SIGKILL)
        wait_for(lambda: len(children(supervisor.pid)) == 2 and first[0] not in children(supervisor.pid), timeout=30)
        wait_for(lambda: "serving the last good set the supervisor kept" in supervisor.log_tail(200), timeout=30)
        wait_for(lambda: http_get(ops, "/readyz")[0] == 200, timeout=30)
        for _ in range(20):  # fresh connections, spread over both workers by the kernel
            with grpc.insecure_channel(address) as channel:
                reply = external_auth_pb2_grpc.AuthorizationStub(channel).Check(request(), timeout=10)
            assert reply.status.code == 0, reply.denied_response.body
        # the path's own set is still invalid, and every worker says so
        assert metric(http_get(ops, "/metrics")[1], "authz_policy_last_reload_success") == 0
