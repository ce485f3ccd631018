"""Verdict -> CheckResponse, in the shape Envoy honours (SPEC 8.2).

Allow: ``status.code`` 0 with ``ok_response`` header mutations. Deny: a non-zero status and a
``denied_response`` carrying the HTTP status, body and headers of the local reply, exactly as
Istio's own RBAC/jwt_authn filters would answer. A decision is never a gRPC error.
"""

from __future__ import annotations

import functools

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.auth.v3.external_auth_pb2 import CheckResponse, DeniedHttpResponse, OkHttpResponse
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf.struct_pb2 import Struct
from google.rpc import code_pb2, status_pb2

from authz_server.authorizer import Headers, Verdict

_OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def _options(headers: Headers) -> list[HeaderValueOption]:
    return [HeaderValueOption(header=HeaderValue(key=k, value=v), append_action=_OVERWRITE) for k, v in headers]


def dynamic_metadata(verdict: Verdict) -> Struct | None:
    """Decision facts for Envoy access logs (``%DYNAMIC_METADATA(envoy.filters.http.ext_authz)%``).

    Includes Istio's dry-run keys (``istio_dry_run_{allow,deny}_shadow_*``) so existing
    dashboards built on Istio's shadow metadata keep working.
    """
    fields: dict[str, str] = {"decision": "allow" if verdict.allowed else "deny", "reason": verdict.reason}
    if verdict.policy:
        fields["policy"] = verdict.policy
    for result in verdict.dry_run:
        prefix = f"istio_dry_run_{result.action.value.lower()}_shadow_"
        fields[prefix + "engine_result"] = result.engine_result
        if result.effective_policy_id:
            fields[prefix + "effective_policy_id"] = result.effective_policy_id
    struct = Struct()
    struct.update(fields)
    return struct


@functools.lru_cache(maxsize=4096)
def to_check_response(verdict: Verdict) -> CheckResponse:
    """The response for a verdict; cached, since a handful of verdicts make up most traffic.

    Verdicts are immutable values, and a cached message is only ever read (serialised) by gRPC.
    """
    metadata = dynamic_metadata(verdict)
    if verdict.allowed:
        return CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=OkHttpResponse(
                headers=_options(verdict.upstream_headers),
                headers_to_remove=list(verdict.remove_headers),
                query_parameters_to_remove=list(verdict.remove_query_params),
                response_headers_to_add=_options(verdict.response_headers),
            ),
            dynamic_metadata=metadata,
        )
    code = code_pb2.UNAUTHENTICATED if verdict.http_status == 401 else code_pb2.PERMISSION_DENIED
    headers = (*verdict.deny_headers, ("content-type", "text/plain"))
    return CheckResponse(
        status=status_pb2.Status(code=code, message=verdict.reason),
        denied_response=DeniedHttpResponse(
            status=HttpStatus(code=verdict.http_status),
            headers=_options(headers),
            body=verdict.body,
        ),
        dynamic_metadata=metadata,
    )
