"""Prometheus metrics: what an operator needs to trust the server, correct with several workers.

With ``--workers N`` each worker writes its samples to ``PROMETHEUS_MULTIPROC_DIR`` (set by the
supervisor before the workers start) and the supervisor's HTTP endpoint aggregates them;
gauges declare how to combine workers (``multiprocess_mode``). Label values are bounded: policy
labels come from the loaded policy set (capped), issuer labels from configured issuers.
"""

from __future__ import annotations

from typing import Iterable

from prometheus_client import Counter, Gauge, Histogram

from authz_server.authorizer import Verdict

#: more distinct policy names than this share the label value "other"
MAX_POLICY_LABELS = 200
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

CHECKS = Counter("authz_checks_total", "Checks answered, by decision and reason", ["decision", "reason"])
CHECK_POLICY = Counter("authz_check_policy_total", "Checks decided by a named policy", ["policy", "decision"])
CHECK_LATENCY = Histogram("authz_check_duration_seconds", "Time to decide one Check (server side)",
                          buckets=LATENCY_BUCKETS)
JWT_RESULTS = Counter("authz_jwt_total", "JWT outcomes by issuer and result", ["issuer", "result"])
JWKS_FETCHES = Counter("authz_jwks_fetches_total", "JWKS fetches by issuer and result", ["issuer", "result"])
JWKS_KEY_AGE = Gauge("authz_jwks_key_age_seconds", "Age of the JWKS keys in use, by issuer", ["issuer"],
                     multiprocess_mode="max")
TOKEN_CACHE_HITS = Counter("authz_token_cache_hits_total", "Verified-token cache hits")
TOKEN_CACHE_MISSES = Counter("authz_token_cache_misses_total", "Verified-token cache misses (signature checked)")
TOKEN_CACHE_SIZE = Gauge("authz_token_cache_entries", "Tokens in the verified-token cache", multiprocess_mode="livesum")
RELOADS = Counter("authz_policy_reloads_total", "Policy set loads by result", ["result"])
LAST_GOOD_LOAD = Gauge("authz_policy_last_success_timestamp_seconds", "Unix time of the last good policy load",
                       multiprocess_mode="max")
LAST_RELOAD_OK = Gauge("authz_policy_last_reload_success",
                       "1 when the latest policy load succeeded, 0 while a rejected set waits to be fixed",
                       multiprocess_mode="livemin")
POLICIES = Gauge("authz_policies_loaded", "Policies in the serving set, by kind", ["kind"],
                 multiprocess_mode="max")
DRY_RUN = Counter("authz_dry_run_total", "Dry-run engine results", ["action", "result", "policy"])
HTTP2_LIMITS = Counter("authz_http2_limit_exceeded_total",
                       "HTTP/2 connections closed or refused by a serving limit (fast layer), by limit", ["limit"])
WORKER_READY = Gauge("authz_worker_ready", "1 when every live worker has policies (and JWKS) loaded",
                     multiprocess_mode="livemin")


class PolicyLabels:
    """Bounded label values for policy names: the first MAX_POLICY_LABELS seen, then 'other'."""

    def __init__(self, limit: int = MAX_POLICY_LABELS) -> None:
        self.limit = limit
        self._known: set[str] = set()

    def __call__(self, policy: str) -> str:
        if policy in self._known:
            return policy
        if len(self._known) < self.limit:
            self._known.add(policy)
            return policy
        return "other"


class IssuerLabels:
    """Issuer label values restricted to configured issuers (a token's ``iss`` is attacker input)."""

    def __init__(self) -> None:
        self.configured: frozenset[str] = frozenset()

    def update(self, issuers: Iterable[str]) -> None:
        self.configured = frozenset(issuers)

    def __call__(self, issuer: str) -> str:
        return issuer if issuer in self.configured else "unconfigured"


_policy_label = PolicyLabels()
issuer_label = IssuerLabels()


def record_check(verdict: Verdict, latency: float) -> None:
    """Count one answered Check (called once per Check, after the answer is built)."""
    decision = "allow" if verdict.allowed else "deny"
    CHECKS.labels(decision, verdict.reason).inc()
    CHECK_LATENCY.observe(latency)
    if verdict.policy:
        CHECK_POLICY.labels(_policy_label(verdict.policy), decision).inc()
    if verdict.jwt_result:
        JWT_RESULTS.labels(issuer_label(verdict.jwt_issuer), verdict.jwt_result).inc()
    for result in verdict.dry_run:
        DRY_RUN.labels(result.action.value, result.engine_result, _policy_label(result.policy or "none")).inc()
