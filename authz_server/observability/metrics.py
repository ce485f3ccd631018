"""Prometheus metrics: what an operator needs to trust the server, correct with several workers.

With ``--workers N`` each worker writes its samples to ``PROMETHEUS_MULTIPROC_DIR`` (set by the
supervisor before the workers start) and the supervisor's HTTP endpoint aggregates them;
gauges declare how to combine workers (``multiprocess_mode``). Label values are bounded: policy
labels come from the loaded policy set (capped), issuer labels from configured issuers.

Per-Check metrics are not written to Prometheus per Check (a multiprocess value is an mmap'd
file write per sample, the histogram one per bucket): :class:`CheckRecorder` counts them in plain
dicts on the event loop and adds what accrued to the Prometheus metrics once per pass of the loop.
"""

from __future__ import annotations

import asyncio
import bisect
from typing import Hashable, Iterable

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
DECISION_LOG_DROPPED = Counter("authz_decision_log_dropped_lines_total",
                               "Decision log lines dropped because the output was blocked")
CHECKS_REFUSED = Counter("authz_checks_refused_total",
                         "Checks refused at once (RESOURCE_EXHAUSTED) by the worker's admission limits, by reason",
                         ["reason"])
CHECKS_EXPIRED = Counter("authz_checks_expired_total",
                         "Checks not evaluated, or stopped while waiting, because their deadline passed or the "
                         "client gave up, by stage", ["stage"])
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

#: distinct label combinations kept between flushes before one is forced (bounds the memory)
MAX_PENDING_KEYS = 4096


class CheckRecorder:
    """Per-Check counts in plain dicts, added to Prometheus by :meth:`flush` once per loop pass.

    :meth:`record` runs on the event loop; the first record after a flush schedules the next
    flush with ``call_soon``, so everything answered in one pass of the loop (under load, many
    Checks) costs one batch of Prometheus writes, and a Check is in Prometheus (in the worker's
    multiprocess file) as soon as the loop comes round — a worker killed right after answering
    loses nothing it had time to flush. Only the loop's thread records and flushes (outside a
    running loop, e.g. in tests, :meth:`flush` is called directly).
    """

    def __init__(self) -> None:
        #: (decision, reason, policy label, jwt issuer label, jwt result, dry-run results) -> Checks
        self._counts: dict[Hashable, int] = {}
        #: latency bucket index -> observations, and their sum
        self._buckets: dict[int, int] = {}
        self._latency_sum = 0.0
        self._scheduled = False
        self._children: dict[tuple[object, ...], object] = {}

    def record(self, verdict: Verdict, latency: float) -> None:
        key = (verdict.allowed, verdict.reason, _policy_label(verdict.policy) if verdict.policy else "",
               issuer_label(verdict.jwt_issuer) if verdict.jwt_result else "", verdict.jwt_result, verdict.dry_run)
        counts = self._counts
        counts[key] = counts.get(key, 0) + 1
        bucket = bisect.bisect_left(LATENCY_BUCKETS, latency)
        self._buckets[bucket] = self._buckets.get(bucket, 0) + 1
        self._latency_sum += latency
        if not self._scheduled:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
                self._scheduled = True
            except RuntimeError:  # no loop: whoever records flushes
                pass
        if len(counts) > MAX_PENDING_KEYS:
            self.flush()

    def flush(self) -> None:
        """Add what accrued since the last flush to Prometheus."""
        self._scheduled = False
        if not self._counts:
            return
        counts, self._counts = self._counts, {}
        buckets, self._buckets = self._buckets, {}
        total, self._latency_sum = self._latency_sum, 0.0
        for key, count in counts.items():
            self._add_checks(key, count)
        # prometheus_client (pinned) has no public "observe N values at once"; its Histogram keeps a
        # value per bucket (non-cumulative, +Inf last) and the sum: the same ones observe() bumps.
        for index, count in buckets.items():
            CHECK_LATENCY._buckets[index].inc(count)  # noqa: SLF001
        CHECK_LATENCY._sum.inc(total)  # noqa: SLF001

    def _child(self, metric: Counter, *labels: str) -> Counter:
        """``metric.labels(*labels)``, remembered: label values are bounded, the lookup is not free."""
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child  # type: ignore[return-value]

    def _add_checks(self, key: Hashable, count: int) -> None:
        allowed, reason, policy, issuer, jwt_result, dry_run = key  # type: ignore[misc]
        decision = "allow" if allowed else "deny"
        self._child(CHECKS, decision, reason).inc(count)
        if policy:
            self._child(CHECK_POLICY, policy, decision).inc(count)
        if jwt_result:
            self._child(JWT_RESULTS, issuer, jwt_result).inc(count)
        for result in dry_run:
            self._child(DRY_RUN, result.action.value, result.engine_result,
                        _policy_label(result.policy or "none")).inc(count)


checks = CheckRecorder()


def record_check(verdict: Verdict, latency: float) -> None:
    """Count one answered Check (called once per Check, after the answer is built)."""
    checks.record(verdict, latency)


def flush() -> None:
    """Bring Prometheus up to date with the per-Check counts now (at shutdown)."""
    checks.flush()
