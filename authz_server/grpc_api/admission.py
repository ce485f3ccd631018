"""Overload: which Checks a worker takes on, and which it answers at once without evaluating.

Why: a Check Envoy has already given up on (its ext_authz timeout, sent as ``grpc-timeout``) is
wasted work, and under overload evaluating those first makes every Check late — useful throughput
falls to nothing (issue 15 measured 598 of 600 requests timed out). So each worker

* **sheds** — takes on at most ``max_pending`` Checks (queued or in progress, e.g. waiting on a
  JWKS fetch), and none that would wait in the queue longer than ``max_queue_delay``: the wait is
  the queued Checks times the recent evaluation time per Check (a moving average), or the age of
  the oldest queued one if that is longer; the excess is answered at once with ``RESOURCE_EXHAUSTED``
  (:data:`REFUSED_STATUS`), counted (``authz_checks_refused_total{reason}``) and logged,
  rate-limited;
* **expires** — never starts evaluating a Check whose deadline has passed, and stops one that
  waits past it: answered ``DEADLINE_EXCEEDED`` (or not at all when the client already reset the
  stream), counted (``authz_checks_expired_total{stage}``).

``RESOURCE_EXHAUSTED``, not ``UNAVAILABLE``: both make Envoy apply ``failure_mode_allow`` /
``status_on_error`` (Istio's ``failOpen``/``statusOnError``; tests/e2e/test_overload_envoy.py
shows it with Envoy 1.40), but ``UNAVAILABLE`` is what Envoy itself reports when it cannot reach
the server at all and what gRPC retry policies retry by default — an overloaded server must not
invite retries, and an operator must be able to tell "shedding" from "down" in Envoy's
per-status gRPC stats. grpcio's own ``maximum_concurrent_rpcs`` answers the same status.

Both serving layers use one :class:`Admission` per worker; the fast layer also queues Checks
itself (it reads every connection promptly, so a Check's age is known from its arrival), grpcio
only counts them and reads the deadline from ``context.time_remaining()``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from authz_server.grpc_api import h2_frames as h2
from authz_server.observability.log_limit import RateLimitedLog

log = logging.getLogger(__name__)

REFUSED_STATUS = h2.GRPC_RESOURCE_EXHAUSTED
EXPIRED_STATUS = h2.GRPC_DEADLINE_EXCEEDED
#: refusal reasons (label values of authz_checks_refused_total)
PENDING_LIMIT = "pending_limit"
QUEUE_DELAY = "queue_delay"
#: where an expired Check was stopped (label values of authz_checks_expired_total): before its
#: evaluation started, or while it waited (on a JWKS fetch)
BEFORE_EVALUATION = "queued"
WHILE_WAITING = "waiting"


@dataclass(frozen=True)
class OverloadLimits:
    """Per worker: Checks taken on at once, and how far behind the queue may fall."""

    #: Checks queued or in progress (waiting on a JWKS fetch included)
    max_pending: int = 1000
    #: seconds a new Check may be expected to wait in the queue before it is refused (0 = no bound)
    max_queue_delay: float = 0.1


class Admission:
    """One worker's count of Checks taken on, and the counting and logging of those it sheds.

    ``on_refused(reason)`` and ``on_expired(stage)`` feed the metrics; log lines are rate-limited
    (a flood of refusals is the normal state of an overloaded server, not news every time).
    """

    def __init__(self, limits: OverloadLimits | None = None, on_refused: Callable[[str], None] | None = None,
                 on_expired: Callable[[str], None] | None = None) -> None:
        self.limits = limits or OverloadLimits()
        self.max_pending = self.limits.max_pending
        self.max_queue_delay = self.limits.max_queue_delay or float("inf")
        #: Checks taken on and not answered yet (queued, being evaluated, or waiting)
        self.pending = 0
        self._on_refused = on_refused or (lambda reason: None)
        self._on_expired = on_expired or (lambda stage: None)
        self._log_refused = RateLimitedLog(log)
        self._log_expired = RateLimitedLog(log)

    def refusal(self, wait: float) -> str | None:
        """Why a new Check must be refused (None: take it), if it would ``wait`` that long queued."""
        if self.pending >= self.max_pending:
            return PENDING_LIMIT
        if wait > self.max_queue_delay:
            return QUEUE_DELAY
        return None

    def refused(self, reason: str, peer: str, wait: float = 0.0) -> str:
        """Count and log a refusal; returns the status message for the client."""
        self._on_refused(reason)
        if reason == PENDING_LIMIT:
            message = f"overloaded: {self.pending} Checks already in progress or queued (limit {self.max_pending})"
        else:
            message = (f"overloaded: a new Check would wait about {wait * 1000:.0f} ms in the queue "
                       f"(limit {self.max_queue_delay * 1000:.0f} ms)")
        self._log_refused("refusing a Check from %s: %s", peer, message)
        return message

    def expired(self, stage: str, peer: str) -> str:
        """Count and log a Check stopped by its deadline; returns the status message."""
        self._on_expired(stage)
        message = "deadline exceeded before the Check was evaluated" if stage == BEFORE_EVALUATION \
            else "deadline exceeded while the Check waited"
        self._log_expired("not evaluating a Check from %s: %s", peer, message)
        return message
