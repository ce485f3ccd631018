"""A whole loopback mesh around ONE authz server: a load balancer and the ingress gateway, three
server sidecars, a client sidecar, the egress gateway — the roles, and starting them.

Request paths, as in an Istio mesh with the server as the CUSTOM provider everywhere:

* client → **load balancer** (trusted proxy, appends XFF) → **ingress gateway** (TLS,
  ``numTrustedProxies: 1``) → mTLS → **httpbin sidecar** → app;
* app "sleep" → **sleep sidecar** (plaintext) → mTLS → **httpbin** / **admin-api** / **legacy
  sidecar** → app (by Host ``<name>.foo.svc.cluster.local``);
* a caller outside the mesh → plaintext → a server sidecar (PERMISSIVE);
* app "sleep" → **sleep sidecar** → mTLS → **egress gateway** → "external" upstream by Host.

Every checking proxy calls the same server. :data:`ROLES` is the one place that says what each
proxy is: its workload, its certificate, and whether the Helm chart's EnvoyFilter reaches it
(``merge``) — which is how the server learns, per Check, whom it decides for. The legacy sidecar
is one the EnvoyFilter does not reach (as istiod alone configures it): its Checks carry no
labels, so the server denies them wherever a policy's scope depends on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap

from . import envoy_config as ec
from .client import ClientTls
from .pki import CertificateAuthority, issue_workload_cert, make_ca
from .processes import ProcessGroup, free_port

TRUST_DOMAIN = "cluster.local"
NAMESPACE = "foo"
SERVICE_PORT = 8000
INGRESS_TRUSTED_PROXIES = 1
"""The load balancer in front of the ingress gateway (``gatewayTopology.numTrustedProxies``)."""
EGRESS_TRUSTED_PROXIES = 0


def spiffe_id(namespace: str, service_account: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}"


def service_host(name: str, namespace: str = NAMESPACE) -> str:
    return f"{name}.{namespace}.svc.{TRUST_DOMAIN}"


@dataclass(frozen=True)
class Role:
    """One proxy of the mesh."""

    name: str
    workload: ec.Workload
    #: SPIFFE id of the proxy's workload certificate (``None``: none, or a DNS certificate)
    spiffe: str | None
    #: what the chart's EnvoyFilter merges into its ext_authz filter; ``None``: not reached by it
    merge: ec.IdentityMerge | None
    #: calls the authz server (Istio checks inbound: the client sidecar does not)
    checks: bool

    @property
    def host(self) -> str:
        return service_host(self.workload.name, self.workload.namespace)


def _sidecar(name: str, labels: Mapping[str, str], *, reached: bool = True) -> Role:
    merge = ec.IdentityMerge(NAMESPACE, "sidecar") if reached else None
    return Role(name, ec.Workload(name, NAMESPACE, labels), spiffe_id(NAMESPACE, name), merge, True)


ROLES: dict[str, Role] = {
    role.name: role for role in (
        Role("lb", ec.Workload("edge-lb", "edge", {"app": "edge-lb"}), None, None, False),
        Role("ingress", ec.Workload("istio-ingressgateway", "istio-system",
                                    {"app": "istio-ingressgateway", "istio": "ingressgateway"}),
             spiffe_id("istio-system", "istio-ingressgateway-service-account"),
             ec.IdentityMerge("istio-system", "gateway", INGRESS_TRUSTED_PROXIES), True),
        _sidecar("httpbin", {"app": "httpbin", "version": "v1"}),
        _sidecar("admin-api", {"app": "admin-api", "version": "v1"}),
        _sidecar("legacy", {"app": "legacy", "version": "v1"}, reached=False),
        Role("sleep", ec.Workload("sleep", NAMESPACE, {"app": "sleep", "version": "v1"}),
             spiffe_id(NAMESPACE, "sleep"), None, False),
        Role("egress", ec.Workload("istio-egressgateway", "istio-system",
                                   {"app": "istio-egressgateway", "istio": "egressgateway"}),
             spiffe_id("istio-system", "istio-egressgateway-service-account"),
             ec.IdentityMerge("istio-system", "gateway", EGRESS_TRUSTED_PROXIES), True),
    )
}
SERVER_SIDECARS = ("httpbin", "admin-api", "legacy")
"""The server workloads, each an app behind an inbound sidecar in namespace ``foo``."""

HTTPBIN, ADMIN_API, LEGACY = (ROLES[name].workload for name in SERVER_SIDECARS)
SLEEP, INGRESS, EGRESS = (ROLES[name].workload for name in ("sleep", "ingress", "egress"))
HTTPBIN_ID, SLEEP_ID, INGRESS_ID, EGRESS_ID = (
    ROLES[name].spiffe for name in ("httpbin", "sleep", "ingress", "egress"))
SERVICE_HOST = ROLES["httpbin"].host


@dataclass(frozen=True)
class Mesh:
    """Where each proxy of a started mesh listens, and the TLS settings to reach the ingress."""

    ca: CertificateAuthority
    ingress_host: str
    #: listen port by role name (``lb`` is the way in from outside: plain HTTP)
    ports: Mapping[str, int]
    admin_ports: Mapping[str, int]

    @property
    def lb_port(self) -> int:
        return self.ports["lb"]

    @property
    def ingress_port(self) -> int:
        """The ingress gateway itself (TLS), bypassing the load balancer."""
        return self.ports["ingress"]

    @property
    def sleep_sidecar_port(self) -> int:
        return self.ports["sleep"]

    @property
    def httpbin_sidecar_port(self) -> int:
        return self.ports["httpbin"]

    @property
    def egress_port(self) -> int:
        return self.ports["egress"]

    def ingress_tls(self) -> ClientTls:
        """Client TLS for the ingress gateway: trust the test CA, SNI = the gateway host."""
        return ClientTls(self.ca.cert_path, self.ingress_host)


def start_mesh(
    group: ProcessGroup,
    authz: ec.AuthzSettings | None,
    *,
    apps: Mapping[str, int],
    external_hosts: Mapping[str, int],
    ingress_host: str = "www.example.com",
) -> Mesh:
    """Make the PKI and start every proxy of :data:`ROLES` in *group*, each ready on return
    (see :func:`mesh_configs`)."""
    mesh, configs = mesh_configs(group.workdir / "pki", authz, apps=apps, external_hosts=external_hosts,
                                 ingress_host=ingress_host)
    for name, config in configs.items():
        group.start_envoy(name, config)
    return mesh


def mesh_configs(
    pki_dir: Path,
    authz: ec.AuthzSettings | None,
    *,
    apps: Mapping[str, int],
    external_hosts: Mapping[str, int],
    ingress_host: str = "www.example.com",
) -> tuple[Mesh, dict[str, Bootstrap]]:
    """Make the PKI in *pki_dir* and build the config of every proxy of :data:`ROLES`: where the
    mesh listens, and each Envoy's bootstrap by process name, in start order.

    *apps* maps each of :data:`SERVER_SIDECARS` to its app's port (any HTTP server, e.g.
    :class:`~.upstream.EchoUpstream`); *external_hosts* maps each "external" host name to a local
    stand-in's port. *authz* is the server every checking proxy calls (``None``: no ext_authz).
    """
    missing = set(SERVER_SIDECARS) - set(apps)
    if missing:
        raise ValueError(f"no app port for {sorted(missing)}")
    ca = make_ca(pki_dir)
    certs = {name: issue_workload_cert(ca, role.spiffe) for name, role in ROLES.items() if role.spiffe}
    gateway_cert = issue_workload_cert(ca, None, dns_names=[ingress_host])
    ports = {name: free_port() for name in ROLES}
    admin = {name: free_port() for name in ROLES}

    def proxy(name: str) -> ec.Proxy:
        role = ROLES[name]
        return ec.Proxy(admin[name], role.workload, authz if role.checks else None, merge=role.merge)

    def mtls_to(name: str, client: str, sni_host: str | None = None) -> ec.Upstream:
        role = ROLES[name]
        sni = f"outbound_.{SERVICE_PORT}_._.{sni_host or role.host}"
        return ec.Upstream(ports[name], ec.UpstreamTls(ca.cert_path, sni, certs[client], role.spiffe), http2=True)

    configs = {
        f"{name}-sidecar": ec.sidecar_server(
            proxy(name), listen_port=ports[name], app=ec.Upstream(apps[name]), identity=certs[name],
            service_port=SERVICE_PORT,
        )
        for name in SERVER_SIDECARS
    }
    configs["egress-gateway"] = ec.egress_gateway(
        proxy("egress"), listen_port=ports["egress"],
        hosts={host: ec.Upstream(port) for host, port in external_hosts.items()},
        identity=certs["egress"], xff_num_trusted_hops=EGRESS_TRUSTED_PROXIES,
    )
    services = {ROLES[name].host: mtls_to(name, "sleep") for name in SERVER_SIDECARS}
    services.update((host, mtls_to("egress", "sleep")) for host in external_hosts)
    configs["sleep-sidecar"] = ec.sidecar_client(
        proxy("sleep"), listen_port=ports["sleep"], services=services, service_port=SERVICE_PORT,
    )
    configs["ingress-gateway"] = ec.ingress_gateway(
        proxy("ingress"), listen_port=ports["ingress"], upstream=mtls_to("httpbin", "ingress"),
        server_cert=gateway_cert, xff_num_trusted_hops=INGRESS_TRUSTED_PROXIES,
    )
    configs["load-balancer"] = ec.load_balancer(
        proxy("lb"), listen_port=ports["lb"],
        upstream=ec.Upstream(ports["ingress"], ec.UpstreamTls(ca.cert_path, ingress_host)),
    )
    return Mesh(ca=ca, ingress_host=ingress_host, ports=ports, admin_ports=admin), configs
