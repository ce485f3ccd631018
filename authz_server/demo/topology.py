"""A whole loopback mesh around one authz server: ingress, two sidecars, egress.

Request paths, as in an Istio mesh with the server as the CUSTOM provider everywhere:

* client → **ingress gateway** (TLS, ``ingress_host``) → mTLS → **httpbin sidecar** → app;
* app "sleep" → **sleep sidecar** (plaintext) → mTLS → **httpbin sidecar** → app
  (Host ``httpbin.foo.svc.cluster.local``);
* app "sleep" → **sleep sidecar** → mTLS → **egress gateway** → "external" upstream by Host.

The ingress gateway, the httpbin sidecar and the egress gateway call the authz server; the sleep
sidecar does not (Istio evaluates authorization inbound only). Each proxy reports its workload's
labels, so one server can decide for all three.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from . import envoy_config as ec
from .client import ClientTls
from .pki import CertificateAuthority, IssuedCert, issue_workload_cert, make_ca
from .processes import ProcessGroup, free_port

TRUST_DOMAIN = "cluster.local"
SERVICE_HOST = "httpbin.foo.svc.cluster.local"
SERVICE_PORT = 8000
CHECKING_ROLES = ("ingress", "httpbin", "egress")
"""The proxies that call the authz server; the sleep sidecar (outbound only) does not."""

HTTPBIN = ec.Workload("httpbin", "foo", {"app": "httpbin", "version": "v1"})
SLEEP = ec.Workload("sleep", "foo", {"app": "sleep", "version": "v1"})
INGRESS = ec.Workload(
    "istio-ingressgateway", "istio-system", {"app": "istio-ingressgateway", "istio": "ingressgateway"}
)
EGRESS = ec.Workload(
    "istio-egressgateway", "istio-system", {"app": "istio-egressgateway", "istio": "egressgateway"}
)


def spiffe_id(namespace: str, service_account: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}"


HTTPBIN_ID = spiffe_id("foo", "httpbin")
SLEEP_ID = spiffe_id("foo", "sleep")
INGRESS_ID = spiffe_id("istio-system", "istio-ingressgateway-service-account")
EGRESS_ID = spiffe_id("istio-system", "istio-egressgateway-service-account")


@dataclass(frozen=True)
class Mesh:
    """Where each proxy of a started mesh listens, and the TLS settings to reach the ingress."""

    ca: CertificateAuthority
    ingress_host: str
    ingress_port: int
    sleep_sidecar_port: int
    httpbin_sidecar_port: int
    egress_port: int
    admin_ports: Mapping[str, int]

    def ingress_tls(self) -> ClientTls:
        """Client TLS for the ingress gateway: trust the test CA, SNI = the gateway host."""
        return ClientTls(self.ca.cert_path, self.ingress_host)


def start_mesh(
    group: ProcessGroup,
    authz: ec.AuthzSettings | None,
    *,
    app_port: int,
    external_hosts: Mapping[str, int],
    ingress_host: str = "www.example.com",
    xff_num_trusted_hops: int = 0,
    authz_by_role: Mapping[str, ec.AuthzSettings | None] | None = None,
) -> Mesh:
    """Make the PKI and start the four proxies in *group*, each ready on return.

    *app_port* is the httpbin app (any HTTP server, e.g. :class:`~.upstream.EchoUpstream`);
    *external_hosts* maps each "external" host name to a local stand-in's port. *authz* is the
    server every checking proxy calls (``None``: no ext_authz filter); *authz_by_role* overrides it
    for ``"ingress"``, ``"httpbin"`` or ``"egress"`` — e.g. one server per gateway, as deployed.
    """
    overrides = dict(authz_by_role or {})
    unknown = set(overrides) - set(CHECKING_ROLES)
    if unknown:
        raise ValueError(f"no checking proxy named {sorted(unknown)}; use {CHECKING_ROLES}")
    ca = make_ca(group.workdir / "pki")
    httpbin_cert = issue_workload_cert(ca, HTTPBIN_ID)
    sleep_cert = issue_workload_cert(ca, SLEEP_ID)
    ingress_cert = issue_workload_cert(ca, INGRESS_ID)
    egress_cert = issue_workload_cert(ca, EGRESS_ID)
    gateway_cert = issue_workload_cert(ca, None, dns_names=[ingress_host])
    ports = {name: free_port() for name in ("ingress", "sleep", "httpbin", "egress")}
    admin = {name: free_port() for name in ports}

    def proxy(name: str, workload: ec.Workload) -> ec.Proxy:
        checks = name in CHECKING_ROLES
        return ec.Proxy(admin[name], workload, overrides.get(name, authz) if checks else None)

    def mtls_to(port: int, identity: IssuedCert, host: str, peer_id: str) -> ec.Upstream:
        tls = ec.UpstreamTls(ca.cert_path, f"outbound_.{SERVICE_PORT}_._.{host}", identity, peer_id)
        return ec.Upstream(port, tls, http2=True)

    group.start_envoy(
        "httpbin-sidecar",
        ec.sidecar_server(
            proxy("httpbin", HTTPBIN),
            listen_port=ports["httpbin"],
            app=ec.Upstream(app_port),
            identity=httpbin_cert,
            service_port=SERVICE_PORT,
        ),
    )
    group.start_envoy(
        "egress-gateway",
        ec.egress_gateway(
            proxy("egress", EGRESS),
            listen_port=ports["egress"],
            hosts={host: ec.Upstream(port) for host, port in external_hosts.items()},
            identity=egress_cert,
            xff_num_trusted_hops=xff_num_trusted_hops,
        ),
    )
    egress_host = f"{EGRESS.name}.{EGRESS.namespace}.svc.{TRUST_DOMAIN}"
    services = {SERVICE_HOST: mtls_to(ports["httpbin"], sleep_cert, SERVICE_HOST, HTTPBIN_ID)}
    services.update(
        (host, mtls_to(ports["egress"], sleep_cert, egress_host, EGRESS_ID))
        for host in external_hosts
    )
    group.start_envoy(
        "sleep-sidecar",
        ec.sidecar_client(
            proxy("sleep", SLEEP),
            listen_port=ports["sleep"],
            services=services,
            service_port=SERVICE_PORT,
        ),
    )
    group.start_envoy(
        "ingress-gateway",
        ec.ingress_gateway(
            proxy("ingress", INGRESS),
            listen_port=ports["ingress"],
            upstream=mtls_to(ports["httpbin"], ingress_cert, SERVICE_HOST, HTTPBIN_ID),
            server_cert=gateway_cert,
            xff_num_trusted_hops=xff_num_trusted_hops,
        ),
    )
    return Mesh(
        ca=ca,
        ingress_host=ingress_host,
        ingress_port=ports["ingress"],
        sleep_sidecar_port=ports["sleep"],
        httpbin_sidecar_port=ports["httpbin"],
        egress_port=ports["egress"],
        admin_ports=admin,
    )
