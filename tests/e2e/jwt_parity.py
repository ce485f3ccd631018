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

from authz_server.demo import envoy_config as ec

_TYPE = "type.googleapis.com/envoy.extensions.filters.http."


def native_jwt_filter(jwt_rules: Sequence[dict[str, Any]], jwks: dict[str, Any]) -> ec.Config:
    """istiod's jwt_authn filter for these ``jwtRules`` (every rule verified with *jwks*)."""
    rules = sorted(jwt_rules, key=lambda r: r.get("issuer", ""))
    providers: dict[str, Any] = {}
    for index, rule in enumerate(rules):
        provider: dict[str, Any] = {
            "issuer": rule.get("issuer", ""),
            "audiences": list(rule.get("audiences", [])),
            "local_jwks": {"inline_string": json.dumps(jwks)},
            "forward": bool(rule.get("forwardOriginalToken", False)),
            "payload_in_metadata": rule.get("issuer", ""),
            "from_headers": [
                {"name": h["name"], "value_prefix": h.get("prefix", "")} for h in rule.get("fromHeaders", [])
            ],
            "from_params": list(rule.get("fromParams", [])),
            "from_cookies": list(rule.get("fromCookies", [])),
            "claim_to_headers": [
                {"header_name": c["header"], "claim_name": c["claim"]} for c in rule.get("outputClaimToHeaders", [])
            ],
        }
        if rule.get("outputPayloadToHeader"):
            provider["forward_payload_header"] = rule["outputPayloadToHeader"]
        providers[f"origins-{index}"] = provider
    names = list(providers)
    if len(names) == 1:
        requires: dict[str, Any] = {
            "requires_any": {"requirements": [{"provider_name": names[0]}, {"allow_missing": {}}]}
        }
    else:
        optional = [
            {"requires_any": {"requirements": [{"provider_name": n}, {"allow_missing": {}}]}} for n in names
        ]
        requires = {
            "requires_any": {
                "requirements": [*({"provider_name": n} for n in names), {"requires_all": {"requirements": optional}}]
            }
        }
    return {
        "name": "envoy.filters.http.jwt_authn",
        "typed_config": {
            "@type": _TYPE + "jwt_authn.v3.JwtAuthentication",
            "providers": providers,
            "rules": [{"match": {"prefix": "/"}, "requires": requires}],
            "bypass_cors_preflight": True,
        },
    }


def native_proxy(admin_port: int, listen_port: int, upstream_port: int, jwt_filter: ec.Config) -> ec.Config:
    """A front proxy with Envoy's jwt_authn in front of the upstream and no ext_authz."""
    proxy = ec.Proxy(admin_port, ec.Workload("front", "default", {"app": "front"}), None)
    config = ec.front_proxy(proxy, listen_port=listen_port, upstream=ec.Upstream(upstream_port))
    listener = config["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"].insert(0, jwt_filter)
    return config


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
