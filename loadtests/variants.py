"""The benchmark's variants, each an Envoy front proxy (``--concurrency 1``) built with the kit.

* ``envoy`` — no auth filter: the proxy's own cost, the baseline every "added latency" is over;
* ``native`` — Envoy's ``jwt_authn`` + ``rbac`` with the policy of :mod:`loadtests.tokens`
  (same issuer, audience, inline JWKS, principal and ``group`` claim): the in-proxy limit;
* ``noop`` — ext_authz to :mod:`loadtests.noop_server` (answers OK): the Python gRPC floor;
* ``server-grpcio-w1`` — this server on the grpcio serving layer (what the fast layer replaces);
* ``server-wN`` — ext_authz to this server (fast serving layer) with N worker processes and
  ``--decision-log off``;
* ``server-w1-default`` — the same with the server's default observability (decision log on
  stdout, every allow logged, metrics): the configuration most deployments run;
* ``server-w2-chart`` / ``server-w2-demo`` — 2 workers, default settings, Envoy's pool capped as the
  Helm chart's DestinationRule (``values.yaml``) or the demo's ``AuthzSettings`` cap it: how Checks
  split over the workers with what ships;
* ``scale-<N>[-distinct]`` — ``server-w1`` with N AuthorizationPolicies in scope
  (:mod:`loadtests.policy_mix`), for the policy-count scale.

The other ext_authz variants use the kit's :class:`~authz_server.demo.envoy_config.AuthzSettings`
with :data:`STREAMS_PER_CONNECTION` streams and 1,000 requests per connection, so Envoy opens
several HTTP/2 connections and the kernel's SO_REUSEPORT spreads them over the server's workers.
Without an upstream the route answers itself (``direct_response``): a Python echo app would cap
every variant at its own speed and hide the differences being measured.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap
from envoy_data_plane.envoy.config.core.v3 import DataSource
from envoy_data_plane.envoy.config.rbac.v3 import Permission, Policy, Principal, PrincipalSet, Rbac as RbacRules, RbacAction
from envoy_data_plane.envoy.config.route.v3 import RouteMatch
from envoy_data_plane.envoy.extensions.filters.http.jwt_authn.v3 import (
    JwtAuthentication,
    JwtProvider,
    JwtRequirement,
    JwtRequirementOrList,
    RequirementRule,
)
from envoy_data_plane.envoy.extensions.filters.http.rbac.v3 import Rbac
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import HttpFilter
from envoy_data_plane.envoy.type.matcher.v3 import MetadataMatcher, MetadataMatcherPathSegment, StringMatcher, ValueMatcher
from envoy_data_plane.google.protobuf import Empty

from authz_server.demo import envoy_config as ec

from . import tokens

_JWT_FILTER = "envoy.filters.http.jwt_authn"
_PROVIDER = "bench"
STREAMS_PER_CONNECTION = 8
"""Envoy's cap on concurrent Checks per HTTP/2 connection to the backend: at wrk -c64 the pool
opens about eight connections, enough for SO_REUSEPORT to give every worker a share."""
CHART_VALUES = Path(__file__).resolve().parents[1] / "deploy" / "helm" / "istio-ext-authz" / "values.yaml"
POOLS = ("bench", "chart", "demo")


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
    #: the server's default decision log (stdout) instead of ``--decision-log off``
    decision_log: bool = False
    #: AuthorizationPolicies in the workload's scope (1: the benchmark's own only)
    policies: int = 1
    mix: str = "realistic"
    #: how Envoy's pool to the server is capped: the benchmark's, the chart's or the demo's
    pool: str = "bench"
    #: the scenarios it runs (empty: all)
    scenarios: tuple[str, ...] = ()

    @property
    def checks_externally(self) -> bool:
        return self.backend in ("noop", "server")

    def runs(self, scenario: str) -> bool:
        return not self.scenarios or scenario in self.scenarios


def standard_variants(workers: int) -> list[Variant]:
    """The reference points, this server with 1 and *workers* workers, defaults, shipped pools."""
    variants = [
        Variant("envoy", "none", label="Envoy, no auth filter"),
        Variant("native", "native", label="Envoy jwt_authn + RBAC"),
        Variant("noop", "noop", label="Envoy + do-nothing grpc.aio Check"),
        Variant("server-grpcio-w1", "server", 1, label="Envoy + authz-server on grpcio, 1 worker", serving="grpcio"),
        Variant("server-w1", "server", 1, label="Envoy + authz-server, 1 worker, --decision-log off"),
        Variant("server-w1-default", "server", 1, decision_log=True,
                label="Envoy + authz-server, 1 worker, default settings (decision log on)"),
    ]
    if workers > 1:
        variants.append(Variant(f"server-w{workers}", "server", workers,
                                label=f"Envoy + authz-server, {workers} workers, --decision-log off"))
    for pool in ("chart", "demo"):
        variants.append(Variant(f"server-w2-{pool}", "server", 2, decision_log=True, pool=pool,
                                label=f"Envoy + authz-server, 2 workers, default settings, {pool}'s connection pool"))
    return variants


def scale_variants(counts: tuple[int, ...], scenario: str) -> list[Variant]:
    """``server-w1`` with each count of policies in scope (realistic mix), the largest also distinct."""
    variants = [Variant(f"scale-{n}", "server", 1, policies=n, scenarios=(scenario,),
                        label=f"Envoy + authz-server, 1 worker, {n:,} policies in scope (realistic mix)")
                for n in counts]
    if counts:
        n = max(counts)
        variants.append(Variant(f"scale-{n}-distinct", "server", 1, policies=n, mix="distinct", scenarios=(scenario,),
                                label=f"Envoy + authz-server, 1 worker, {n:,} policies, each its own host or path"))
    return variants


def pool_settings(variant: Variant, authz_port: int) -> ec.AuthzSettings:
    """Envoy's connection pool to the server for *variant*."""
    if variant.pool == "demo":
        return ec.AuthzSettings(port=authz_port)  # the demo's defaults
    if variant.pool == "chart":
        streams, requests = chart_pool_caps()
        return ec.AuthzSettings(port=authz_port, max_concurrent_streams=streams, max_requests_per_connection=requests)
    return ec.AuthzSettings(port=authz_port, max_concurrent_streams=STREAMS_PER_CONNECTION)


def chart_pool_caps(values: Path = CHART_VALUES) -> tuple[int | None, int | None]:
    """The chart's DestinationRule ``connectionPool.http`` caps, as Istio renders them for Envoy."""
    chart = yaml.safe_load(values.read_text())
    http = chart["istio"]["destinationRule"]["trafficPolicy"].get("connectionPool", {}).get("http", {})
    return http.get("maxConcurrentStreams"), http.get("maxRequestsPerConnection")


def envoy_config(
    variant: Variant,
    *,
    listen_port: int,
    admin_port: int,
    authz_port: int | None = None,
    jwks: str = "",
    upstream: ec.Upstream | None = None,
    authz: ec.AuthzSettings | None = None,
) -> Bootstrap:
    """The front proxy for *variant*; *authz* overrides the pool settings for ext_authz variants.
    Without *upstream* the route answers 200 itself."""
    settings = None
    if variant.checks_externally:
        if authz_port is None:
            raise ValueError(f"variant {variant.name} needs authz_port")
        settings = authz or pool_settings(variant, authz_port)
    workload = ec.Workload("bench", tokens.NAMESPACE, tokens.WORKLOAD_LABELS)
    native = [_jwt_authn(jwks), _rbac()] if variant.backend == "native" else []
    # As the Helm chart configures a sidecar: the EnvoyFilter merge sends the workload's labels.
    proxy = ec.Proxy(admin_port, workload, settings, access_log=False,
                     merge=ec.IdentityMerge(tokens.NAMESPACE, "sidecar"), native_filters=native)
    return ec.front_proxy(proxy, listen_port=listen_port, upstream=upstream or ec.DirectResponse())


def _jwt_authn(jwks: str) -> HttpFilter:
    """Istio's translation of the RequestAuthentication: a bad token is 401, none passes on."""
    provider = JwtProvider(
        issuer=tokens.ISSUER,
        audiences=[tokens.AUDIENCE],
        local_jwks=DataSource(inline_string=jwks),
        payload_in_metadata="payload",
        forward=True,
    )
    requires = JwtRequirement(requires_any=JwtRequirementOrList(
        requirements=[JwtRequirement(provider_name=_PROVIDER), JwtRequirement(allow_missing=Empty())]
    ))
    return ec.http_filter(_JWT_FILTER, JwtAuthentication(
        providers={_PROVIDER: provider},
        rules=[RequirementRule(match=RouteMatch(prefix="/"), requires=requires)],
    ))


def _rbac() -> HttpFilter:
    """The AuthorizationPolicy as RBAC: principal of the issuer (iss, sub present) and the claim."""

    def claim(name: str, value: ValueMatcher) -> Principal:
        path = [MetadataMatcherPathSegment(key="payload"), MetadataMatcherPathSegment(key=name)]
        return Principal(metadata=MetadataMatcher(filter=_JWT_FILTER, path=path, value=value))

    principal = Principal(and_ids=PrincipalSet(ids=[
        claim("iss", ValueMatcher(string_match=StringMatcher(exact=tokens.ISSUER))),
        claim("sub", ValueMatcher(present_match=True)),
        claim("group", ValueMatcher(string_match=StringMatcher(exact=tokens.ALLOWED_GROUP))),
    ]))
    allow = Policy(permissions=[Permission(any=True)], principals=[principal])
    return ec.http_filter("envoy.filters.http.rbac", Rbac(
        rules=RbacRules(action=RbacAction.ALLOW, policies={"bench-allow-group": allow}),
    ))
