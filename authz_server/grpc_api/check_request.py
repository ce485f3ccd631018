"""CheckRequest (envoy.service.auth.v3) -> RequestAttributes.

What Istio's Envoy actually sends is in SPEC 8.1: the peer's SPIFFE id, addresses, the HTTP
request with lower-cased headers, and the proxy's own identity in ``destination.principal``.
Things the engine needs but Envoy does not send by default (the workload's labels, remote.ip,
the SNI) are derived here, come from the calling proxy's gRPC metadata
(:mod:`.workload_identity`), or from static settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from envoy.service.auth.v3.external_auth_pb2 import CheckRequest

from authz_server.engine.request import IPAddress, RequestAttributes, Workload, parse_ip, strip_query
from authz_server.grpc_api.workload_identity import NO_PROXY_IDENTITY, BadProxyMetadata, ProxyIdentity

GATEWAY_KINDS = frozenset({"gateway", "k8s-gateway"})
#: The SPIFFE standard: implementations need not accept an ID longer than 2,048 bytes.
MAX_SPIFFE_ID_BYTES = 2048


class MalformedCheckRequest(ValueError):
    """The CheckRequest lacks what every HTTP Check carries; it is denied, never an error."""

    reason = "malformed_request"


@dataclass(frozen=True, slots=True)
class RequestContextSettings:
    """Static facts about the proxy that calls us, for what neither the CheckRequest nor the
    call's metadata tells (sidecar-local, a release per gateway or waypoint)."""

    workload: Workload = field(default_factory=lambda: Workload(None, None))
    num_trusted_proxies: int = 0


def namespace_from_spiffe(principal: str) -> str | None:
    """``spiffe://td/ns/<ns>/sa/<sa>`` -> ``<ns>``; ``None`` for anything else."""
    if not principal.startswith("spiffe://"):
        return None
    parts = principal[len("spiffe://"):].split("/")
    if len(parts) >= 5 and parts[1] == "ns" and parts[3] == "sa" and parts[2]:
        return parts[2]
    return None


def remote_ip(
    xff: str | None, peer: IPAddress | None, kind: str, num_trusted_proxies: int
) -> IPAddress | None:
    """Envoy's trusted client address (SPEC 5).

    Sidecars and waypoints (``use_remote_address: false``, 0 hops) take the rightmost XFF
    entry. Gateways (``use_remote_address: true``) have already appended the peer, so with N
    trusted proxies the answer is the (N+1)-th entry from the right, or the peer when there
    are fewer entries or N is 0.
    """
    if not xff:
        return peer
    if kind in GATEWAY_KINDS:
        if num_trusted_proxies <= 0:
            return peer
        # Only the rightmost N+1 entries matter: split no further than that.
        entries = xff.rsplit(",", num_trusted_proxies + 1)
        if len(entries) <= num_trusted_proxies:
            return peer
        return parse_ip(entries[-1 - num_trusted_proxies]) or peer
    return parse_ip(xff.rpartition(",")[2]) or peer


def to_attributes(
    request: CheckRequest, settings: RequestContextSettings, proxy: ProxyIdentity = NO_PROXY_IDENTITY
) -> RequestAttributes:
    """Convert one CheckRequest sent by the proxy *proxy* says it is.

    Raises :class:`MalformedCheckRequest` when it is not HTTP, :class:`BadProxyMetadata` when the
    proxy's metadata contradicts its certificate.
    """
    attrs = request.attributes
    http = attrs.request.http
    if not http.method or not http.path:
        raise MalformedCheckRequest("CheckRequest has no HTTP method or path")
    headers = _lower_case_names(http.headers)
    header_values: dict[str, tuple[str, ...]] | None = None
    if http.header_map.headers:
        collected: dict[str, list[str]] = {}
        for hv in http.header_map.headers:
            value = hv.value or hv.raw_value.decode("utf-8", "replace")
            collected.setdefault(hv.key.lower(), []).append(value)
        header_values = {k: tuple(v) for k, v in collected.items()}
        if not headers:
            headers = {k: ",".join(v) for k, v in header_values.items()}
    source_principal = attrs.source.principal
    if len(source_principal) > MAX_SPIFFE_ID_BYTES // 4 and len(source_principal.encode()) > MAX_SPIFFE_ID_BYTES:
        raise MalformedCheckRequest(f"source.principal longer than {MAX_SPIFFE_ID_BYTES} bytes (SPIFFE's limit)")
    source_ip = parse_ip(attrs.source.address.socket_address.address)
    dest = attrs.destination.address.socket_address
    workload = _workload(attrs.destination.principal, attrs.destination.labels, proxy, settings.workload)
    trusted = settings.num_trusted_proxies if proxy.num_trusted_proxies is None else proxy.num_trusted_proxies
    return RequestAttributes(
        method=http.method,
        host=http.host or headers.get(":authority", ""),
        path=strip_query(http.path),
        raw_path=http.path,
        headers=headers,
        header_values=header_values,
        source_principal=source_principal or None,
        source_ip=source_ip,
        remote_ip=remote_ip(headers.get("x-forwarded-for"), source_ip, workload.kind, trusted),
        destination_ip=parse_ip(dest.address),
        destination_port=dest.port_value if dest.address else None,
        sni=attrs.tls_session.sni or None,
        workload=workload,
    )


def _lower_case_names(sent: Mapping[str, str]) -> dict[str, str]:
    """Envoy sends lower-case names already; lower-case only if one is not (a foreign client).

    Two names that differ only in case (``X-Debug`` and ``x-debug``, possible only from a
    direct gRPC client) make the request malformed: a protobuf map has no order to merge them
    by, and picking one would let the decision differ between processes.
    """
    # (A comprehension reads a protobuf map faster than dict(); one joined string is checked at once.)
    headers = {k: sent[k] for k in sent}
    if (names := "".join(headers)) == names.lower():
        return headers
    lowered: dict[str, str] = {}
    for name, value in headers.items():
        key = name.lower()
        if key in lowered:
            raise MalformedCheckRequest(f"header {key[:64]!r} sent more than once with different case")
        lowered[key] = value
    return lowered


def _workload(principal: str, labels: Mapping[str, str], proxy: ProxyIdentity, static: Workload) -> Workload:
    """The workload this Check is for: what the proxy itself sends wins over static settings.

    Namespace: the proxy's own SPIFFE id (``destination.principal``, mTLS only), else its
    ``x-authz-workload-namespace`` metadata, else ``--workload-namespace``. Labels: Envoy's
    ``destination.labels`` (node metadata ``LABELS``), else ``--workload-labels``. Kind: the
    metadata, else ``--workload-kind``. Whatever none of them gives stays ``None`` (unknown).
    """
    namespace = namespace_from_spiffe(principal) if principal else None
    if namespace is not None and proxy.namespace is not None and proxy.namespace != namespace:
        raise BadProxyMetadata(
            f"x-authz-workload-namespace {proxy.namespace!r} contradicts the proxy's certificate ({principal})")
    return Workload(
        namespace or proxy.namespace or static.namespace,
        dict(labels) if labels else static.labels,
        proxy.kind or static.kind,
    )
