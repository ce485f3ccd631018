"""Verdict -> CheckResponse: the response caches hold no request data and stay within bytes."""

from __future__ import annotations

from envoy.service.auth.v3.external_auth_pb2 import CheckResponse

from authz_server.authorizer import Verdict
from authz_server.grpc_api.check_response import (
    MAX_CACHED_RESPONSE_BYTES,
    ResponseCache,
    build_check_response,
    serialized_response,
    to_check_response,
)


def _jwt_denial(path: str, token_id: str = "abc") -> Verdict:
    realm = f'Bearer realm="http://h{path}", error="invalid_token"'
    return Verdict(False, 401, "Jwt is expired", "jwt_expired", "JWT rejected", deny_headers=(("www-authenticate", realm),),
                   jwt_result="expired", jwt_issuer="https://issuer", token_id=token_id)


def test_a_response_carrying_a_long_request_path_is_not_kept() -> None:
    """Regression: the realm (request host and path) was part of every cached verdict and
    response; 3,000 requests with a 50 KB path kept 452 MB."""
    cache = ResponseCache(build_check_response, CheckResponse.ByteSize)
    for n in range(50):
        response = cache(_jwt_denial(f"/{n}/" + "x" * 50_000))
        assert f"/{n}/" in response.denied_response.headers[0].header.value
    assert len(cache) == 0 and cache.bytes == 0


def test_distinct_small_responses_stay_within_the_byte_budget() -> None:
    cache = ResponseCache(lambda v: build_check_response(v).SerializeToString(), len, budget=64 << 10)
    for n in range(5000):
        cache(_jwt_denial(f"/{n}/" + "y" * (MAX_CACHED_RESPONSE_BYTES // 2)))
        assert cache.bytes <= 64 << 10
    assert 0 < len(cache) < 5000


def test_verdicts_differing_only_in_logged_fields_share_one_response() -> None:
    cache = ResponseCache(build_check_response, CheckResponse.ByteSize)
    first = cache(_jwt_denial("/p", token_id="token-1"))
    assert cache(_jwt_denial("/p", token_id="token-2")) is first
    assert len(cache) == 1


def test_both_serving_layers_answer_the_same() -> None:
    verdict = Verdict(True, 200, "", "allowed_by_policy", "ok", "ns/p", 0,
                      upstream_headers=(("x-a", "1"),), remove_headers=("authorization",),
                      remove_query_params=("access_token",))
    assert serialized_response(verdict) == to_check_response(verdict).SerializeToString()
    assert list(to_check_response(verdict).ok_response.query_parameters_to_remove) == ["access_token"]
