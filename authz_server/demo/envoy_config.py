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

This module is the one place that knows the shape of each role (front proxy, load balancer,
ingress and egress gateway, server and client sidecar): every role is the same listener, cluster
and filter builders with different options, and every config is a typed ``Bootstrap`` of
``envoy-data-plane`` (:mod:`.envoy_api`), so a misspelt field or a wrong type fails here, when the
config is built, not when Envoy reads it. No waypoint role: the demo mesh runs sidecars; the
waypoint's EnvoyFilter merge is validated on a front proxy by ``tests/deploy``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Mapping, Protocol, Sequence

from envoy_data_plane.envoy.config.accesslog.v3 import AccessLog
from envoy_data_plane.envoy.config.bootstrap.v3 import Admin, Bootstrap, BootstrapStaticResources
from envoy_data_plane.envoy.config.cluster.v3 import Cluster, ClusterDiscoveryType
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    ApiVersion,
    DataSource,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    HeaderValue,
    HeaderValueOption,
    HeaderValueOptionHeaderAppendAction,
    Http2ProtocolOptions,
    HttpProtocolOptions as CommonHttpProtocolOptions,
    Node,
    SocketAddress,
    TransportSocket,
)
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter
from envoy_data_plane.envoy.config.rbac.v3 import (
    Permission,
    PermissionSet,
    Policy,
    Principal,
    PrincipalSet,
    Rbac as RbacRules,
    RbacAction,
)
from envoy_data_plane.envoy.config.route.v3 import (
    DirectResponseAction,
    Route,
    RouteAction,
    RouteConfiguration,
    RouteMatch,
    VirtualHost,
)
from envoy_data_plane.envoy.extensions.access_loggers.stream.v3 import StdoutAccessLog
from envoy_data_plane.envoy.extensions.filters.http.ext_authz.v3 import BufferSettings, ExtAuthz
from envoy_data_plane.envoy.extensions.filters.http.rbac.v3 import Rbac
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.listener.tls_inspector.v3 import TlsInspector
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpConnectionManagerCodecType,
    HttpConnectionManagerForwardClientCertDetails as ForwardClientCert,
    HttpConnectionManagerSetCurrentClientCertDetails,
    HttpFilter,
)
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CertificateValidationContext,
    CommonTlsContext,
    DownstreamTlsContext,
    SubjectAltNameMatcher,
    SubjectAltNameMatcherSanType,
    TlsCertificate,
    UpstreamTlsContext,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions,
    HttpProtocolOptionsExplicitHttpConfig,
)
from envoy_data_plane.envoy.type.matcher.v3 import (
    MetadataMatcher,
    MetadataMatcherPathSegment,
    StringMatcher,
    ValueMatcher,
)
from envoy_data_plane.envoy.type.v3 import HttpStatus, StatusCode
from envoy_data_plane.google.protobuf import Struct

from authz_server.grpc_api.workload_identity import KIND_KEY, NAMESPACE_KEY, TRUSTED_PROXIES_KEY

from .envoy_api import merge_patch, pack
from .pki import IssuedCert

LABELS_KEY = "LABELS"
"""Node metadata key holding the workload labels, as in Istio's node metadata."""

EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
EXT_AUTHZ_TYPE = pack(ExtAuthz()).type_url
_RBAC_FILTER = "envoy.filters.http.rbac"
_TLS_SOCKET = "envoy.transport_sockets.tls"
_HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_XFCC_DETAILS = HttpConnectionManagerSetCurrentClientCertDetails(subject=True, uri=True, dns=True)


@dataclass(frozen=True)
class Workload:
    """The workload a proxy belongs to: reported as node metadata (``NAMESPACE``, ``LABELS``)."""

    name: str
    namespace: str
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class UpstreamTls:
    """Client-side TLS to an upstream: the CA to trust, SNI, optional client cert and SAN pin."""

    ca_path: Path
    sni: str
    client_cert: IssuedCert | None = None
    expected_san: str | None = None


@dataclass(frozen=True)
class AuthzSettings:
    """Where the authz server listens, how Envoy's connections to it are pooled, and the provider
    options of istiod's ``envoyExtAuthzGrpc`` that the kit renders.

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
    #: the provider's ``includeRequestBodyInCheck`` (istiod's ``with_request_body``); None = no body
    include_request_body_in_check: BufferSettings | None = None
    #: Istio's ``failOpen`` (``failure_mode_allow``) and ``statusOnError`` (``status_on_error``):
    #: what Envoy answers when the Check fails (a gRPC error, a timeout, no connection)
    fail_open: bool = False
    status_on_error: int | None = None

    @property
    def cluster_name(self) -> str:
        return f"outbound|{self.service_port}||{self.service}"


class FilterMerge(Protocol):
    """What an EnvoyFilter MERGEs into istiod's ext_authz filter: the ``typed_config`` it sets."""

    def patch(self) -> ExtAuthz: ...


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

    def patch(self) -> ExtAuthz:
        """The ``typed_config`` fields the EnvoyFilter's MERGE sets."""
        return ExtAuthz(
            bootstrap_metadata_labels_key=self.labels_key,
            encode_raw_headers=True,
            include_tls_session=True,
            grpc_service=GrpcService(initial_metadata=[HeaderValue(key=k, value=v) for k, v in self.metadata()]),
        )


@dataclass(frozen=True)
class Upstream:
    """A loopback upstream a route sends to."""

    port: int
    tls: UpstreamTls | None = None
    http2: bool = False
    host: str = "127.0.0.1"


@dataclass(frozen=True)
class DirectResponse:
    """A route Envoy answers itself, without an upstream (the benchmark's, so that no app's speed
    caps what is measured)."""

    status: int = 200
    body: str = "ok\n"


@dataclass(frozen=True)
class Proxy:
    """What every role shares: admin port, workload identity, the authz server (None: no filter).

    With *authz*, the proxy has the filters istiod renders for one ``CUSTOM`` policy named
    *custom_policy* (in the workload's namespace, ``rules: [{}]``) plus *merge*, the chart's
    EnvoyFilter (``None``: a proxy the EnvoyFilter does not reach). *native_filters* (Envoy's own
    jwt_authn, RBAC) follow the CUSTOM provider's filters, as istiod orders them.
    """

    admin_port: int
    workload: Workload
    authz: AuthzSettings | None
    access_log: bool = True
    merge: FilterMerge | None = None
    custom_policy: str = "ext-authz"
    native_filters: Sequence[HttpFilter] = ()


def front_proxy(proxy: Proxy, *, listen_port: int, upstream: Upstream | DirectResponse) -> Bootstrap:
    """A plain HTTP listener with ext_authz in front of one upstream (or answering itself)."""
    return _bootstrap(
        proxy,
        "front-proxy",
        [_listener("front", listen_port, [_chain(_hcm(proxy, "front", {"*": "app"}, {"app": upstream}))])],
        {"app": upstream},
    )


def sidecar_server(
    proxy: Proxy, *, listen_port: int, app: Upstream, identity: IssuedCert, service_port: int = 8000
) -> Bootstrap:
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
        forward_client_cert_details=ForwardClientCert.APPEND_FORWARD,
        set_current_client_cert_details=_XFCC_DETAILS,
    )
    chains = [
        _chain(hcm, _downstream_tls(identity, require_client_cert=True), FilterChainMatch(transport_protocol="tls")),
        _chain(hcm, None, FilterChainMatch(transport_protocol="raw_buffer")),
    ]
    inspector = ListenerFilter(name="envoy.filters.listener.tls_inspector", typed_config=pack(TlsInspector()))
    listener = _listener("virtualInbound", listen_port, chains, [inspector])
    return _bootstrap(proxy, "sidecar", [listener], {cluster: app})


def sidecar_client(
    proxy: Proxy, *, listen_port: int, services: Mapping[str, Upstream], service_port: int = 8000
) -> Bootstrap:
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


def load_balancer(proxy: Proxy, *, listen_port: int, upstream: Upstream) -> Bootstrap:
    """A trusted L7 load balancer in front of a gateway: appends the client's address to
    X-Forwarded-For, as a cloud load balancer does.

    Envoy's own XFF append writes the node's address for loopback peers, which would make every
    local client look alike; the LB therefore appends the direct peer's address itself.
    """
    xff = HeaderValueOption(
        header=HeaderValue(key="x-forwarded-for", value="%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%"),
        append_action=HeaderValueOptionHeaderAppendAction.APPEND_IF_EXISTS_OR_ADD,
    )
    hcm = _hcm(proxy, "lb", {"*": "gateway"}, use_remote_address=False, request_headers_to_add=[xff])
    return _bootstrap(proxy, "router", [_listener("lb", listen_port, [_chain(hcm)])], {"gateway": upstream})


def ingress_gateway(
    proxy: Proxy,
    *,
    listen_port: int,
    upstream: Upstream,
    server_cert: IssuedCert,
    xff_num_trusted_hops: int = 0,
) -> Bootstrap:
    """An ingress gateway terminating TLS (no client cert) with Istio's gateway XFF handling."""
    hcm = _hcm(proxy, "outbound_0.0.0.0_443", {"*": "ingress-upstream"}, **_gateway_options(xff_num_trusted_hops))
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
) -> Bootstrap:
    """An egress gateway routing by Host to stand-in "external" upstreams.

    With *identity* the listener requires mTLS (Istio's ISTIO_MUTUAL hop from the client sidecar),
    so ``source.principal`` is the caller's SPIFFE id; without it the listener is plaintext.
    Unknown hosts get Envoy's 404.
    """
    routes, clusters = _by_host(hosts, service_port)
    hcm = _hcm(proxy, f"outbound_0.0.0.0_{service_port}", routes, **_gateway_options(xff_num_trusted_hops))
    tls = _downstream_tls(identity, require_client_cert=True) if identity else None
    return _bootstrap(proxy, "router", [_listener("egress", listen_port, [_chain(hcm, tls)])], clusters)


def http_filter(name: str, config: object) -> HttpFilter:
    """An HTTP filter *name* with *config* (an Envoy API message) as its ``typed_config``."""
    return HttpFilter(name=name, typed_config=pack(config))  # type: ignore[arg-type]


def custom_provider_filters(proxy: Proxy) -> list[HttpFilter]:
    """istiod's filters for one ``CUSTOM`` policy with ``rules: [{}]`` (SPEC 8): an RBAC filter
    whose shadow rule matches every request, then ext_authz enabled by that shadow match, then
    the EnvoyFilter's merge (if it reaches this proxy)."""
    assert proxy.authz is not None
    policy_id = f"istio-ext-authz-ns[{proxy.workload.namespace}]-policy[{proxy.custom_policy}]-rule[0]"
    every_request = Policy(
        permissions=[Permission(and_rules=PermissionSet(rules=[Permission(any=True)]))],
        principals=[Principal(and_ids=PrincipalSet(ids=[Principal(any=True)]))],
    )
    rbac = http_filter(_RBAC_FILTER, Rbac(
        shadow_rules=RbacRules(action=RbacAction.DENY, policies={policy_id: every_request}),
        shadow_rules_stat_prefix="istio_ext_authz_",
    ))
    ext_authz = istiod_ext_authz_filter(proxy.authz)
    if proxy.merge is not None:
        ext_authz = merge_patch(ext_authz, http_filter(EXT_AUTHZ_FILTER, proxy.merge.patch()))
    return [rbac, ext_authz]


def istiod_ext_authz_filter(authz: AuthzSettings) -> HttpFilter:
    """The ext_authz filter as istiod renders an ``envoyExtAuthzGrpc`` provider (no EnvoyFilter)."""
    return http_filter(EXT_AUTHZ_FILTER, ExtAuthz(
        transport_api_version=ApiVersion.V3,
        failure_mode_allow=authz.fail_open,
        filter_enabled_metadata=MetadataMatcher(
            filter=_RBAC_FILTER,
            path=[MetadataMatcherPathSegment(key="istio_ext_authz_shadow_effective_policy_id")],
            value=ValueMatcher(string_match=StringMatcher(prefix="istio-ext-authz")),
        ),
        grpc_service=GrpcService(
            envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=authz.cluster_name, authority=authz.service),
            timeout=timedelta(seconds=authz.timeout_s),
        ),
        with_request_body=authz.include_request_body_in_check,
        status_on_error=HttpStatus(code=StatusCode(authz.status_on_error)) if authz.status_on_error is not None else None,
    ))


def _gateway_options(xff_num_trusted_hops: int) -> dict[str, object]:
    """Istio's gateway HCM: trust the peer address (plus N XFF hops); XFCC default SANITIZE_SET."""
    return {
        "use_remote_address": True,
        "xff_num_trusted_hops": xff_num_trusted_hops,
        "forward_client_cert_details": ForwardClientCert.SANITIZE_SET,
        "set_current_client_cert_details": _XFCC_DETAILS,
    }


def _by_host(
    hosts: Mapping[str, Upstream], service_port: int
) -> tuple[dict[str, str], dict[str, Upstream]]:
    """Istio-named clusters ``outbound|<port>||<host>`` and the host → cluster routes to them."""
    names = {host: f"outbound|{service_port}||{host}" for host in hosts}
    return names, {names[host]: upstream for host, upstream in hosts.items()}


def _bootstrap(
    proxy: Proxy,
    node_type: str,
    listeners: list[Listener],
    upstreams: Mapping[str, Upstream | DirectResponse],
) -> Bootstrap:
    """Wrap listeners and clusters with node identity (Istio-style id and metadata) and admin."""
    workload = proxy.workload
    clusters = [_cluster(name, upstream) for name, upstream in upstreams.items() if isinstance(upstream, Upstream)]
    if proxy.authz is not None:
        clusters.append(_authz_cluster(proxy.authz))
    metadata = {"NAMESPACE": workload.namespace, "WORKLOAD_NAME": workload.name, LABELS_KEY: dict(workload.labels)}
    return Bootstrap(
        node=Node(
            id=f"{node_type}~127.0.0.1~{workload.name}.{workload.namespace}~{workload.namespace}.svc.cluster.local",
            cluster=f"{workload.name}.{workload.namespace}",
            metadata=Struct.from_dict(metadata),
        ),
        admin=Admin(address=_address("127.0.0.1", proxy.admin_port)),
        static_resources=BootstrapStaticResources(listeners=listeners, clusters=clusters),
    )


def _chain(
    hcm: HttpConnectionManager, tls: TransportSocket | None = None, match: FilterChainMatch | None = None
) -> FilterChain:
    return FilterChain(
        filters=[Filter(name="envoy.filters.network.http_connection_manager", typed_config=pack(hcm))],
        filter_chain_match=match,
        transport_socket=tls,
    )


def _listener(
    name: str, port: int, chains: list[FilterChain], listener_filters: Sequence[ListenerFilter] = ()
) -> Listener:
    return Listener(
        name=name, address=_address("127.0.0.1", port), filter_chains=chains, listener_filters=list(listener_filters)
    )


def _hcm(
    proxy: Proxy,
    stat_prefix: str,
    routes: Mapping[str, str],
    targets: Mapping[str, Upstream | DirectResponse] | None = None,
    *,
    request_headers_to_add: Sequence[HeaderValueOption] = (),
    **options: object,
) -> HttpConnectionManager:
    """An HTTP connection manager: one virtual host per domain → cluster, ext_authz, router.

    A domain ``host`` also matches ``host:<port>``; ``*`` matches everything. A cluster whose
    target (in *targets*) is a :class:`DirectResponse` is answered by Envoy itself.
    """
    virtual_hosts = [
        VirtualHost(
            name=domain if domain != "*" else "default",
            domains=[domain] if domain == "*" else [domain, f"{domain}:*"],
            routes=[_route(cluster, (targets or {}).get(cluster))],
        )
        for domain, cluster in routes.items()
    ]
    filters = custom_provider_filters(proxy) if proxy.authz is not None else []
    filters += [*proxy.native_filters, http_filter("envoy.filters.http.router", Router())]
    access_log = [AccessLog(name="envoy.access_loggers.stdout", typed_config=pack(StdoutAccessLog()))]
    return HttpConnectionManager(
        stat_prefix=stat_prefix,
        codec_type=HttpConnectionManagerCodecType.AUTO,
        route_config=RouteConfiguration(
            name=stat_prefix, virtual_hosts=virtual_hosts, request_headers_to_add=list(request_headers_to_add)
        ),
        http_filters=filters,
        access_log=access_log if proxy.access_log else [],
        **options,  # type: ignore[arg-type]
    )


def _route(cluster: str, target: Upstream | DirectResponse | None) -> Route:
    match = RouteMatch(prefix="/")
    if isinstance(target, DirectResponse):
        body = DataSource(inline_string=target.body)
        return Route(match=match, direct_response=DirectResponseAction(status=target.status, body=body))
    return Route(match=match, route=RouteAction(cluster=cluster, timeout=timedelta(seconds=10)))


def _authz_cluster(authz: AuthzSettings) -> Cluster:
    """An HTTP/2 cluster whose pool opens several connections (see :class:`AuthzSettings`)."""
    common = None
    if authz.max_requests_per_connection is not None:
        common = CommonHttpProtocolOptions(max_requests_per_connection=authz.max_requests_per_connection)
    options = HttpProtocolOptions(
        explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
            http2_protocol_options=Http2ProtocolOptions(max_concurrent_streams=authz.max_concurrent_streams)
        ),
        common_http_protocol_options=common,
    )
    return _static_cluster(authz.cluster_name, authz.host, authz.port, options, authz.tls, http2=True)


def _cluster(name: str, upstream: Upstream) -> Cluster:
    options = None
    if upstream.http2:
        options = HttpProtocolOptions(
            explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(http2_protocol_options=Http2ProtocolOptions())
        )
    return _static_cluster(name, upstream.host, upstream.port, options, upstream.tls, http2=upstream.http2)


def _static_cluster(
    name: str, host: str, port: int, options: HttpProtocolOptions | None, tls: UpstreamTls | None, *, http2: bool
) -> Cluster:
    """One loopback endpoint, optionally with upstream HTTP protocol options and TLS."""
    endpoint = LbEndpoint(endpoint=Endpoint(address=_address(host, port)))
    return Cluster(
        name=name,
        type=ClusterDiscoveryType.STATIC,
        connect_timeout=timedelta(seconds=1),
        load_assignment=ClusterLoadAssignment(cluster_name=name, endpoints=[LocalityLbEndpoints(lb_endpoints=[endpoint])]),
        typed_extension_protocol_options={_HTTP_PROTOCOL_OPTIONS: pack(options)} if options is not None else {},
        transport_socket=_upstream_tls(tls, http2) if tls is not None else None,
    )


def _downstream_tls(identity: IssuedCert, *, require_client_cert: bool) -> TransportSocket:
    validation = None
    if require_client_cert:
        validation = CertificateValidationContext(trusted_ca=DataSource(filename=str(identity.ca_path)))
    return _tls_socket(DownstreamTlsContext(
        require_client_certificate=require_client_cert,
        common_tls_context=CommonTlsContext(
            tls_certificates=[_certificate(identity)], alpn_protocols=["h2", "http/1.1"], validation_context=validation
        ),
    ))


def _upstream_tls(tls: UpstreamTls, http2: bool) -> TransportSocket:
    san = []
    if tls.expected_san is not None:
        san = [SubjectAltNameMatcher(
            san_type=SubjectAltNameMatcherSanType.URI, matcher=StringMatcher(exact=tls.expected_san)
        )]
    validation = CertificateValidationContext(
        trusted_ca=DataSource(filename=str(tls.ca_path)), match_typed_subject_alt_names=san
    )
    return _tls_socket(UpstreamTlsContext(
        sni=tls.sni,
        common_tls_context=CommonTlsContext(
            validation_context=validation,
            tls_certificates=[_certificate(tls.client_cert)] if tls.client_cert is not None else [],
            alpn_protocols=["h2"] if http2 else [],
        ),
    ))


def _tls_socket(context: DownstreamTlsContext | UpstreamTlsContext) -> TransportSocket:
    return TransportSocket(name=_TLS_SOCKET, typed_config=pack(context))


def _certificate(identity: IssuedCert) -> TlsCertificate:
    return TlsCertificate(
        certificate_chain=DataSource(filename=str(identity.cert_path)),
        private_key=DataSource(filename=str(identity.key_path)),
    )


def _address(host: str, port: int) -> Address:
    return Address(socket_address=SocketAddress(address=host, port_value=port))
