"""Verdict -> CheckResponse, in the shape Envoy honours (SPEC 8.2).

Allow: ``status.code`` 0 with ``ok_response`` header mutations. Deny: a non-zero status and a
``denied_response`` carrying the HTTP status, body and headers of the local reply, exactly as
Istio's own RBAC/jwt_authn filters would answer. A decision is never a gRPC error.
"""

from __future__ import annotations

from typing import Callable, Generic, Hashable, TypeVar

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


#: A response larger than this is built per Check and never cached: it carries request data
#: (a ``www-authenticate`` realm with the request's host and path, a long claim value) that a
#: cache must not keep on the client's behalf.
MAX_CACHED_RESPONSE_BYTES = 2048
#: What one response cache may hold (responses and their keys); when full it starts over.
RESPONSE_CACHE_BYTES = 4 << 20

T = TypeVar("T")


def response_key(verdict: Verdict) -> Hashable:
    """The verdict fields the CheckResponse is made of, and nothing else: verdicts differing
    only in what is logged (token digest, issuer, detail) share one cached response."""
    return (
        verdict.allowed, verdict.http_status, verdict.body, verdict.reason, verdict.policy,
        verdict.deny_headers, verdict.upstream_headers, verdict.response_headers,
        verdict.remove_headers, verdict.remove_query_params, verdict.dry_run,
    )


class ResponseCache(Generic[T]):
    """Responses by :func:`response_key`, bounded in bytes: a handful of verdicts make up most
    traffic, so each is built once; responses over :data:`MAX_CACHED_RESPONSE_BYTES` are not
    kept at all, so no request can make the cache hold its strings."""

    def __init__(self, build: Callable[[Verdict], T], size: Callable[[T], int],
                 budget: int = RESPONSE_CACHE_BYTES) -> None:
        self._build = build
        self._size = size
        self._budget = budget
        self._entries: dict[Hashable, T] = {}
        self.bytes = 0

    def __call__(self, verdict: Verdict) -> T:
        key = response_key(verdict)
        cached = self._entries.get(key)
        if cached is not None:
            return cached
        response = self._build(verdict)
        size = self._size(response)
        if size <= MAX_CACHED_RESPONSE_BYTES:
            # The key holds the same strings as the response: count them twice.
            if self.bytes + 2 * size > self._budget:
                self._entries.clear()
                self.bytes = 0
            self._entries[key] = response
            self.bytes += 2 * size
        return response

    def __len__(self) -> int:
        return len(self._entries)


def build_check_response(verdict: Verdict) -> CheckResponse:
    """The response for a verdict (uncached)."""
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


#: The response message (grpcio serving layer); a cached message is only ever read by gRPC.
to_check_response: ResponseCache[CheckResponse] = ResponseCache(build_check_response, CheckResponse.ByteSize)
#: The serialised response (fast serving layer).
serialized_response: ResponseCache[bytes] = ResponseCache(
    lambda verdict: build_check_response(verdict).SerializeToString(), len)
