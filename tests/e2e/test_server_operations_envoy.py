"""The server's operational features as a real Envoy sees them: TLS listener, Checks over workers."""

from __future__ import annotations

import json
import socket
import ssl
import time
from pathlib import Path

from cryptography import x509

from authz_server.demo import envoy_config as ec
from authz_server.demo.client import request
from authz_server.demo.pki import CertificateAuthority, IssuedCert, issue_workload_cert, make_ca
from authz_server.demo.processes import ProcessGroup, free_port
from authz_server.demo.upstream import EchoUpstream

POLICY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-get, namespace: foo}
spec:
  rules: [{to: [{operation: {methods: ["GET"]}}]}]
"""
FRONT = ec.Workload("front", "foo", {"app": "front"})


def _front(group: ProcessGroup, upstream: int, authz: ec.AuthzSettings) -> int:
    port = free_port()
    group.start_envoy(f"front-{port}", ec.front_proxy(ec.Proxy(free_port(), FRONT, authz, merge=ec.IdentityMerge(FRONT.namespace, "sidecar")),
                                                     listen_port=port,
                                                     upstream=ec.Upstream(upstream)))
    return port


def _serial(port: int, ca: CertificateAuthority, client: IssuedCert) -> int:
    """Serial of the certificate the listener serves, asked as an mTLS client would: with a
    client certificate (without one the server may abort the handshake before it completes)."""
    context = ssl.create_default_context(cafile=str(ca.cert_path))
    context.load_cert_chain(str(client.cert_path), str(client.key_path))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="authz.local") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_envoy_reaches_a_tls_listener_with_mtls_and_rotated_certificates(tmp_path: Path) -> None:
    ca = make_ca(tmp_path / "ca")
    server_cert = issue_workload_cert(ca, None, dns_names=("authz.local",), name="authz")
    client_cert = issue_workload_cert(ca, "spiffe://cluster.local/ns/istio-system/sa/front", name="front")
    (tmp_path / "p.yaml").write_text(POLICY)
    port = free_port()
    with EchoUpstream("app") as app, ProcessGroup(tmp_path / "logs") as group:
        group.start_authz_server(tmp_path / "p.yaml", port, [
            "--workload-namespace", "foo", "--tls-cert", str(server_cert.cert_path),
            "--tls-key", str(server_cert.key_path), "--tls-client-ca", str(ca.cert_path)],
            ready=lambda: "gRPC listening" in (tmp_path / "logs" / "authz-server.log").read_text())
        tls = ec.UpstreamTls(ca.cert_path, "authz.local", client_cert=client_cert)
        front = _front(group, app.port, ec.AuthzSettings(port, tls=tls))
        assert request(front, "/get").status == 200
        denied = request(front, "/post", method="POST")
        assert denied.status == 403 and denied.body == b"RBAC: access denied"

        before = _serial(port, ca, client_cert)
        rotated = issue_workload_cert(ca, None, dns_names=("authz.local",), name="authz-rotated")
        server_cert.cert_path.write_bytes(rotated.cert_path.read_bytes())
        server_cert.key_path.write_bytes(rotated.key_path.read_bytes())
        deadline = time.monotonic() + 10
        while _serial(port, ca, client_cert) == before:
            assert time.monotonic() < deadline, "rotated certificate never served"
            time.sleep(0.1)
        assert _serial(port, ca, client_cert) == x509.load_pem_x509_certificate(rotated.cert_path.read_bytes()).serial_number


def test_checks_from_one_envoy_spread_over_workers(tmp_path: Path) -> None:
    """SO_REUSEPORT balances connections; the ext_authz cluster's caps make Envoy open several."""
    (tmp_path / "p.yaml").write_text(POLICY)
    port, ops = free_port(), free_port()
    with EchoUpstream("app") as app, ProcessGroup(tmp_path / "logs") as group:
        group.start_authz_server(tmp_path / "p.yaml", port, [
            "--workload-namespace", "foo", "--workers", "2", "--metrics-listen", f"127.0.0.1:{ops}",
            "--decision-log", "stdout"])
        front = _front(group, app.port, ec.AuthzSettings(port, max_requests_per_connection=20))
        for _ in range(200):
            assert request(front, "/get").status == 200
    log = (tmp_path / "logs" / "authz-server.log").read_text()  # complete: workers flush on SIGTERM
    per_worker = _decisions_per_worker(log)
    assert sum(per_worker.values()) == 200
    assert len(per_worker) == 2 and min(per_worker.values()) >= 20, per_worker


def _decisions_per_worker(log: str) -> dict[int, int]:
    """Decision-log lines per worker (each line names its worker)."""
    counts: dict[int, int] = {}
    for line in log.splitlines():
        if line.startswith("{"):
            worker = json.loads(line)["worker"]
            counts[worker] = counts.get(worker, 0) + 1
    return counts
