"""The ``envoy.service.auth.v3.Authorization`` service: one Check = adapt, decide, answer."""

from __future__ import annotations

import logging
import time
from typing import Callable

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest, CheckResponse

from authz_server.authorizer import Authorizer, Verdict
from authz_server.engine.request import RequestAttributes
from authz_server.grpc_api.check_request import MalformedCheckRequest, RequestContextSettings, to_attributes
from authz_server.grpc_api.check_response import to_check_response

log = logging.getLogger(__name__)


#: called once per answered Check with the verdict, the request (None if malformed) and latency
CheckObserver = Callable[[Verdict, RequestAttributes | None, float], None]


class AuthorizationService(external_auth_pb2_grpc.AuthorizationServicer):
    def __init__(
        self,
        authorizer: Authorizer,
        context_settings: RequestContextSettings,
        observe: CheckObserver | None = None,
    ) -> None:
        self.authorizer = authorizer
        self.context_settings = context_settings
        self.observe = observe

    async def Check(self, request: CheckRequest, context: grpc.aio.ServicerContext) -> CheckResponse:  # noqa: N802
        started = time.perf_counter()
        attrs: RequestAttributes | None
        try:
            attrs = to_attributes(request, self.context_settings)
        except MalformedCheckRequest as exc:
            log.warning("malformed CheckRequest: %s", exc)
            attrs = None
            verdict = self.authorizer.failure("malformed_request", str(exc))
        else:
            verdict = await self.authorizer.check(attrs)
            if verdict.dry_run:
                _log_dry_run(verdict, attrs.method, attrs.path)
        response = to_check_response(verdict)
        if self.observe is not None:
            self.observe(verdict, attrs, time.perf_counter() - started)
        return response


def _log_dry_run(verdict: Verdict, method: str, path: str) -> None:
    """Dry-run results are the whole point of a dry-run policy: always visible in the log."""
    for result in verdict.dry_run:
        log.info(
            "dry-run %s engine: %s (policy %s) for %s %s; enforced decision: %s",
            result.action.value, result.engine_result, result.effective_policy_id or "none matched",
            method, path, "allow" if verdict.allowed else "deny",
        )
