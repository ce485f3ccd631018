"""The ``envoy.service.auth.v3.Authorization/Check`` method: adapt, decide, answer, observe.

:class:`CheckHandler` is the method itself, shared by both serving layers: the fast HTTP/2
server calls :meth:`CheckHandler.check_bytes` (bytes and the call's headers in, cached bytes out)
and the grpcio layer through a generic bytes handler — the same method, with the call's
invocation metadata. Either way the calling proxy's ``x-authz-*`` metadata
(:mod:`.workload_identity`) reaches the decision.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable

from envoy.service.auth.v3.external_auth_pb2 import CheckRequest
from google.protobuf.message import DecodeError

from authz_server.authorizer import Authorizer, Verdict
from authz_server.engine.request import RequestAttributes
from authz_server.grpc_api.check_request import MalformedCheckRequest, RequestContextSettings, to_attributes
from authz_server.grpc_api.check_response import serialized_response
from authz_server.grpc_api.workload_identity import BadProxyMetadata, proxy_identity
from authz_server.observability.log_limit import RateLimitedLog

log = logging.getLogger(__name__)
#: one line per malformed Check until a client floods; then at most 10 per 10 s
_log_malformed = RateLimitedLog(log)

#: called once per answered Check with the verdict, the request (None if malformed) and latency
CheckObserver = Callable[[Verdict, RequestAttributes | None, float], None]


class CheckHandler:
    def __init__(
        self,
        authorizer: Authorizer,
        context_settings: RequestContextSettings,
        observe: CheckObserver | None = None,
    ) -> None:
        self.authorizer = authorizer
        self.context_settings = context_settings
        self.observe = observe

    async def verdict(
        self, request: CheckRequest, started: float | None = None, metadata: Iterable[tuple[str, str]] = ()
    ) -> Verdict:
        """Decide *request*; *metadata* is the Check call's headers (the proxy's identity)."""
        started = time.perf_counter() if started is None else started
        attrs: RequestAttributes | None
        try:
            attrs = to_attributes(request, self.context_settings, proxy_identity(metadata))
        except (MalformedCheckRequest, BadProxyMetadata) as exc:
            _log_malformed("%s: %s", "bad proxy metadata" if isinstance(exc, BadProxyMetadata)
                           else "malformed CheckRequest", exc)
            attrs = None
            header = exc.reason if isinstance(exc, BadProxyMetadata) else "error"
            verdict = self.authorizer.failure(exc.reason, str(exc), header=header)
        else:
            verdict = await self.authorizer.check(attrs)
            if verdict.dry_run:
                _log_dry_run(verdict, attrs.method, attrs.path)
        if self.observe is not None:
            self.observe(verdict, attrs, time.perf_counter() - started)
        return verdict

    async def check_bytes(self, data: bytes, headers: Iterable[tuple[str, str]] = ()) -> bytes:
        started = time.perf_counter()
        try:
            request = CheckRequest.FromString(data)
        except DecodeError as exc:
            _log_malformed("undecodable CheckRequest: %s", exc)
            verdict = self.authorizer.failure("malformed_request", "undecodable CheckRequest")
            if self.observe is not None:
                self.observe(verdict, None, time.perf_counter() - started)
            return serialized_response(verdict)
        return serialized_response(await self.verdict(request, started, headers))


def _log_dry_run(verdict: Verdict, method: str, path: str) -> None:
    """Log when a dry-run engine disagrees with the enforced decision: what it would change."""
    for result in verdict.dry_run:
        would_allow = result.engine_result == "allowed"
        if would_allow != verdict.allowed:
            log.info(
                "dry-run %s policy %s would have %s %s %s (enforced: %s)",
                result.action.value, result.effective_policy_id or "(none matched)", result.engine_result,
                method, path, "allow" if verdict.allowed else "deny",
            )
