"""Assemble the server's parts from settings: JWKS cache, token verifier, policy store, authorizer.

``serve`` and ``explain`` build the same :class:`App`, so an explanation goes through exactly
the parts a live Check does. Serving adds the background work: JWKS refresh, the policy
watcher, and a once-a-second sync of counters kept as plain attributes into Prometheus.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Coroutine

from authz_server.authorizer import Authorizer, Verdict, VerdictSettings
from authz_server.engine.engine import MeshSettings
from authz_server.engine.request import RequestAttributes, Workload
from authz_server.grpc_api.check_request import RequestContextSettings
from authz_server.jwt.authenticator import JwtAuthenticator
from authz_server.jwt.jwks import JwksCache, JwksSettings
from authz_server.jwt.rules import JwtRule
from authz_server.jwt.verify import TokenVerifier, VerifySettings
from authz_server.observability import metrics
from authz_server.observability.decision_log import DecisionLog
from authz_server.policy import handover
from authz_server.policy.watch import PolicyWatcher
from authz_server.policy_store import PolicyStore, ReloadResult

if TYPE_CHECKING:
    from authz_server.observability.tracing import CheckTracer

log = logging.getLogger(__name__)

#: start-up waits at most this long for the first JWKS fetches before serving
PREFETCH_BUDGET_SECONDS = 10.0
SYNC_SECONDS = 1.0


class App:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.jwks = JwksCache(
            JwksSettings(
                default_ttl=args.jwks_ttl,
                max_staleness=args.jwks_max_stale,
                min_refresh_interval=args.jwks_refresh_min_interval,
                ca_bundle=args.jwks_ca_bundle or None,
            )
        )
        self.jwks.on_fetch = lambda issuer, result: metrics.JWKS_FETCHES.labels(
            metrics.issuer_label(issuer), result).inc()
        self.verifier = TokenVerifier(VerifySettings(leeway=args.jwt_leeway, max_token_bytes=args.jwt_max_token_bytes))
        mesh = MeshSettings(args.root_namespace, args.trust_domain, tuple(args.trust_domain_aliases))
        self.store = PolicyStore(args.policies, mesh, self._authenticator, args.allow_empty_policies,
                                 fallback=handover.inherited())
        self.authorizer = Authorizer(
            self.store.engine,
            VerdictSettings(policy_header=args.policy_header, ok_headers=args.ok_headers, fail_open=args.fail_open,
                            dry_run_header=args.dry_run_header),
        )
        # Unset static values stay unknown (None): a Check that does not carry them is then
        # denied wherever a policy's scope depends on them (README "The workload identity").
        workload = Workload(args.workload_namespace or None, args.workload_labels or None, args.workload_kind)
        self.context = RequestContextSettings(workload, args.num_trusted_proxies)
        self.decision_log = self._decision_log(args)
        self.tracer = self._tracer(args)
        self._tasks: list[asyncio.Task[None]] = []
        self._synced_hits = self._synced_misses = 0

    @staticmethod
    def _decision_log(args: argparse.Namespace) -> DecisionLog | None:
        target = getattr(args, "decision_log", "off")
        if target == "off":
            return None
        worker = os.environ.get("AUTHZ_WORKER_ID")  # set by the supervisor for its workers
        return DecisionLog(sys.stdout if target == "stdout" else sys.stderr,
                           allow_sample_rate=args.decision_log_allow_sample, include_query=args.decision_log_query,
                           worker=int(worker) if worker and worker.isdigit() else None,
                           on_drop=metrics.DECISION_LOG_DROPPED.inc)

    @staticmethod
    def _tracer(args: argparse.Namespace) -> CheckTracer | None:
        endpoint = getattr(args, "otel_endpoint", "")
        if not endpoint:
            return None
        from authz_server.observability.tracing import build_tracer

        return build_tracer(endpoint, args.otel_sample_ratio)

    def _authenticator(self, rules: tuple[JwtRule, ...]) -> JwtAuthenticator:
        return JwtAuthenticator(rules, self.jwks, self.verifier)

    def observe(self, verdict: Verdict, attrs: RequestAttributes | None, latency: float) -> None:
        """Per answered Check: metrics, the decision log line, the trace span."""
        metrics.record_check(verdict, latency)
        if self.decision_log is not None:
            self.decision_log.record(verdict, attrs, latency)
        if self.tracer is not None:
            self.tracer.record(verdict, attrs, latency)

    def reload(self) -> ReloadResult:
        result = self.store.reload()
        metrics.RELOADS.labels("success" if result.ok else "failure").inc()
        metrics.LAST_RELOAD_OK.set(1 if result.ok else 0)
        policy_set = self.store.policy_set
        if policy_set is not None:  # also the supervisor's last good set, served while the path's is invalid
            metrics.LAST_GOOD_LOAD.set(policy_set.loaded_at)
            metrics.POLICIES.labels("AuthorizationPolicy").set(len(policy_set.authorization_policies))
            metrics.POLICIES.labels("RequestAuthentication").set(len(policy_set.request_authentications))
            metrics.issuer_label.update(rule.issuer for rule in self.jwt_rules())
            if self.decision_log is not None:
                self.decision_log.redact_params(name for rule in self.jwt_rules() for name in rule.from_params)
        return result

    def jwt_rules(self) -> list[JwtRule]:
        policy_set = self.store.policy_set
        if policy_set is None:
            return []
        return [rule for ra in policy_set.request_authentications for rule in ra.jwt_rules]

    def readiness(self) -> tuple[bool, str]:
        """Ready = a policy set is loaded and every jwksUri issuer has usable keys."""
        if not self.store.loaded:
            return False, f"no valid policy set loaded from {self.store.path}"
        missing = [s.issuer for s in self.jwks.status().sources if not s.usable]
        if missing:
            return False, "no usable JWKS for issuer(s) " + ", ".join(sorted(set(missing)))
        return True, f"policy generation {self.store.generation}"

    async def start(self, on_change: Callable[[], Awaitable[object]] | None = None) -> None:
        """Load policies (off the event loop), prefetch JWKS (bounded), start background work.

        ``on_change`` is what the policy watcher runs when the path changes (default: reload).
        """
        await asyncio.to_thread(self.reload)
        await self.prefetch()
        self._spawn(self.jwks.run_refresher())
        self._spawn(self._sync_forever())
        interval = getattr(self.args, "reload_interval", 0.0)
        if interval > 0:
            self._spawn(PolicyWatcher(self.store.path, interval, on_change or self.reload_async).run())

    async def reload_async(self) -> ReloadResult:
        result = await asyncio.to_thread(self.reload)
        if result.ok:
            await self.prefetch()
        return result

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

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        self._tasks.append(asyncio.create_task(coroutine))

    async def _sync_forever(self) -> None:
        while True:
            self.sync_metrics()
            if self.decision_log is not None:
                self.decision_log.flush()
            await asyncio.sleep(SYNC_SECONDS)

    def sync_metrics(self) -> None:
        """Copy plain counters (token cache, JWKS key ages, readiness) into Prometheus."""
        hits, misses = self.verifier.hits, self.verifier.misses
        metrics.TOKEN_CACHE_HITS.inc(hits - self._synced_hits)
        metrics.TOKEN_CACHE_MISSES.inc(misses - self._synced_misses)
        self._synced_hits, self._synced_misses = hits, misses
        metrics.TOKEN_CACHE_SIZE.set(self.verifier.cache_size)
        for source in self.jwks.status().sources:
            if source.age_seconds is not None:
                metrics.JWKS_KEY_AGE.labels(metrics.issuer_label(source.issuer)).set(source.age_seconds)
        metrics.WORKER_READY.set(1 if self.readiness()[0] else 0)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        metrics.flush()
        if self.decision_log is not None:
            await asyncio.to_thread(self.decision_log.close)
        if self.tracer is not None:
            await asyncio.to_thread(self.tracer.shutdown)
