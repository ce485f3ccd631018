"""What the calling proxy says about itself on the Check call: its namespace, kind, trusted hops.

One central server answers Checks from gateways and from the sidecars of many workloads, so each
Check must say which workload it is for. Envoy's CheckRequest carries the proxy's labels (with
``bootstrap_metadata_labels_key``) and, over mTLS only, its SPIFFE id; everything else comes from
the **gRPC metadata of the Check call** — ``grpc_service.initial_metadata`` of the proxy's
ext_authz filter, which the Helm chart's EnvoyFilter sets per namespace and per gateway:

=============================== =============================================================
``x-authz-workload-namespace``  the proxy's namespace (plaintext callers, DNS-certificate gateways)
``x-authz-workload-kind``       ``sidecar``, ``gateway``, ``k8s-gateway`` or ``waypoint``
``x-authz-num-trusted-proxies`` the gateway's ``gatewayTopology.numTrustedProxies``
=============================== =============================================================

Trust: these are HTTP/2 headers of the proxy → server call, written by Envoy from its own
configuration. A client's request headers travel *inside* the CheckRequest, never as metadata of
the Check call, so no client behind a proxy can set them. Whoever calls the server directly can
claim any identity — as they can forge any CheckRequest — but only learns a decision for itself;
it cannot change what any proxy enforces. Restrict the server's callers (NetworkPolicy, an
AuthorizationPolicy on the server) all the same.

Malformed or contradictory metadata is a misconfigured proxy: the Check is denied
(``bad_proxy_metadata``), never decided for a guessed identity.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Iterable

from authz_server.engine.scope import WORKLOAD_KINDS

PREFIX = "x-authz-"
NAMESPACE_KEY = "x-authz-workload-namespace"
KIND_KEY = "x-authz-workload-kind"
TRUSTED_PROXIES_KEY = "x-authz-num-trusted-proxies"
KEYS = (NAMESPACE_KEY, KIND_KEY, TRUSTED_PROXIES_KEY)
#: more ``x-authz-*`` entries than this on one call is not a proxy's configuration
MAX_ENTRIES = 16
MAX_TRUSTED_PROXIES = 255
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")

#: the ``x-authz-*`` entries of a call's metadata, in the order received
Metadata = tuple[tuple[str, str], ...]


class BadProxyMetadata(ValueError):
    """The proxy's ``x-authz-*`` metadata is unusable; the Check is denied with this reason."""

    reason = "bad_proxy_metadata"


@dataclass(frozen=True, slots=True)
class ProxyIdentity:
    """What the metadata says; ``None`` where it says nothing (static settings then apply)."""

    namespace: str | None = None
    kind: str | None = None
    num_trusted_proxies: int | None = None


NO_PROXY_IDENTITY = ProxyIdentity()


def select_metadata(pairs: Iterable[tuple[str, str]]) -> Metadata:
    """The ``x-authz-*`` entries of a call's headers (names lower-case, as HTTP/2 sends them)."""
    return tuple((k, v) for k, v in pairs if k.startswith(PREFIX))


def proxy_identity(pairs: Iterable[tuple[str, str]]) -> ProxyIdentity:
    """Parse the identity out of a call's headers or invocation metadata."""
    metadata = select_metadata(pairs)
    return parse_proxy_metadata(metadata) if metadata else NO_PROXY_IDENTITY


@functools.lru_cache(maxsize=1024)
def parse_proxy_metadata(metadata: Metadata) -> ProxyIdentity:
    """Validate and parse; cached, as each proxy sends the same few entries on every Check.

    A key may repeat (two EnvoyFilters merged into one filter append their entries) only with
    the same value; a conflict means two configurations disagree about this proxy.
    """
    if len(metadata) > MAX_ENTRIES:
        raise BadProxyMetadata(f"{len(metadata)} x-authz-* metadata entries (at most {MAX_ENTRIES})")
    values: dict[str, str] = {}
    for key, value in metadata:
        if key not in KEYS:
            raise BadProxyMetadata(f"unknown metadata {key!r} (known: {', '.join(KEYS)})")
        if values.setdefault(key, value) != value:
            raise BadProxyMetadata(f"conflicting {key} values {values[key]!r} and {value!r}")
    namespace = values.get(NAMESPACE_KEY)
    if namespace is not None and not _NAMESPACE.fullmatch(namespace):
        raise BadProxyMetadata(f"{NAMESPACE_KEY} {namespace[:80]!r} is not a namespace name")
    kind = values.get(KIND_KEY)
    if kind is not None and kind not in WORKLOAD_KINDS:
        raise BadProxyMetadata(f"{KIND_KEY} {kind[:80]!r}: one of {', '.join(WORKLOAD_KINDS)}")
    hops = values.get(TRUSTED_PROXIES_KEY)
    trusted: int | None = None
    if hops is not None:
        if not (hops.isascii() and hops.isdigit() and int(hops) <= MAX_TRUSTED_PROXIES):
            raise BadProxyMetadata(f"{TRUSTED_PROXIES_KEY} {hops[:80]!r}: a number from 0 to {MAX_TRUSTED_PROXIES}")
        trusted = int(hops)
    return ProxyIdentity(namespace, kind, trusted)
