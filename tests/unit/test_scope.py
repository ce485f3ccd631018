"""Which policies apply to which workload (SPEC 2): namespaces, selectors, targetRefs by proxy kind."""

from __future__ import annotations

import pytest

from authz_server.engine.request import Workload
from authz_server.engine.scope import applies, destination_service, missing_identity
from authz_server.policy.model import Attachment, TargetRef

ROOT = "istio-system"
SIDECAR = Workload("foo", {"app": "httpbin", "version": "v1"}, "sidecar")
K8S_GW = Workload("foo", {"gateway.networking.k8s.io/gateway-name": "my-gw",
                          "gateway.networking.k8s.io/gateway-class-name": "istio"}, "k8s-gateway")
WAYPOINT = Workload("foo", {"gateway.networking.k8s.io/gateway-name": "waypoint"}, "waypoint")
GATEWAY_REF = TargetRef("gateway.networking.k8s.io", "Gateway", "my-gw")


@pytest.mark.parametrize(
    ("attachment", "namespace", "expected"),
    [
        (Attachment(None), "foo", True),  # namespace-wide
        (Attachment(None), ROOT, True),  # mesh-wide
        (Attachment(None), "bar", False),  # another namespace
        (Attachment({"app": "httpbin"}), "foo", True),
        (Attachment({"app": "httpbin"}), ROOT, True),  # root + selector: matching workloads anywhere
        (Attachment({"app": "httpbin", "version": "v2"}), "foo", False),  # matchLabels must be a subset
        (Attachment({}), "foo", True),  # empty matchLabels selects everything
        (Attachment(None, (GATEWAY_REF,)), "foo", False),  # sidecars ignore targetRefs
    ],
)
def test_sidecar_scoping(attachment: Attachment, namespace: str, expected: bool) -> None:
    assert applies(attachment, namespace, SIDECAR, ROOT) is expected


def test_gateway_api_gateway_honours_target_refs_and_selectors() -> None:
    assert applies(Attachment(None, (GATEWAY_REF,)), "foo", K8S_GW, ROOT)
    assert not applies(Attachment(None, (TargetRef("gateway.networking.k8s.io", "Gateway", "other"),)), "foo", K8S_GW, ROOT)
    assert applies(Attachment({"gateway.networking.k8s.io/gateway-name": "my-gw"}), "foo", K8S_GW, ROOT)
    gateway_class = Attachment(None, (TargetRef("gateway.networking.k8s.io", "GatewayClass", "istio"),))
    assert applies(gateway_class, ROOT, K8S_GW, ROOT)
    assert not applies(gateway_class, "foo", K8S_GW, ROOT)  # GatewayClass only from the root namespace


def test_waypoint_honours_only_target_refs() -> None:
    service_ref = Attachment(None, (TargetRef("", "Service", "reviews"),))
    assert applies(service_ref, "foo", WAYPOINT, ROOT, ("reviews", "foo"))
    assert not applies(service_ref, "foo", WAYPOINT, ROOT, ("ratings", "foo"))
    assert applies(Attachment(None, (TargetRef("gateway.networking.k8s.io", "GatewayClass", "istio-waypoint"),)),
                   ROOT, WAYPOINT, ROOT)
    assert applies(Attachment(None, (TargetRef("gateway.networking.k8s.io", "Gateway", "waypoint"),)),
                   "foo", WAYPOINT, ROOT)
    assert not applies(Attachment(None), "foo", WAYPOINT, ROOT)
    assert not applies(Attachment({"gateway.networking.k8s.io/gateway-name": "waypoint"}), "foo", WAYPOINT, ROOT)


GATEWAY_CLASS_REF = TargetRef("gateway.networking.k8s.io", "GatewayClass", "istio")
SERVICE_REF = TargetRef("", "Service", "reviews")


@pytest.mark.parametrize(
    ("attachment", "namespace", "kind", "missing"),
    [
        (Attachment({"app": "httpbin"}), "foo", "sidecar", "labels"),
        (Attachment({"app": "httpbin"}), ROOT, "gateway", "labels"),  # root + selector still needs labels
        (Attachment(None), "foo", "sidecar", None),  # namespace-wide
        (Attachment({}), "foo", "sidecar", None),  # empty matchLabels: everything
        (Attachment(None, (GATEWAY_REF,)), "foo", "sidecar", None),  # ignored by sidecars anyway
        (Attachment({"app": "x"}), "foo", "waypoint", None),  # waypoints ignore selectors
        (Attachment(None, (GATEWAY_REF,)), "foo", "waypoint", "labels"),  # gateway-name label
        (Attachment(None, (SERVICE_REF,)), "foo", "waypoint", None),  # from the host
        (Attachment(None, (GATEWAY_CLASS_REF,)), ROOT, "k8s-gateway", "labels"),  # gateway-class-name label
        (Attachment({"app": "x"}), "foo", "k8s-gateway", "labels"),
        (Attachment(None, (SERVICE_REF,)), "foo", "k8s-gateway", None),  # never applies to a gateway
    ],
)
def test_what_an_unknown_label_set_leaves_undecidable(attachment, namespace, kind, missing) -> None:
    assert missing_identity(attachment, namespace, Workload("foo", None, kind), ROOT) == missing
    assert missing_identity(attachment, namespace, Workload("foo", {"a": "b"}, kind), ROOT) is None


def test_an_unknown_namespace_leaves_every_namespaced_policy_undecidable() -> None:
    unknown = Workload(None, {"app": "httpbin"})
    assert missing_identity(Attachment(None), "foo", unknown, ROOT) == "namespace"
    assert missing_identity(Attachment({"app": "httpbin"}), ROOT, unknown, ROOT) is None
    assert missing_identity(Attachment({"app": "httpbin"}), ROOT, Workload(None, None), ROOT) == "labels"


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("reviews.bar.svc.cluster.local:9080", ("reviews", "bar")),
        ("reviews.bar", ("reviews", "bar")),
        ("reviews:9080", ("reviews", "foo")),
        ("www.example.com", None),
    ],
)
def test_waypoint_destination_service_from_authority(host: str, expected: tuple[str, str] | None) -> None:
    assert destination_service(host, "foo") == expected
