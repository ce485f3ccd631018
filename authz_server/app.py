"""Assemble the server's parts from settings: JWKS cache, token verifier, policy store, authorizer.

``serve`` and ``explain`` build the same :class:`App`, so an explanation goes through exactly
the parts a live Check does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging

from authz_server.authorizer import Authorizer, VerdictSettings
from authz_server.engine.engine import MeshSettings
from authz_server.engine.request import Workload
from authz_server.grpc_api.check_request import RequestContextSettings
from authz_server.jwt.authenticator import JwtAuthenticator
from authz_server.jwt.jwks import JwksCache, JwksSettings
from authz_server.jwt.rules import JwtRule
from authz_server.jwt.verify import TokenVerifier, VerifySettings
from authz_server.policy_store import PolicyStore, ReloadResult

log = logging.getLogger(__name__)

#: start-up waits at most this long for the first JWKS fetches before serving
PREFETCH_BUDGET_SECONDS = 10.0


class App:
    def __init__(self, args: argparse.Namespace) -> None:
        self.jwks = JwksCache(
            JwksSettings(
                default_ttl=args.jwks_ttl,
                max_staleness=args.jwks_max_stale,
                min_refresh_interval=args.jwks_refresh_min_interval,
                ca_bundle=args.jwks_ca_bundle or None,
            )
        )
        self.verifier = TokenVerifier(VerifySettings(leeway=args.jwt_leeway, max_token_bytes=args.jwt_max_token_bytes))
        mesh = MeshSettings(args.root_namespace, args.trust_domain, tuple(args.trust_domain_aliases))
        self.store = PolicyStore(args.policies, mesh, self._authenticator)
        self.authorizer = Authorizer(
            self.store.engine,
            VerdictSettings(policy_header=args.policy_header, ok_headers=args.ok_headers, fail_open=args.fail_open),
        )
        workload = Workload(args.workload_namespace or None, args.workload_labels, args.workload_kind)
        self.context = RequestContextSettings(workload, args.num_trusted_proxies)
        self._refresher: asyncio.Task[None] | None = None

    def _authenticator(self, rules: tuple[JwtRule, ...]) -> JwtAuthenticator:
        return JwtAuthenticator(rules, self.jwks, self.verifier)

    def reload(self) -> ReloadResult:
        return self.store.reload()

    def jwt_rules(self) -> list[JwtRule]:
        policy_set = self.store.policy_set
        if policy_set is None:
            return []
        return [rule for ra in policy_set.request_authentications for rule in ra.jwt_rules]

    async def start(self) -> None:
        """Load policies (off the event loop), prefetch JWKS (bounded), start background refresh."""
        await asyncio.to_thread(self.reload)
        await self.prefetch()
        self._refresher = asyncio.create_task(self.jwks.run_refresher())

    async def prefetch(self) -> None:
        rules = self.jwt_rules()
        if not rules:
            return
        try:
            status = await asyncio.wait_for(self.jwks.prefetch(rules), PREFETCH_BUDGET_SECONDS)
        except asyncio.TimeoutError:
            log.warning("JWKS prefetch still running after %.0fs; serving anyway", PREFETCH_BUDGET_SECONDS)
            return
        for source in status.sources:
            if not source.usable:
                log.warning("JWKS for issuer %s (%s) not available yet: %s",
                            source.issuer, source.uri or "discovery", source.last_error)

    async def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
