"""The project's own Diagnostics service (protos/): Explain and PolicyStatus.

:class:`Diagnostics` holds the methods; both serving layers expose them (the grpcio servicer
below, and the fast server through :func:`authz_server.grpc_api.fast_server.unary`). A bad
request description raises :class:`InvalidRequest`, which each layer turns into
INVALID_ARGUMENT.
"""

from __future__ import annotations

import datetime

import grpc

from authz_server._proto import diagnostics_pb2, diagnostics_pb2_grpc
from authz_server.authorizer import Authorizer
from authz_server.explain import RequestDescriptionError, explain, parse_request_description
from authz_server.grpc_api.check_request import MalformedCheckRequest, RequestContextSettings
from authz_server.policy_store import PolicyStore

InvalidRequest = (RequestDescriptionError, MalformedCheckRequest)


class Diagnostics:
    def __init__(self, store: PolicyStore, authorizer: Authorizer, context: RequestContextSettings) -> None:
        self.store = store
        self.authorizer = authorizer
        self.context = context

    async def explain(self, request: diagnostics_pb2.ExplainRequest) -> diagnostics_pb2.ExplainResponse:
        check = parse_request_description(request.request_document)
        result = await explain(check, self.store.engine(), self.authorizer, self.context)
        verdict = result.verdict
        return diagnostics_pb2.ExplainResponse(
            allowed=verdict.allowed,
            http_status=verdict.http_status,
            policy=verdict.policy,
            rule="" if verdict.rule is None else f"rule[{verdict.rule}]",
            reason=f"{verdict.reason}: {verdict.detail}",
            dry_run=[
                diagnostics_pb2.DryRunResult(
                    policy=d.policy, action=d.action.value, matched=bool(d.effective_policy_id),
                    effect=f"would have {d.engine_result}", rule=d.effective_policy_id,
                )
                for d in verdict.dry_run
            ],
            text=result.text,
        )

    async def policy_status(self, request: diagnostics_pb2.PolicyStatusRequest) -> diagnostics_pb2.PolicyStatusResponse:
        policy_set = self.store.policy_set
        loaded_at = ""
        if self.store.last_good_at is not None:
            loaded_at = datetime.datetime.fromtimestamp(self.store.last_good_at, datetime.timezone.utc).isoformat()
        return diagnostics_pb2.PolicyStatusResponse(
            authorization_policies=len(policy_set.authorization_policies) if policy_set else 0,
            request_authentications=len(policy_set.request_authentications) if policy_set else 0,
            loaded_at=loaded_at,
            source=self.store.path,
            warnings=[str(w) for w in policy_set.warnings] if policy_set else [],
            generation=self.store.generation,
        )


class DiagnosticsService(diagnostics_pb2_grpc.DiagnosticsServicer):
    """The grpcio form of the service."""

    def __init__(self, diagnostics: Diagnostics) -> None:
        self.diagnostics = diagnostics

    async def Explain(  # noqa: N802
        self, request: diagnostics_pb2.ExplainRequest, context: grpc.aio.ServicerContext
    ) -> diagnostics_pb2.ExplainResponse:
        try:
            return await self.diagnostics.explain(request)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))  # raises

    async def PolicyStatus(  # noqa: N802
        self, request: diagnostics_pb2.PolicyStatusRequest, context: grpc.aio.ServicerContext
    ) -> diagnostics_pb2.PolicyStatusResponse:
        return await self.diagnostics.policy_status(request)
