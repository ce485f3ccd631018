"""CheckRequest -> attributes: identity, remote.ip, headers, and fail-closed on bad input."""

from __future__ import annotations

import ipaddress

import pytest
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest

from authz_server.engine.request import Workload
from authz_server.explain import check_request_from_description
from authz_server.grpc_api.check_request import (
    MalformedCheckRequest,
    RequestContextSettings,
    namespace_from_spiffe,
    remote_ip,
    to_attributes,
)

ip = ipaddress.ip_address
PEER = ip("10.0.5.5")


@pytest.mark.parametrize(
    ("xff", "kind", "trusted", "expected"),
    [
        (None, "sidecar", 0, PEER),
        ("198.51.100.1, 203.0.113.7", "sidecar", 0, ip("203.0.113.7")),  # rightmost at a sidecar
        ("garbage", "sidecar", 0, PEER),
        ("203.0.113.7, 10.0.5.5", "gateway", 0, PEER),  # no trusted hops: the peer
        ("203.0.113.7, 198.51.100.9, 10.0.5.5", "gateway", 1, ip("198.51.100.9")),  # (N+1)th from the right
        ("203.0.113.7, 10.0.5.5", "gateway", 2, PEER),  # too few entries: the peer
        ("203.0.113.7, 198.51.100.9, 10.0.5.5", "k8s-gateway", 2, ip("203.0.113.7")),
    ],
)
def test_remote_ip(xff: str | None, kind: str, trusted: int, expected: ipaddress.IPv4Address) -> None:
    assert remote_ip(xff, PEER, kind, trusted) == expected


@pytest.mark.parametrize(
    ("principal", "namespace"),
    [
        ("spiffe://cluster.local/ns/foo/sa/httpbin", "foo"),
        ("spiffe://td/ns/bar/sa/x/extra", "bar"),
        ("spiffe://cluster.local/sa/x", None),
        ("https://cluster.local/ns/foo/sa/x", None),
        ("", None),
    ],
)
def test_namespace_from_spiffe(principal: str, namespace: str | None) -> None:
    assert namespace_from_spiffe(principal) == namespace


STATIC = RequestContextSettings(Workload("static-ns", {"app": "static"}, "gateway"), 1)


def describe(**fields) -> CheckRequest:
    return check_request_from_description({"method": "GET", "host": "h", "path": "/p?q=1", **fields})


def test_per_request_identity_wins_over_static_settings() -> None:
    attrs = to_attributes(describe(destination={"principal": "spiffe://cluster.local/ns/foo/sa/x",
                                                "labels": {"app": "httpbin"}}), STATIC)
    assert attrs.workload == Workload("foo", {"app": "httpbin"}, "gateway")
    attrs = to_attributes(describe(), STATIC)
    assert attrs.workload == STATIC.workload


def test_path_query_is_stripped_for_matching_only() -> None:
    attrs = to_attributes(describe(path="/a%2Fb?x=1#frag"), STATIC)
    assert (attrs.path, attrs.raw_path) == ("/a%2Fb", "/a%2Fb?x=1#frag")


def test_plaintext_peer_has_no_principal() -> None:
    attrs = to_attributes(describe(source={"address": "10.0.0.1"}), STATIC)
    assert attrs.source_principal is None and attrs.source_ip == ip("10.0.0.1")


def test_raw_header_map_keeps_repeated_values() -> None:
    request = describe()
    request.attributes.request.http.ClearField("headers")
    request.attributes.request.http.header_map.CopyFrom(HeaderMap(headers=[
        HeaderValue(key="X-Role", value="admin"), HeaderValue(key="x-role", raw_value=b"user"),
    ]))
    attrs = to_attributes(request, STATIC)
    assert attrs.header_values == {"x-role": ("admin", "user")}
    assert attrs.headers == {"x-role": "admin,user"}


@pytest.mark.parametrize("request_", [CheckRequest(), describe(method=""), describe(path="")])
def test_requests_without_http_basics_are_malformed(request_: CheckRequest) -> None:
    with pytest.raises(MalformedCheckRequest):
        to_attributes(request_, STATIC)


def test_header_names_differing_only_in_case_are_malformed() -> None:
    """Regression: ``X-Debug: off`` and ``x-debug: on`` from a direct gRPC client decided by map
    order, which differs between processes; such a request is refused whatever the order."""
    for order in ((("X-Debug", "off"), ("x-debug", "on")), (("x-debug", "on"), ("X-Debug", "off"))):
        request = describe()
        request.attributes.request.http.headers.clear()
        for name, value in order:
            request.attributes.request.http.headers[name] = value
        with pytest.raises(MalformedCheckRequest, match="x-debug"):
            to_attributes(request, STATIC)
    mixed = describe()
    mixed.attributes.request.http.headers["X-Only-Once"] = "1"
    assert to_attributes(mixed, STATIC).headers["x-only-once"] == "1"


def test_oversized_forwarded_for_entries_are_neither_parsed_nor_cached() -> None:
    """Regression: parse_ip's cache was keyed by the raw X-Forwarded-For entry, so 8,192
    distinct 60 KB values kept 484 MB."""
    from authz_server.engine import request as request_module

    before = request_module._parse_short_ip.cache_info().currsize
    for n in range(200):
        assert remote_ip(f"{n}" + "9" * 60_000, PEER, "sidecar", 0) == PEER
        assert remote_ip("x" * 60_000 + f", {n}" + "1" * 60_000 + ", 10.0.0.1", PEER, "gateway", 1) == PEER
    assert request_module._parse_short_ip.cache_info().currsize - before <= 1  # only "10.0.0.1"
    assert remote_ip("  203.0.113.7  ", PEER, "sidecar", 0) == ip("203.0.113.7")


def test_a_peer_principal_over_spiffes_limit_is_malformed() -> None:
    request = describe()
    request.attributes.source.principal = "spiffe://cluster.local/ns/foo/sa/" + "a" * (2048 - 33)
    assert len(request.attributes.source.principal) == 2048
    assert to_attributes(request, STATIC).source_principal == request.attributes.source.principal
    request.attributes.source.principal += "é"
    with pytest.raises(MalformedCheckRequest, match="2048 bytes"):
        to_attributes(request, STATIC)
