"""The benchmark's variants, each an Envoy front proxy (``--concurrency 1``) built with the kit.

* ``envoy`` — no auth filter: the proxy's own cost, the baseline every "added latency" is over;
* ``native`` — Envoy's ``jwt_authn`` + ``rbac`` with the policy of :mod:`loadtests.tokens`
  (same issuer, audience, inline JWKS, principal and ``group`` claim): the in-proxy limit;
* ``noop`` — ext_authz to :mod:`loadtests.noop_server` (answers OK): the Python gRPC floor;
* ``server-grpcio-w1`` — this server on the grpcio serving layer (what the fast layer replaces);
* ``server-wN`` — ext_authz to this server (fast serving layer) with N worker processes.

The ext_authz variants use the kit's :class:`~authz_server.demo.envoy_config.AuthzSettings` pool
caps (:data:`STREAMS_PER_CONNECTION` streams, 1,000 requests per connection) so Envoy opens several
HTTP/2 connections and the kernel's SO_REUSEPORT spreads them over
the server's workers. Without an upstream the route answers itself (``direct_response``): a Python
echo app would cap every variant at its own speed and hide the differences being measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from authz_server.demo import envoy_config as ec

from . import tokens

_TYPE = "type.googleapis.com/envoy.extensions.filters.http."
_JWT_FILTER = "envoy.filters.http.jwt_authn"
_PROVIDER = "bench"
STREAMS_PER_CONNECTION = 8
"""Envoy's cap on concurrent Checks per HTTP/2 connection to the backend: at wrk -c64 the pool
opens about eight connections, enough for SO_REUSEPORT to give every worker a share."""


@dataclass(frozen=True)
class Variant:
    """One measured configuration: its name, what backs the ext_authz filter, and workers."""

    name: str
    backend: str  # "none" | "native" | "noop" | "server"
    workers: int = 1
    label: str = ""
    serving: str = "fast"  # the server's serving layer (--serving)
    #: run the server from this source tree instead (PYTHONPATH): a baseline checkout to compare
    source: str = ""

    @property
    def checks_externally(self) -> bool:
        return self.backend in ("noop", "server")


def standard_variants(workers: int) -> list[Variant]:
    """The issue's list: Envoy alone, native, Python floor, this server with 1 and *workers*."""
    variants = [
        Variant("envoy", "none", label="Envoy, no auth filter"),
        Variant("native", "native", label="Envoy jwt_authn + RBAC"),
        Variant("noop", "noop", label="Envoy + do-nothing grpc.aio Check"),
        Variant("server-grpcio-w1", "server", 1, label="Envoy + authz-server on grpcio, 1 worker", serving="grpcio"),
        Variant("server-w1", "server", 1, label="Envoy + authz-server, 1 worker"),
    ]
    if workers > 1:
        variants.append(
            Variant(f"server-w{workers}", "server", workers, label=f"Envoy + authz-server, {workers} workers")
        )
    return variants


def envoy_config(
    variant: Variant,
    *,
    listen_port: int,
    admin_port: int,
    authz_port: int | None = None,
    jwks: str = "",
    upstream: ec.Upstream | None = None,
    authz: ec.AuthzSettings | None = None,
) -> ec.Config:
    """The front proxy for *variant*; *authz* overrides the pool settings for ext_authz variants."""
    settings = None
    if variant.checks_externally:
        if authz_port is None:
            raise ValueError(f"variant {variant.name} needs authz_port")
        settings = authz or ec.AuthzSettings(port=authz_port, max_concurrent_streams=STREAMS_PER_CONNECTION)
    workload = ec.Workload("bench", tokens.NAMESPACE, tokens.WORKLOAD_LABELS)
    # As the Helm chart configures a sidecar: the EnvoyFilter merge sends the workload's labels.
    proxy = ec.Proxy(admin_port, workload, settings, access_log=False,
                     merge=ec.IdentityMerge(tokens.NAMESPACE, "sidecar"))
    config = ec.front_proxy(proxy, listen_port=listen_port, upstream=upstream or ec.Upstream(port=1))
    if upstream is None:
        _answer_directly(config)
    if variant.backend == "native":
        _hcm(config)["http_filters"][:0] = [_jwt_authn(jwks), _rbac()]
    return config


def _hcm(config: ec.Config) -> dict[str, Any]:
    listener = config["static_resources"]["listeners"][0]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def _answer_directly(config: ec.Config) -> None:
    """Replace the route to the upstream by a 200 from Envoy itself, and drop the unused cluster."""
    for host in _hcm(config)["route_config"]["virtual_hosts"]:
        for route in host["routes"]:
            cluster = route.pop("route")["cluster"]
            route["direct_response"] = {"status": 200, "body": {"inline_string": "ok\n"}}
    resources = config["static_resources"]
    resources["clusters"] = [c for c in resources["clusters"] if c["name"] != cluster]


def _jwt_authn(jwks: str) -> dict[str, Any]:
    """Istio's translation of the RequestAuthentication: a bad token is 401, none passes on."""
    return {
        "name": _JWT_FILTER,
        "typed_config": {
            "@type": _TYPE + "jwt_authn.v3.JwtAuthentication",
            "providers": {
                _PROVIDER: {
                    "issuer": tokens.ISSUER,
                    "audiences": [tokens.AUDIENCE],
                    "local_jwks": {"inline_string": jwks},
                    "payload_in_metadata": "payload",
                    "forward": True,
                }
            },
            "rules": [
                {
                    "match": {"prefix": "/"},
                    "requires": {
                        "requires_any": {
                            "requirements": [{"provider_name": _PROVIDER}, {"allow_missing": {}}]
                        }
                    },
                }
            ],
        },
    }


def _rbac() -> dict[str, Any]:
    """The AuthorizationPolicy as RBAC: principal of the issuer (iss, sub present) and the claim."""

    def claim(name: str, value: dict[str, Any]) -> dict[str, Any]:
        path = [{"key": "payload"}, {"key": name}]
        return {"metadata": {"filter": _JWT_FILTER, "path": path, "value": value}}

    principal = {
        "and_ids": {
            "ids": [
                claim("iss", {"string_match": {"exact": tokens.ISSUER}}),
                claim("sub", {"present_match": True}),
                claim("group", {"string_match": {"exact": tokens.ALLOWED_GROUP}}),
            ]
        }
    }
    return {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": _TYPE + "rbac.v3.RBAC",
            "rules": {
                "action": "ALLOW",
                "policies": {"bench-allow-group": {"permissions": [{"any": True}], "principals": [principal]}},
            },
        },
    }
