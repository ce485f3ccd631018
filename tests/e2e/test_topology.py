"""The demo topology kit, proved through real Envoy processes.

The tests run against the recording Check server (allow-all), so they assert what Envoy sends in
each Istio role — principals from real mTLS handshakes, labels from node metadata, the
EnvoyFilter's call metadata, XFF and XFCC — and that requests reach the right upstream. The
project's own server behind the same mesh is ``test_one_release.py``.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import textwrap
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from authz_server.demo import envoy_config as ec
from authz_server.demo.client import ClientTls, Reply, request
from authz_server.demo.pki import issue_workload_cert, make_ca
from authz_server.demo.processes import (
    ProcessError,
    ProcessGroup,
    free_port,
    grpc_serving,
    port_open,
)
from authz_server.demo.topology import (
    EGRESS,
    EGRESS_ID,
    HTTPBIN,
    HTTPBIN_ID,
    INGRESS,
    INGRESS_ID,
    LEGACY,
    ROLES,
    SERVICE_HOST,
    SLEEP_ID,
    Mesh,
)
from authz_server.demo.upstream import EchoUpstream

from .conftest import EXTERNAL_HOST, OTHER_EXTERNAL_HOST, TEST_ID_HEADER, RecordingAuthz, check_headers

FRONT = ec.Workload("front", "default", {"app": "front"})
FRONT_MERGE = ec.IdentityMerge("default", "sidecar")


def _tagged(port: int, path: str = "/", **kwargs: Any) -> tuple[str, Reply]:
    """Send a request tagged with a fresh test id, so its CheckRequests can be found."""
    test_id = uuid.uuid4().hex
    headers = {TEST_ID_HEADER: test_id, **kwargs.pop("headers", {})}
    return test_id, request(port, path, headers=headers, **kwargs)


def _start_front(
    group: ProcessGroup, upstream_port: int, authz: ec.AuthzSettings | None,
    merge: ec.IdentityMerge | None = FRONT_MERGE,
) -> int:
    listen_port = free_port()
    config = ec.front_proxy(
        ec.Proxy(free_port(), FRONT, authz, merge=merge), listen_port=listen_port, upstream=ec.Upstream(upstream_port)
    )
    group.start_envoy(f"front-{listen_port}", config)
    return listen_port


def test_pki_issues_spiffe_and_dns_certificates(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    workload = issue_workload_cert(ca, SLEEP_ID)
    server = issue_workload_cert(ca, None, dns_names=["localhost", "www.example.com"])
    workload_cert = x509.load_pem_x509_certificate(workload.cert_path.read_bytes())
    sans = workload_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert sans.value.get_values_for_type(x509.UniformResourceIdentifier) == [SLEEP_ID]
    assert sans.critical and len(workload_cert.subject) == 0
    server_cert = x509.load_pem_x509_certificate(server.cert_path.read_bytes())
    dns = server_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert dns.value.get_values_for_type(x509.DNSName) == ["localhost", "www.example.com"]
    assert workload.key_path.stat().st_mode & 0o077 == 0
    ssl.create_default_context(cafile=str(ca.cert_path)).load_cert_chain(
        str(server.cert_path), str(server.key_path)
    )


def test_front_proxy_without_authz_forwards(tmp_path: Path, app: EchoUpstream) -> None:
    with ProcessGroup(tmp_path) as group:
        port = _start_front(group, app.port, authz=None)
        reply = request(port, "/hello?x=1", method="POST", host="example.com", body=b"abc")
    assert reply.status == 200
    echo = reply.json()
    assert (echo["name"], echo["method"], echo["path"]) == ("httpbin", "POST", "/hello?x=1")
    assert echo["headers"]["host"] == "example.com" and echo["body_bytes"] == 3


def test_front_proxy_checks_each_request(
    tmp_path: Path, app: EchoUpstream, recorder: RecordingAuthz
) -> None:
    """istiod's CUSTOM filters (RBAC shadow rule + filter_enabled_metadata) call the provider for
    every request; the EnvoyFilter merge adds labels, raw headers and the x-authz-* call metadata."""
    with ProcessGroup(tmp_path) as group:
        port = _start_front(group, app.port, ec.AuthzSettings(port=recorder.port))
        test_id, reply = _tagged(port, path="/a/b?q=1", host="svc.example.com", headers={"x-role": ["a", "b"]})
    assert reply.status == 200
    [check] = recorder.checks_for(test_id)
    http = check.attributes.request.http
    assert (http.method, http.path, http.host) == ("GET", "/a/b?q=1", "svc.example.com")
    assert dict(check.attributes.destination.labels) == dict(FRONT.labels)
    assert check.attributes.source.principal == ""
    assert not http.headers  # encode_raw_headers: every value on its own
    assert [(h.key, h.raw_value) for h in http.header_map.headers if h.key == "x-role"] == [
        ("x-role", b"a"), ("x-role", b"b")]
    assert recorder.metadata_for(test_id) == [dict(FRONT_MERGE.metadata())]


def test_without_the_merge_envoy_sends_what_istiod_configures(
    tmp_path: Path, app: EchoUpstream, recorder: RecordingAuthz
) -> None:
    """The baseline the EnvoyFilter fixes: no labels, repeated headers joined, no metadata."""
    with ProcessGroup(tmp_path) as group:
        port = _start_front(group, app.port, ec.AuthzSettings(port=recorder.port), merge=None)
        test_id, reply = _tagged(port, headers={"x-role": ["admin", "user"]})
    assert reply.status == 200
    [check] = recorder.checks_for(test_id)
    assert not check.attributes.destination.labels and not check.attributes.request.http.header_map.headers
    assert check.attributes.request.http.headers["x-role"] == "admin,user"
    assert recorder.metadata_for(test_id) == [{}]


def test_front_proxy_fails_closed_when_authz_is_down(tmp_path: Path, app: EchoUpstream) -> None:
    with ProcessGroup(tmp_path) as group:
        port = _start_front(group, app.port, ec.AuthzSettings(port=free_port(), timeout_s=0.5))
        reply = request(port, "/")
    assert reply.status == 403


def test_sidecars_carry_the_client_identity_over_mtls(
    mesh: Mesh, recorder: RecordingAuthz
) -> None:
    test_id, reply = _tagged(mesh.sleep_sidecar_port, path="/headers", host=SERVICE_HOST)
    assert reply.status == 200
    [check] = recorder.checks_for(test_id)  # the client sidecar does not check, as in Istio
    attributes = check.attributes
    assert attributes.source.principal == SLEEP_ID
    assert attributes.destination.principal == HTTPBIN_ID
    assert dict(attributes.destination.labels) == dict(HTTPBIN.labels)
    assert recorder.metadata_for(test_id) == [dict(ROLES["httpbin"].merge.metadata())]
    xfcc = check_headers(check)["x-forwarded-client-cert"]
    assert f"URI={SLEEP_ID}" in xfcc and xfcc.startswith(f"By={HTTPBIN_ID};")
    assert reply.json()["headers"]["x-forwarded-client-cert"] == xfcc


def test_a_plaintext_caller_is_identified_by_the_proxys_metadata(
    mesh: Mesh, recorder: RecordingAuthz
) -> None:
    """PERMISSIVE: a caller outside the mesh reaches the sidecar in plaintext. No certificate
    names anyone, yet the Check still says which workload it is for."""
    test_id, reply = _tagged(mesh.httpbin_sidecar_port, path="/get", host=SERVICE_HOST)
    assert reply.status == 200 and reply.json()["name"] == "httpbin"
    [check] = recorder.checks_for(test_id)
    assert check.attributes.source.principal == "" and check.attributes.destination.principal == ""
    assert dict(check.attributes.destination.labels) == dict(HTTPBIN.labels)
    assert recorder.metadata_for(test_id)[0]["x-authz-workload-namespace"] == "foo"


def test_a_sidecar_the_envoyfilter_misses_sends_no_workload_identity(
    mesh: Mesh, recorder: RecordingAuthz
) -> None:
    test_id, reply = _tagged(mesh.sleep_sidecar_port, path="/get", host=ROLES["legacy"].host)
    assert reply.status == 200 and reply.json()["name"] == "legacy"
    [check] = recorder.checks_for(test_id)
    assert check.attributes.destination.principal == ROLES["legacy"].spiffe  # mTLS: namespace only
    assert not check.attributes.destination.labels and LEGACY.labels
    assert recorder.metadata_for(test_id) == [{}]


def test_server_sidecar_requires_a_client_certificate(mesh: Mesh) -> None:
    tls = ClientTls(mesh.ca.cert_path, SERVICE_HOST)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        request(mesh.httpbin_sidecar_port, host=SERVICE_HOST, tls=tls)


def test_ingress_gateway_terminates_tls_and_appends_xff(
    mesh: Mesh, recorder: RecordingAuthz
) -> None:
    test_id, reply = _tagged(
        mesh.ingress_port, path="/get", tls=mesh.ingress_tls(),
        headers={"x-forwarded-for": "203.0.113.7"},
    )
    assert reply.status == 200
    gateway, sidecar = recorder.checks_for(test_id)
    assert gateway.attributes.source.principal == ""
    assert gateway.attributes.destination.principal == mesh.ingress_host
    assert dict(gateway.attributes.destination.labels) == dict(INGRESS.labels)
    assert gateway.attributes.tls_session.sni == mesh.ingress_host  # include_tls_session
    assert recorder.metadata_for(test_id)[0] == dict(ROLES["ingress"].merge.metadata())
    headers = check_headers(gateway)
    assert headers[":scheme"] == "https" and headers[":authority"] == mesh.ingress_host
    xff = headers["x-forwarded-for"].split(",")
    # The peer is appended (on loopback Envoy writes its node address, not 127.0.0.1); with one
    # trusted hop the client-supplied entry is the trusted client address.
    assert len(xff) == 2 and xff[0] == "203.0.113.7"
    assert headers["x-envoy-external-address"] == "203.0.113.7"
    assert sidecar.attributes.source.principal == INGRESS_ID
    assert sidecar.attributes.destination.principal == HTTPBIN_ID
    assert reply.json()["headers"]["x-forwarded-for"] == headers["x-forwarded-for"]


def test_the_load_balancer_appends_the_real_client_address(
    mesh: Mesh, recorder: RecordingAuthz
) -> None:
    """Through the trusted LB, from another loopback address, with a spoofed XFF entry: the
    gateway's trusted client address (Envoy's own x-envoy-external-address) is the LB's entry."""
    test_id, reply = _tagged(mesh.lb_port, path="/get", host=mesh.ingress_host, source="127.0.0.2",
                             headers={"x-forwarded-for": "203.0.113.7"})
    assert reply.status == 200
    gateway, _ = recorder.checks_for(test_id)
    headers = check_headers(gateway)
    xff = [e.strip() for e in headers["x-forwarded-for"].split(",")]
    assert xff[:2] == ["203.0.113.7", "127.0.0.2"] and len(xff) == 3
    assert headers["x-envoy-external-address"] == "127.0.0.2"


def test_egress_gateway_routes_by_host_and_sees_the_client(
    mesh: Mesh, recorder: RecordingAuthz
) -> None:
    replies = {
        host: _tagged(mesh.sleep_sidecar_port, path="/v1", host=host)
        for host in (EXTERNAL_HOST, OTHER_EXTERNAL_HOST)
    }
    assert {host: r.json()["name"] for host, (_, r) in replies.items()} == {
        EXTERNAL_HOST: "external", OTHER_EXTERNAL_HOST: "other-external"
    }
    [check] = recorder.checks_for(replies[EXTERNAL_HOST][0])
    assert recorder.metadata_for(replies[EXTERNAL_HOST][0])[0] == dict(ROLES["egress"].merge.metadata())
    assert check.attributes.request.http.host == EXTERNAL_HOST
    assert check.attributes.source.principal == SLEEP_ID
    assert check.attributes.destination.principal == EGRESS_ID
    assert dict(check.attributes.destination.labels) == dict(EGRESS.labels)
    _, unknown = _tagged(mesh.sleep_sidecar_port, host="unknown.example")
    assert unknown.status == 404


def test_checks_spread_over_connections_under_sequential_load(
    tmp_path: Path, app: EchoUpstream, recorder: RecordingAuthz
) -> None:
    authz = ec.AuthzSettings(port=recorder.port, max_requests_per_connection=5)
    with ProcessGroup(tmp_path) as group:
        port = _start_front(group, app.port, authz)
        test_id = uuid.uuid4().hex
        for _ in range(20):
            assert request(port, headers={TEST_ID_HEADER: test_id}).status == 200
    assert len(recorder.checks_for(test_id)) == 20
    assert len(recorder.peers_for(test_id)) >= 4


def test_checks_spread_over_connections_under_concurrency(
    tmp_path: Path, app: EchoUpstream
) -> None:
    with RecordingAuthz() as slow, ProcessGroup(tmp_path) as group:
        slow.delay_s = 0.3
        authz = ec.AuthzSettings(
            port=slow.port, max_concurrent_streams=2, max_requests_per_connection=None
        )
        port = _start_front(group, app.port, authz)
        test_id = uuid.uuid4().hex
        with ThreadPoolExecutor(max_workers=6) as pool:
            statuses = list(
                pool.map(lambda _: request(port, headers={TEST_ID_HEADER: test_id}).status, range(6))
            )
        assert statuses == [200] * 6
        assert len(slow.peers_for(test_id)) >= 3


def test_process_group_reports_early_exit_with_log(tmp_path: Path) -> None:
    with ProcessGroup(tmp_path) as group:
        argv = [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]
        with pytest.raises(ProcessError, match="exited with 3(.|\n)*boom"):
            group.start("crash", argv, ready=lambda: False, timeout_s=5)


def test_process_group_kills_children_on_error(tmp_path: Path) -> None:
    port = free_port()
    with pytest.raises(RuntimeError, match="fail inside"):
        with ProcessGroup(tmp_path) as group:
            upstream = group.start_upstream("echo", port)
            assert request(port, "/x").json()["name"] == "echo"
            raise RuntimeError("fail inside")
    assert upstream.popen.returncode is not None
    assert not port_open(port)


def test_grpc_serving_probe(recorder: RecordingAuthz) -> None:
    # The recorder has no health service: reachable but not SERVING.
    assert not grpc_serving(f"127.0.0.1:{recorder.port}")
    assert not grpc_serving(f"127.0.0.1:{free_port()}")


_SUPERVISOR = textwrap.dedent(
    """\
    import signal, sys, time
    from pathlib import Path
    from authz_server.demo.processes import ProcessGroup, exit_on_sigterm, free_port
    exit_on_sigterm()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    with ProcessGroup(Path(sys.argv[1])) as group:
        print(group.start_upstream("echo", free_port()).pid, flush=True)
        time.sleep(60)
    """
)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_supervisor_signal_leaves_no_orphans(tmp_path: Path, signum: int) -> None:
    supervisor = subprocess.Popen(
        [sys.executable, "-c", _SUPERVISOR, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert supervisor.stdout is not None
    try:
        child_pid = int(supervisor.stdout.readline())
        supervisor.send_signal(signum)
        supervisor.wait(timeout=10)
    finally:
        supervisor.kill()
        supervisor.wait()
    with pytest.raises(ProcessLookupError):
        os.kill(child_pid, 0)
