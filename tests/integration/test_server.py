"""The real ``authz-server serve`` process over gRPC: Check, health, reload, diagnostics, shutdown."""

from __future__ import annotations

import signal
import textwrap
import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from authz_server._proto import diagnostics_pb2, diagnostics_pb2_grpc
from authz_server.demo.processes import ManagedProcess, ProcessGroup, authz_server_command, free_port, grpc_serving
from authz_server.explain import check_request_from_description

ALLOW_GET_FROM_SLEEP = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-sleep, namespace: foo}
spec:
  rules:
  - from: [{source: {principals: ["cluster.local/ns/foo/sa/sleep"]}}]
    to: [{operation: {methods: ["GET"]}}]
"""
DENY_ALL = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: foo}
spec:
  action: DENY
  rules: [{}]
"""


def request(principal: str = "spiffe://cluster.local/ns/foo/sa/sleep", method: str = "GET") -> CheckRequest:
    return check_request_from_description({
        "method": method, "host": "httpbin.foo:8000", "path": "/get?x=1",
        "source": {"principal": principal, "address": "10.0.0.5", "port": 40000},
        "destination": {"principal": "spiffe://cluster.local/ns/foo/sa/httpbin", "address": "10.0.1.10", "port": 80},
    })


class Server:
    def __init__(self, group: ProcessGroup, policies: Path, port: int, process: ManagedProcess) -> None:
        self.group, self.policies, self.process = group, policies, process
        self.address = f"127.0.0.1:{port}"
        self.channel = grpc.insecure_channel(self.address)
        self.check = external_auth_pb2_grpc.AuthorizationStub(self.channel).Check
        self.diagnostics = diagnostics_pb2_grpc.DiagnosticsStub(self.channel)

    def health(self) -> int:
        return health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


@pytest.fixture(params=["fast", "grpcio"])
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Server]:
    """The server on each serving layer: everything here must hold for both."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "allow.yaml").write_text(ALLOW_GET_FROM_SLEEP)
    port = free_port()
    with ProcessGroup(tmp_path / "logs") as group:
        process = group.start_authz_server(policies, port, ["--serving", request.param])
        srv = Server(group, policies, port, process)
        yield srv
        srv.channel.close()


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_allow_and_deny_over_grpc(server: Server) -> None:
    allowed = server.check(request(), timeout=5)
    assert allowed.status.code == 0
    denied = server.check(request(principal="spiffe://cluster.local/ns/bar/sa/x"), timeout=5)
    assert denied.status.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert denied.denied_response.status.code == 403
    assert denied.denied_response.body == "RBAC: access denied"
    headers = {h.header.key: h.header.value for h in denied.denied_response.headers}
    assert headers["x-ext-authz-policy"] == "no-allow-match"


def test_malformed_check_request_is_denied_not_an_error(server: Server) -> None:
    response = server.check(CheckRequest(), timeout=5)
    assert response.status.code != 0 and response.denied_response.status.code == 403
    assert "malformed CheckRequest" in server.process.log_tail(50)


def _deny_header(response) -> str:
    return {h.header.key: h.header.value for h in response.denied_response.headers}.get("x-ext-authz-policy", "")


def test_the_proxy_identity_arrives_as_call_metadata(server: Server) -> None:
    """A plaintext caller's Check has no destination.principal: the namespace comes from the
    proxy's x-authz-* call metadata (Envoy's initial_metadata), on both serving layers."""
    plaintext = check_request_from_description({
        "method": "GET", "host": "httpbin.foo:8000", "path": "/get",
        "source": {"address": "10.0.0.5", "port": 40000}, "destination": {"address": "10.0.1.10", "port": 80},
    })
    unknown = server.check(plaintext, timeout=5)
    assert unknown.status.message == "unknown_workload_namespace"
    assert _deny_header(unknown) == "unknown_workload_namespace"
    known = server.check(plaintext, metadata=(("x-authz-workload-namespace", "foo"),), timeout=5)
    assert known.status.message == "no_allow_match"  # decided by foo's policy: no principal, no allow
    bad = server.check(plaintext, metadata=(("x-authz-workload-kind", "mainframe"),), timeout=5)
    assert bad.status.message == "bad_proxy_metadata" and bad.denied_response.status.code == 403
    assert "bad proxy metadata" in server.process.log_tail(50)
    contradicting = server.check(request(), metadata=(("x-authz-workload-namespace", "bar"),), timeout=5)
    assert contradicting.status.message == "bad_proxy_metadata"


def test_sighup_reload_switches_decisions_and_rejects_a_bad_set(server: Server) -> None:
    (server.policies / "deny.yaml").write_text(DENY_ALL)
    server.process.popen.send_signal(signal.SIGHUP)
    wait_for(lambda: server.check(request(), timeout=5).status.code != 0)
    assert server.diagnostics.PolicyStatus(diagnostics_pb2.PolicyStatusRequest()).generation == 2

    (server.policies / "broken.yaml").write_text("kind: AuthorizationPolicy\napiVersion: security.istio.io/v1\n")
    server.process.popen.send_signal(signal.SIGHUP)
    wait_for(lambda: "rejected" in server.process.log_tail(50))
    status = server.diagnostics.PolicyStatus(diagnostics_pb2.PolicyStatusRequest())
    assert status.generation == 2 and status.authorization_policies == 2  # last good set kept
    assert server.health() == health_pb2.HealthCheckResponse.SERVING
    assert server.check(request(), timeout=5).status.code != 0  # still deny-all


def test_diagnostics_explain(server: Server) -> None:
    doc = textwrap.dedent("""\
        method: POST
        host: httpbin.foo:8000
        path: /post
        source: {principal: spiffe://cluster.local/ns/foo/sa/sleep, address: 10.0.0.5}
        destination: {principal: spiffe://cluster.local/ns/foo/sa/httpbin, address: 10.0.1.10, port: 80}
        """)
    answer = server.diagnostics.Explain(diagnostics_pb2.ExplainRequest(request_document=doc))
    assert not answer.allowed and answer.http_status == 403
    assert "to[0].operation.methods" in answer.text
    with pytest.raises(grpc.RpcError) as info:
        server.diagnostics.Explain(diagnostics_pb2.ExplainRequest(request_document="[1, 2]"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def list_services(server: Server) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    return {s.name for r in responses for s in r.list_services_response.service}


def test_reflection_lists_every_service_and_describes_check(server: Server) -> None:
    assert {"envoy.service.auth.v3.Authorization", "authz_server.diagnostics.v1.Diagnostics",
            "grpc.health.v1.Health"} <= list_services(server)
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    requests = [reflection_pb2.ServerReflectionRequest(file_containing_symbol="envoy.service.auth.v3.Authorization"),
                reflection_pb2.ServerReflectionRequest(list_services="")]
    responses = list(stub.ServerReflectionInfo(iter(requests), timeout=5))
    assert len(responses) == 2 and responses[0].file_descriptor_response.file_descriptor_proto


@pytest.mark.parametrize("server", ["fast"], indirect=True)
def test_fast_layer_answers_unserved_methods_with_unimplemented(server: Server) -> None:
    with pytest.raises(grpc.RpcError) as info:
        health_pb2_grpc.HealthStub(server.channel).Watch(health_pb2.HealthCheckRequest(), timeout=5).next()
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert server.health() == health_pb2.HealthCheckResponse.SERVING  # the connection is still fine


def test_sigterm_drains_and_exits_zero(server: Server) -> None:
    server.process.popen.send_signal(signal.SIGTERM)
    assert server.process.popen.wait(timeout=20) == 0
    assert "stopped" in server.process.log_tail(5)


def test_invalid_policies_at_startup_never_serve_and_deny(tmp_path: Path) -> None:
    policies = tmp_path / "bad.yaml"
    policies.write_text(DENY_ALL.replace("rules: [{}]", "rules: [{to: []}]"))
    port = free_port()
    address = f"127.0.0.1:{port}"
    with ProcessGroup(tmp_path / "logs") as group:
        process = group.start(
            "authz-server", [*authz_server_command(), "serve", "--policies", str(policies), "--listen", address],
            ready=lambda: all(line in (tmp_path / "logs" / "authz-server.log").read_text()
                              for line in ("rejected", "gRPC listening")),
        )
        assert not grpc_serving(address)
        with grpc.insecure_channel(address) as channel:
            response = external_auth_pb2_grpc.AuthorizationStub(channel).Check(request(), timeout=5)
        assert response.status.code != 0 and response.denied_response.status.code == 403
        assert "spec.rules[0].to: empty `to`" in process.log_tail(20)
