"""Which workload a Check is for: the proxy's own certificate, labels and call metadata, then the
static settings; unknown stays unknown, contradictions and junk are denied, the log says who."""

from __future__ import annotations

import io
import json

import pytest

from authz_server.authorizer import Verdict
from authz_server.engine.request import RequestAttributes, Workload
from authz_server.explain import check_request_from_description
from authz_server.grpc_api.check_request import RequestContextSettings, to_attributes
from authz_server.grpc_api.workload_identity import (
    MAX_ENTRIES,
    NO_PROXY_IDENTITY,
    BadProxyMetadata,
    ProxyIdentity,
    parse_proxy_metadata,
    proxy_identity,
)
from authz_server.observability.decision_log import MAX_LOGGED_LABELS, DecisionLog

NS, KIND, HOPS = "x-authz-workload-namespace", "x-authz-workload-kind", "x-authz-num-trusted-proxies"
CENTRAL = RequestContextSettings(Workload(None, None, "sidecar"), 0)  # a mesh-wide release: nothing static


def check(principal: str = "", labels: dict[str, str] | None = None, xff: str | None = None):
    headers = {"x-forwarded-for": xff} if xff else {}
    return check_request_from_description({
        "method": "GET", "host": "h", "path": "/", "headers": headers,
        "source": {"address": "10.0.0.9"},
        "destination": {"principal": principal, "labels": labels or {}},
    })


def test_metadata_is_read_from_the_x_authz_entries_only() -> None:
    pairs = [(":authority", "authz"), ("content-type", "application/grpc"), (NS, "shop"), (KIND, "gateway"),
             (HOPS, "2"), ("x-request-id", "r1")]
    assert proxy_identity(pairs) == ProxyIdentity("shop", "gateway", 2)
    assert proxy_identity([("user-agent", "envoy")]) is NO_PROXY_IDENTITY


def test_two_filters_merged_into_one_may_repeat_a_key_with_the_same_value() -> None:
    assert parse_proxy_metadata(((NS, "shop"), (NS, "shop"))) == ProxyIdentity("shop")


@pytest.mark.parametrize(
    ("metadata", "problem"),
    [
        (((NS, "shop"), (NS, "payments")), "conflicting"),
        (((NS, "Shop_1"),), "not a namespace name"),
        (((NS, "a" * 64),), "not a namespace name"),
        (((KIND, "pod"),), "one of sidecar"),
        (((HOPS, "-1"),), "a number from 0 to 255"),
        (((HOPS, "256"),), "a number from 0 to 255"),
        (((HOPS, "²"),), "a number from 0 to 255"),
        ((("x-authz-workload-namspace", "shop"),), "unknown metadata"),
        (((NS, "shop"),) * (MAX_ENTRIES + 1), "at most"),
    ],
)
def test_bad_metadata_is_refused_with_what_is_wrong(metadata, problem: str) -> None:
    with pytest.raises(BadProxyMetadata, match=problem):
        parse_proxy_metadata(metadata)


def test_the_certificate_gives_the_namespace_and_the_node_metadata_the_labels() -> None:
    attrs = to_attributes(check("spiffe://cluster.local/ns/foo/sa/httpbin", {"app": "httpbin"}), CENTRAL)
    assert attrs.workload == Workload("foo", {"app": "httpbin"}, "sidecar")


def test_a_plaintext_callers_namespace_comes_from_the_metadata() -> None:
    proxy = ProxyIdentity("foo", "sidecar")
    assert to_attributes(check(labels={"app": "a"}), CENTRAL, proxy).workload == Workload("foo", {"app": "a"})
    # without it, and without static settings, it stays unknown
    assert to_attributes(check(labels={"app": "a"}), CENTRAL).workload == Workload(None, {"app": "a"})
    assert to_attributes(check(), CENTRAL).workload.labels is None


def test_metadata_contradicting_the_proxys_certificate_is_refused() -> None:
    with pytest.raises(BadProxyMetadata, match="contradicts"):
        to_attributes(check("spiffe://cluster.local/ns/foo/sa/x"), CENTRAL, ProxyIdentity("bar"))


def test_gateway_kind_and_trusted_hops_apply_per_request() -> None:
    """One server, two callers: the gateway's metadata makes remote.ip the trusted client address,
    the sidecar (no metadata) takes the rightmost entry."""
    xff = "203.0.113.7, 198.51.100.9, 10.0.0.9"
    gateway = to_attributes(check(xff=xff), CENTRAL, ProxyIdentity("istio-system", "gateway", 1))
    sidecar = to_attributes(check(xff=xff), CENTRAL)
    assert (gateway.workload.kind, str(gateway.remote_ip)) == ("gateway", "198.51.100.9")
    assert (sidecar.workload.kind, str(sidecar.remote_ip)) == ("sidecar", "10.0.0.9")


def test_static_settings_fill_in_only_what_the_proxy_does_not_send() -> None:
    static = RequestContextSettings(Workload("local", {"app": "local"}, "gateway"), 1)
    assert to_attributes(check(), static).workload == static.workload
    attrs = to_attributes(check(labels={"app": "sent"}), static, ProxyIdentity(kind="sidecar"))
    assert attrs.workload == Workload("local", {"app": "sent"}, "sidecar")


def _logged(workload: Workload) -> dict:
    log = DecisionLog(io.StringIO())
    verdict = Verdict(False, 403, "RBAC: access denied", "unknown_workload_labels", "x")
    return log.entry(verdict, RequestAttributes(method="GET", path="/", workload=workload), 0.001)["workload"]


def test_the_decision_log_records_the_workload() -> None:
    entry = _logged(Workload("foo", {"version": "v1", "app": "httpbin"}, "sidecar"))
    assert entry["namespace"] == "foo" and entry["kind"] == "sidecar"
    assert entry["labels"] == {"app": "httpbin", "version": "v1"} and len(entry["labels_digest"]) == 12
    assert _logged(Workload("foo", {"app": "httpbin", "version": "v1"}))["labels_digest"] == entry["labels_digest"]
    assert _logged(Workload("foo", {"app": "other"}))["labels_digest"] != entry["labels_digest"]
    assert _logged(Workload(None, None)) == {"namespace": None, "kind": "sidecar", "labels": None}


def test_a_huge_label_set_is_logged_as_its_digest_only() -> None:
    entry = _logged(Workload("foo", {f"k{i}": "v" * 60 for i in range(20)}))
    assert "labels" not in entry and entry["labels_digest"]
    assert len(json.dumps(entry)) < MAX_LOGGED_LABELS
