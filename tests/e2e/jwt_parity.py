"""Two front proxies on one policy: Envoy's own jwt_authn as istiod configures it, and ext_authz
to this server; the same raw HTTP request goes to both, and what each answered and what reached
the upstream are compared.

:func:`native_jwt_filter` renders ``spec.jwtRules`` the way istiod's ``policy_applier`` does
(one ``JwtProvider`` per rule sorted by issuer, ``requires_any{p1..pn,
requires_all{any{pi, allow_missing}...}}``, CORS preflight bypassed, payload in metadata keyed
by issuer), with the JWKS inline as istiod pushes it.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Any, Sequence

from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap
from envoy_data_plane.envoy.config.core.v3 import DataSource
from envoy_data_plane.envoy.config.route.v3 import RouteMatch
from envoy_data_plane.envoy.extensions.filters.http.jwt_authn.v3 import (
    JwtAuthentication,
    JwtClaimToHeader,
    JwtHeader,
    JwtProvider,
    JwtRequirement,
    JwtRequirementAndList,
    JwtRequirementOrList,
    RequirementRule,
)
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import HttpFilter
from envoy_data_plane.google.protobuf import Empty

from authz_server.demo import envoy_config as ec


def native_jwt_filter(jwt_rules: Sequence[dict[str, Any]], jwks: dict[str, Any]) -> HttpFilter:
    """istiod's jwt_authn filter for these ``jwtRules`` (every rule verified with *jwks*)."""
    rules = sorted(jwt_rules, key=lambda r: r.get("issuer", ""))
    providers = {
        f"origins-{index}": JwtProvider(
            issuer=rule.get("issuer", ""),
            audiences=list(rule.get("audiences", [])),
            local_jwks=DataSource(inline_string=json.dumps(jwks)),
            forward=bool(rule.get("forwardOriginalToken", False)),
            payload_in_metadata=rule.get("issuer", ""),
            from_headers=[JwtHeader(name=h["name"], value_prefix=h.get("prefix", "")) for h in rule.get("fromHeaders", [])],
            from_params=list(rule.get("fromParams", [])),
            from_cookies=list(rule.get("fromCookies", [])),
            claim_to_headers=[
                JwtClaimToHeader(header_name=c["header"], claim_name=c["claim"]) for c in rule.get("outputClaimToHeaders", [])
            ],
            forward_payload_header=rule.get("outputPayloadToHeader", ""),
        )
        for index, rule in enumerate(rules)
    }

    def optional(name: str) -> JwtRequirement:
        return JwtRequirement(requires_any=JwtRequirementOrList(
            requirements=[JwtRequirement(provider_name=name), JwtRequirement(allow_missing=Empty())]
        ))

    names = list(providers)
    if len(names) == 1:
        requires = optional(names[0])
    else:
        all_optional = JwtRequirement(requires_all=JwtRequirementAndList(requirements=[optional(n) for n in names]))
        requires = JwtRequirement(requires_any=JwtRequirementOrList(
            requirements=[*(JwtRequirement(provider_name=n) for n in names), all_optional]
        ))
    return ec.http_filter("envoy.filters.http.jwt_authn", JwtAuthentication(
        providers=providers,
        rules=[RequirementRule(match=RouteMatch(prefix="/"), requires=requires)],
        bypass_cors_preflight=True,
    ))


def native_proxy(admin_port: int, listen_port: int, upstream_port: int, jwt_filter: HttpFilter) -> Bootstrap:
    """A front proxy with Envoy's jwt_authn in front of the upstream and no ext_authz."""
    proxy = ec.Proxy(admin_port, ec.Workload("front", "default", {"app": "front"}), None, native_filters=[jwt_filter])
    return ec.front_proxy(proxy, listen_port=listen_port, upstream=ec.Upstream(upstream_port))


@dataclass(frozen=True)
class RawReply:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)

    def upstream(self) -> dict[str, Any]:
        """What the echo upstream saw (only for a 200 that reached it)."""
        return json.loads(self.body)


def raw_request(port: int, target: str, headers: Sequence[tuple[str, str]], host: str = "front.example") -> RawReply:
    """One HTTP/1.1 request written byte for byte: repeated header lines and any target as given."""
    lines = [f"GET {target} HTTP/1.1", f"host: {host}", *(f"{k}: {v}" for k, v in headers), "connection: close"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = tuple((k.strip().lower(), v.strip()) for k, _, v in (h.partition(":") for h in header_lines))
    length = next((int(v) for k, v in parsed if k == "content-length"), None)
    return RawReply(int(status_line.split()[1]), parsed, body if length is None else body[:length])
