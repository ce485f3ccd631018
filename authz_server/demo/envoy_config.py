"""Envoy bootstrap configs for the roles Istio's proxies play, each calling the authz server.

The configs copy what istiod generates where it matters to the CheckRequest (SPEC sections 5, 8 and
8.1): the sidecar's inbound listener terminates mTLS (PERMISSIVE: plaintext too), requires a client
certificate and appends to ``x-forwarded-client-cert``; gateways use the remote address and a
configurable number of trusted XFF hops; a ``CUSTOM`` provider is an RBAC filter with shadow rules
followed by the gRPC ext_authz filter enabled by the shadow match (``filter_enabled_metadata``),
calling cluster ``outbound|<port>||<fqdn>``. Each proxy's node metadata carries its workload's
``NAMESPACE`` and ``LABELS`` as Istio's does.

On top of istiod's filter, :class:`IdentityMerge` is exactly what the Helm chart's EnvoyFilter
MERGEs into it (``bootstrap_metadata_labels_key``, ``encode_raw_headers``, ``include_tls_session``,
the proxy's ``x-authz-*`` ``initial_metadata``); ``tests/deploy`` checks the chart renders the same.

Every role is the same listener/cluster/filter builders with different options; the configs are
plain dicts, written with :func:`write_config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from authz_server.grpc_api.workload_identity import KIND_KEY, NAMESPACE_KEY, TRUSTED_PROXIES_KEY

from .pki import IssuedCert

Config = dict[str, Any]

LABELS_KEY = "LABELS"
"""Node metadata key holding the workload labels, as in Istio's node metadata."""

_XFCC_DETAILS = {"subject": True, "uri": True, "dns": True}
_TLS_SOCKET = "envoy.transport_sockets.tls"
_TYPE = "type.googleapis.com/envoy."


@dataclass(frozen=True)
class Workload:
    """The workload a proxy belongs to: reported as node metadata (``NAMESPACE``, ``LABELS``)."""

    name: str
    namespace: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AuthzSettings:
    """Where the authz server listens and how Envoy's connections to it are pooled.

    Checks are spread over the server's worker processes by connection (each process accepts its
    own connections), so the pool must open several: a stream cap per HTTP/2 connection makes
    Envoy open another connection under concurrency, and a request cap per connection recycles
    connections under sequential load so new ones land on other workers. ``None`` disables a cap.
    """

    port: int
    host: str = "127.0.0.1"
    timeout_s: float = 2.0
    max_concurrent_streams: int | None = 16
    max_requests_per_connection: int | None = 1000
    #: the provider's ``service`` (istiod names the cluster ``outbound|<port>||<service>``)
    service: str = "authz-server.istio-system.svc.cluster.local"
    service_port: int = 9000
    #: TLS to a server running with --tls-cert (outside the mesh); None = plaintext
    tls: UpstreamTls | None = None
    #: Istio's ``failOpen`` (``failure_mode_allow``) and ``statusOnError`` (``status_on_error``):
    #: what Envoy answers when the Check fails (a gRPC error, a timeout, no connection)
    fail_open: bool = False
    status_on_error: int | None = None

    @property
    def cluster_name(self) -> str:
        return f"outbound|{self.service_port}||{self.service}"


@dataclass(frozen=True)
class IdentityMerge:
    """What the Helm chart's EnvoyFilter MERGEs into istiod's ext_authz filter of one proxy.

    ``bootstrap_metadata_labels_key`` makes Envoy send the node metadata ``LABELS`` (the pod's
    labels) as ``destination.labels``; ``encode_raw_headers`` sends repeated headers value by
    value; ``include_tls_session`` sends the SNI; ``initial_metadata`` adds the proxy's
    namespace, kind and trusted hops to every Check call (:mod:`authz_server.grpc_api.workload_identity`).
    """

    namespace: str
    kind: str
    num_trusted_proxies: int | None = None
    labels_key: str = LABELS_KEY

    def metadata(self) -> list[tuple[str, str]]:
        """The ``x-authz-*`` entries of the Check call."""
        entries = [(NAMESPACE_KEY, self.namespace), (KIND_KEY, self.kind)]
        if self.num_trusted_proxies is not None:
            entries.append((TRUSTED_PROXIES_KEY, str(self.num_trusted_proxies)))
        return entries

    def patch(self) -> Config:
        """The ``typed_config`` fields the EnvoyFilter's MERGE sets (without ``@type``)."""
        return {
            "bootstrap_metadata_labels_key": self.labels_key,
            "encode_raw_headers": True,
            "include_tls_session": True,
            "grpc_service": {"initial_metadata": [{"key": k, "value": v} for k, v in self.metadata()]},
        }


def merge_patch(base: Config, patch: Config) -> Config:
    """Protobuf merge semantics, as Istio applies an EnvoyFilter MERGE: messages merge field by
    field, repeated fields append, scalars are replaced."""
    merged = dict(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_patch(merged[key], value)
        elif isinstance(value, list) and isinstance(merged.get(key), list):
            merged[key] = [*merged[key], *value]
        else:
            merged[key] = value
    return merged


@dataclass(frozen=True)
class UpstreamTls:
    """Client-side TLS to an upstream: the CA to trust, SNI, optional client cert and SAN pin."""

    ca_path: Path
    sni: str
    client_cert: IssuedCert | None = None
    expected_san: str | None = None


@dataclass(frozen=True)
class Upstream:
    """A loopback upstream a route sends to."""

    port: int
    tls: UpstreamTls | None = None
    http2: bool = False
    host: str = "127.0.0.1"


@dataclass(frozen=True)
class Proxy:
    """What every role shares: admin port, workload identity, the authz server (None: no filter).

    With *authz*, the proxy has the filters istiod renders for one ``CUSTOM`` policy named
    *custom_policy* (in the workload's namespace, ``rules: [{}]``) plus *merge*, the chart's
    EnvoyFilter (``None``: a proxy the EnvoyFilter does not reach).
    """

    admin_port: int
    workload: Workload
    authz: AuthzSettings | None
    access_log: bool = True
    merge: IdentityMerge | None = None
    custom_policy: str = "ext-authz"


def front_proxy(proxy: Proxy, *, listen_port: int, upstream: Upstream) -> Config:
    """A plain HTTP listener with ext_authz in front of one upstream."""
    return _bootstrap(
        proxy,
        "front-proxy",
        [_listener("front", listen_port, [_chain(_hcm(proxy, "front", {"*": "app"}))])],
        {"app": upstream},
    )


def sidecar_server(
    proxy: Proxy, *, listen_port: int, app: Upstream, identity: IssuedCert, service_port: int = 8000
) -> Config:
    """The server workload's inbound sidecar, PERMISSIVE: mTLS with a required client cert and
    XFCC, or plaintext (a caller outside the mesh), told apart by the TLS inspector; ext_authz.

    Like Istio's inbound listener: ``forward_client_cert_details: APPEND_FORWARD`` with the
    current peer's subject, URI and DNS, ``use_remote_address: false``.
    """
    cluster = f"inbound|{service_port}||"
    hcm = _hcm(
        proxy,
        f"inbound_0.0.0.0_{service_port}",
        {"*": cluster},
        forward_client_cert_details="APPEND_FORWARD",
        set_current_client_cert_details=_XFCC_DETAILS,
    )
    chains = [
        _chain(hcm, _downstream_tls(identity, require_client_cert=True), {"transport_protocol": "tls"}),
        _chain(hcm, None, {"transport_protocol": "raw_buffer"}),
    ]
    listener = _listener("virtualInbound", listen_port, chains)
    listener["listener_filters"] = [{
        "name": "envoy.filters.listener.tls_inspector",
        "typed_config": {"@type": _TYPE + "extensions.filters.listener.tls_inspector.v3.TlsInspector"},
    }]
    return _bootstrap(proxy, "sidecar", [listener], {cluster: app})


def sidecar_client(
    proxy: Proxy, *, listen_port: int, services: Mapping[str, Upstream], service_port: int = 8000
) -> Config:
    """The client workload's outbound sidecar: plaintext from the app, mTLS onwards, by Host.

    Each service host maps to the next hop — the server's sidecar, or the egress gateway for an
    external host — carrying the client workload's certificate and the SNI Istio would use
    (``outbound_.8000_._.<host>``). Clusters are named ``outbound|<service_port>||<host>``.
    """
    routes, clusters = _by_host(services, service_port)
    hcm = _hcm(proxy, f"outbound_0.0.0.0_{listen_port}", routes)
    return _bootstrap(
        proxy, "sidecar", [_listener("virtualOutbound", listen_port, [_chain(hcm)])], clusters
    )


def load_balancer(proxy: Proxy, *, listen_port: int, upstream: Upstream) -> Config:
    """A trusted L7 load balancer in front of a gateway: appends the client's address to
    X-Forwarded-For, as a cloud load balancer does.

    Envoy's own XFF append writes the node's address for loopback peers, which would make every
    local client look alike; the LB therefore appends the direct peer's address itself.
    """
    xff = {"header": {"key": "x-forwarded-for", "value": "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%"},
           "append_action": "APPEND_IF_EXISTS_OR_ADD"}
    hcm = _hcm(proxy, "lb", {"*": "gateway"}, use_remote_address=False)
    hcm["route_config"]["request_headers_to_add"] = [xff]
    return _bootstrap(proxy, "router", [_listener("lb", listen_port, [_chain(hcm)])], {"gateway": upstream})


def ingress_gateway(
    proxy: Proxy,
    *,
    listen_port: int,
    upstream: Upstream,
    server_cert: IssuedCert,
    xff_num_trusted_hops: int = 0,
) -> Config:
    """An ingress gateway terminating TLS (no client cert) with Istio's gateway XFF handling."""
    hcm = _hcm(
        proxy,
        "outbound_0.0.0.0_443",
        {"*": "ingress-upstream"},
        **_gateway_options(xff_num_trusted_hops),
    )
    tls = _downstream_tls(server_cert, require_client_cert=False)
    return _bootstrap(
        proxy, "router", [_listener("gateway-https", listen_port, [_chain(hcm, tls)])],
        {"ingress-upstream": upstream},
    )


def egress_gateway(
    proxy: Proxy,
    *,
    listen_port: int,
    hosts: Mapping[str, Upstream],
    identity: IssuedCert | None = None,
    xff_num_trusted_hops: int = 0,
    service_port: int = 80,
) -> Config:
    """An egress gateway routing by Host to stand-in "external" upstreams.

    With *identity* the listener requires mTLS (Istio's ISTIO_MUTUAL hop from the client sidecar),
    so ``source.principal`` is the caller's SPIFFE id; without it the listener is plaintext.
    Unknown hosts get Envoy's 404.
    """
    routes, clusters = _by_host(hosts, service_port)
    hcm = _hcm(
        proxy,
        f"outbound_0.0.0.0_{service_port}",
        routes,
        **_gateway_options(xff_num_trusted_hops),
    )
    tls = _downstream_tls(identity, require_client_cert=True) if identity else None
    return _bootstrap(proxy, "router", [_listener("egress", listen_port, [_chain(hcm, tls)])], clusters)


def write_config(config: Config, path: Path) -> Path:
    """Write *config* as YAML (Envoy picks the format from the ``.yaml`` suffix)."""
    path = Path(path)
    path.write_text(yaml.dump(config, Dumper=_PlainDumper, sort_keys=False))
    return path


class _PlainDumper(yaml.SafeDumper):
    """Spells shared sub-dicts out instead of writing YAML anchors and aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _gateway_options(xff_num_trusted_hops: int) -> Config:
    """Istio's gateway HCM: trust the peer address (plus N XFF hops); XFCC default SANITIZE_SET."""
    return {
        "use_remote_address": True,
        "xff_num_trusted_hops": xff_num_trusted_hops,
        "forward_client_cert_details": "SANITIZE_SET",
        "set_current_client_cert_details": _XFCC_DETAILS,
    }


def _by_host(
    hosts: Mapping[str, Upstream], service_port: int
) -> tuple[dict[str, str], dict[str, Upstream]]:
    """Istio-named clusters ``outbound|<port>||<host>`` and the host → cluster routes to them."""
    names = {host: f"outbound|{service_port}||{host}" for host in hosts}
    return names, {names[host]: upstream for host, upstream in hosts.items()}


def _bootstrap(
    proxy: Proxy, node_type: str, listeners: list[Config], upstreams: Mapping[str, Upstream]
) -> Config:
    """Wrap listeners and clusters with node identity (Istio-style id and metadata) and admin."""
    workload = proxy.workload
    clusters = [_cluster(name, upstream) for name, upstream in upstreams.items()]
    if proxy.authz is not None:
        clusters.append(_authz_cluster(proxy.authz))
    return {
        "node": {
            "id": f"{node_type}~127.0.0.1~{workload.name}.{workload.namespace}"
            f"~{workload.namespace}.svc.cluster.local",
            "cluster": f"{workload.name}.{workload.namespace}",
            "metadata": {
                "NAMESPACE": workload.namespace,
                "WORKLOAD_NAME": workload.name,
                LABELS_KEY: dict(workload.labels),
            },
        },
        "admin": {"address": _address("127.0.0.1", proxy.admin_port)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def _chain(hcm: Config, tls: Config | None = None, match: Config | None = None) -> Config:
    chain: Config = {
        "filters": [
            {
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": hcm,
            }
        ]
    }
    if match is not None:
        chain["filter_chain_match"] = match
    if tls is not None:
        chain["transport_socket"] = tls
    return chain


def _listener(name: str, port: int, chains: list[Config]) -> Config:
    return {"name": name, "address": _address("127.0.0.1", port), "filter_chains": chains}


def _hcm(
    proxy: Proxy, stat_prefix: str, routes: Mapping[str, str], **options: Any
) -> Config:
    """An HTTP connection manager: one virtual host per domain → cluster, ext_authz, router.

    A domain ``host`` also matches ``host:<port>``; ``*`` matches everything.
    """
    virtual_hosts = [
        {
            "name": domain if domain != "*" else "default",
            "domains": [domain] if domain == "*" else [domain, f"{domain}:*"],
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": "10s"}}],
        }
        for domain, cluster in routes.items()
    ]
    filters = custom_provider_filters(proxy) if proxy.authz is not None else []
    filters.append(
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": _TYPE + "extensions.filters.http.router.v3.Router"},
        }
    )
    hcm: Config = {
        "@type": _TYPE + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": stat_prefix,
        "codec_type": "AUTO",
        "route_config": {"name": stat_prefix, "virtual_hosts": virtual_hosts},
        "http_filters": filters,
        **options,
    }
    if proxy.access_log:
        hcm["access_log"] = [
            {
                "name": "envoy.access_loggers.stdout",
                "typed_config": {"@type": _TYPE + "extensions.access_loggers.stream.v3.StdoutAccessLog"},
            }
        ]
    return hcm


EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
EXT_AUTHZ_TYPE = _TYPE + "extensions.filters.http.ext_authz.v3.ExtAuthz"


def custom_provider_filters(proxy: Proxy) -> list[Config]:
    """istiod's filters for one ``CUSTOM`` policy with ``rules: [{}]`` (SPEC 8): an RBAC filter
    whose shadow rule matches every request, then ext_authz enabled by that shadow match, then
    the EnvoyFilter's merge (if it reaches this proxy)."""
    assert proxy.authz is not None
    policy_id = f"istio-ext-authz-ns[{proxy.workload.namespace}]-policy[{proxy.custom_policy}]-rule[0]"
    rbac = {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": _TYPE + "extensions.filters.http.rbac.v3.RBAC",
            "shadow_rules": {"action": "DENY", "policies": {policy_id: {
                "permissions": [{"and_rules": {"rules": [{"any": True}]}}],
                "principals": [{"and_ids": {"ids": [{"any": True}]}}],
            }}},
            "shadow_rules_stat_prefix": "istio_ext_authz_",
        },
    }
    ext_authz = istiod_ext_authz_filter(proxy.authz)
    if proxy.merge is not None:
        ext_authz = merge_patch(ext_authz, {"typed_config": proxy.merge.patch()})
    return [rbac, ext_authz]


def istiod_ext_authz_filter(authz: AuthzSettings) -> Config:
    """The ext_authz filter as istiod renders an ``envoyExtAuthzGrpc`` provider (no EnvoyFilter)."""
    config: Config = {
        "@type": EXT_AUTHZ_TYPE,
        "transport_api_version": "V3",
        "failure_mode_allow": authz.fail_open,
        "filter_enabled_metadata": {
            "filter": "envoy.filters.http.rbac",
            "path": [{"key": "istio_ext_authz_shadow_effective_policy_id"}],
            "value": {"string_match": {"prefix": "istio-ext-authz"}},
        },
        "grpc_service": {
            "envoy_grpc": {"cluster_name": authz.cluster_name, "authority": authz.service},
            "timeout": _duration(authz.timeout_s),
        },
    }
    if authz.status_on_error is not None:
        config["status_on_error"] = {"code": authz.status_on_error}
    return {"name": EXT_AUTHZ_FILTER, "typed_config": config}


def _authz_cluster(authz: AuthzSettings) -> Config:
    """An HTTP/2 cluster whose pool opens several connections (see :class:`AuthzSettings`)."""
    http2: Config = {}
    if authz.max_concurrent_streams is not None:
        http2["max_concurrent_streams"] = authz.max_concurrent_streams
    options: Config = {
        "@type": _TYPE + "extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": http2},
    }
    if authz.max_requests_per_connection is not None:
        options["common_http_protocol_options"] = {
            "max_requests_per_connection": authz.max_requests_per_connection
        }
    cluster: Config = {
        "name": authz.cluster_name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": options
        },
        "load_assignment": _load_assignment(authz.cluster_name, authz.host, authz.port),
    }
    if authz.tls is not None:
        cluster["transport_socket"] = _upstream_tls(authz.tls, True)
    return cluster


def _cluster(name: str, upstream: Upstream) -> Config:
    cluster: Config = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": _load_assignment(name, upstream.host, upstream.port),
    }
    if upstream.http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _TYPE + "extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    if upstream.tls is not None:
        cluster["transport_socket"] = _upstream_tls(upstream.tls, upstream.http2)
    return cluster


def _downstream_tls(identity: IssuedCert, *, require_client_cert: bool) -> Config:
    common: Config = {
        "tls_certificates": [_certificate(identity)],
        "alpn_protocols": ["h2", "http/1.1"],
    }
    if require_client_cert:
        common["validation_context"] = {"trusted_ca": {"filename": str(identity.ca_path)}}
    return {
        "name": _TLS_SOCKET,
        "typed_config": {
            "@type": _TYPE + "extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": require_client_cert,
            "common_tls_context": common,
        },
    }


def _upstream_tls(tls: UpstreamTls, http2: bool) -> Config:
    validation: Config = {"trusted_ca": {"filename": str(tls.ca_path)}}
    if tls.expected_san is not None:
        validation["match_typed_subject_alt_names"] = [
            {"san_type": "URI", "matcher": {"exact": tls.expected_san}}
        ]
    common: Config = {"validation_context": validation}
    if tls.client_cert is not None:
        common["tls_certificates"] = [_certificate(tls.client_cert)]
    if http2:
        common["alpn_protocols"] = ["h2"]
    return {
        "name": _TLS_SOCKET,
        "typed_config": {
            "@type": _TYPE + "extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": tls.sni,
            "common_tls_context": common,
        },
    }


def _certificate(identity: IssuedCert) -> Config:
    return {
        "certificate_chain": {"filename": str(identity.cert_path)},
        "private_key": {"filename": str(identity.key_path)},
    }


def _load_assignment(name: str, host: str, port: int) -> Config:
    return {
        "cluster_name": name,
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(host, port)}}]}],
    }


def _address(host: str, port: int) -> Config:
    return {"socket_address": {"address": host, "port_value": port}}


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"
