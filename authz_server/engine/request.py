"""The attributes one request carries, as the matching engine sees them.

The gRPC adapter (from a CheckRequest) and ``explain`` (from a YAML/JSON description) both build
a :class:`RequestAttributes`; the engine never looks at protobufs. Values are normalised once
here (header names lower-cased, the query stripped from the path, addresses parsed) so matchers
do no per-rule parsing.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field
from typing import Any, Mapping

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class Workload:
    """The workload whose proxy asks: its namespace and labels decide which policies apply.

    ``kind`` is how Istio attaches policies to it (SPEC section 2): ``sidecar`` and ``gateway``
    (classic gateways) honour selectors; ``k8s-gateway`` (Gateway API, label
    ``gateway.networking.k8s.io/gateway-name``) honours targetRefs and selectors; ``waypoint``
    honours targetRefs only.

    ``None`` means unknown: the Check did not carry it and no static value is configured. A
    policy whose attachment depends on an unknown value cannot be scoped, and the request is
    denied for it (see :func:`authz_server.engine.scope.missing_identity`).
    """

    namespace: str | None
    labels: Mapping[str, str] | None = field(default_factory=dict)
    kind: str = "sidecar"


@dataclass(frozen=True, slots=True)
class RequestAuth:
    """A verified JWT: what ``requestPrincipals`` and ``request.auth.*`` match against."""

    issuer: str
    subject: str | None
    claims: Mapping[str, Any]


@dataclass(slots=True)
class RequestAttributes:
    """Everything a rule can ask about one HTTP request.

    ``None`` means the attribute is absent (no mTLS, no token, unknown SNI): positive matchers
    are false and ``not*`` matchers true, as in Envoy's RBAC.
    """

    method: str = ""
    host: str = ""
    #: ``:path`` as Envoy normalised it, with query and fragment removed (``url_path``).
    path: str = ""
    #: ``:path`` including the query, for JWT query-parameter extraction.
    raw_path: str = ""
    #: lower-case header names; repeated headers joined with ``,`` as in the CheckRequest.
    headers: Mapping[str, str] = field(default_factory=dict)
    #: lower-case header names to every value sent, when Envoy sent them one by one
    #: (``encode_raw_headers``); otherwise ``None`` and ``headers`` is all there is.
    header_values: Mapping[str, tuple[str, ...]] | None = None
    source_principal: str | None = None
    source_ip: IPAddress | None = None
    remote_ip: IPAddress | None = None
    destination_ip: IPAddress | None = None
    destination_port: int | None = None
    sni: str | None = None
    auth: RequestAuth | None = None
    workload: Workload = field(default_factory=lambda: Workload(None))

    @property
    def host_lower(self) -> str:
        return self.host.lower()


#: The longest text an IP address can be written in (IPv6 with an embedded IPv4 and a zone).
MAX_IP_TEXT = 64


def parse_ip(text: str | None) -> IPAddress | None:
    """An IP address or ``None`` when absent or unparsable (never raises).

    Anything longer than an address can be is refused unparsed, so the cache behind this only
    ever holds short strings: an X-Forwarded-For entry of 60 KB costs neither CPU nor memory.
    """
    if not text:
        return None
    text = text.strip()
    if len(text) > MAX_IP_TEXT:
        return None
    return _parse_short_ip(text)


@functools.lru_cache(maxsize=8192)
def _parse_short_ip(text: str) -> IPAddress | None:
    """Cached: peers and proxies repeat, and parsing is the costliest part of building a request."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def strip_query(path: str) -> str:
    """Envoy's ``url_path``: the path without ``?query`` and ``#fragment``."""
    for sep in ("?", "#"):
        cut = path.find(sep)
        if cut >= 0:
            path = path[:cut]
    return path
