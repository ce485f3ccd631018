"""Which policies apply to a workload (SPEC section 2).

Candidates come from the mesh root namespace and the workload's namespace. Sidecars and
classic gateways honour ``selector`` and ignore anything with ``targetRefs``; Gateway-API
gateways honour both; waypoints honour only ``targetRefs`` (their Gateway, the
``istio-waypoint`` GatewayClass, or the destination Service/ServiceEntry).

When the workload's namespace or labels are unknown (``None``), a policy whose attachment
depends on them cannot be scoped: :func:`missing_identity` says so, and the request is denied
rather than the policy silently skipped (a skipped DENY would be an open door).
"""

from __future__ import annotations

from typing import Mapping

from authz_server.engine.request import Workload
from authz_server.policy.model import Attachment, TargetRef

GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
GATEWAY_CLASS_LABEL = "gateway.networking.k8s.io/gateway-class-name"
WAYPOINT_CLASS = "istio-waypoint"
WORKLOAD_KINDS = ("sidecar", "gateway", "k8s-gateway", "waypoint")


def selector_matches(selector: Mapping[str, str] | None, labels: Mapping[str, str] | None) -> bool:
    """No selector selects everything; otherwise ``matchLabels`` must be a subset of the labels
    (unknown labels match no non-empty selector; :func:`missing_identity` guards that case)."""
    return not selector or labels is not None and all(labels.get(k) == v for k, v in selector.items())


def missing_identity(
    attachment: Attachment, policy_namespace: str, workload: Workload, root_namespace: str
) -> str | None:
    """What the workload lacks to tell whether the policy attaches: ``"namespace"``, ``"labels"``
    or ``None`` (decidable).

    A policy outside the root namespace applies only in its own namespace (or a waypoint's
    service namespace), so it needs the workload's namespace; a non-empty selector, or a
    ``Gateway``/``GatewayClass`` targetRef matched through the gateway's labels, needs its labels.
    """
    if workload.namespace is None and policy_namespace != root_namespace:
        return "namespace"
    if workload.labels is not None:
        return None
    refs = attachment.target_refs
    if workload.kind in ("sidecar", "gateway") or (workload.kind == "k8s-gateway" and not refs):
        return "labels" if not refs and attachment.selector else None
    if workload.kind == "waypoint":
        return "labels" if any(ref.kind == "Gateway" for ref in refs) else None
    return "labels" if any(ref.kind in ("Gateway", "GatewayClass") for ref in refs) else None


def applies(
    attachment: Attachment,
    policy_namespace: str,
    workload: Workload,
    root_namespace: str,
    service: tuple[str, str] | None = None,
) -> bool:
    """Does a policy in ``policy_namespace`` attach to ``workload``?

    ``service`` is the (name, namespace) of the destination service, used by waypoints.
    """
    in_root = policy_namespace == root_namespace
    in_own = policy_namespace == workload.namespace
    in_service = service is not None and policy_namespace == service[1]
    if not (in_root or in_own or (workload.kind == "waypoint" and in_service)):
        return False
    refs = attachment.target_refs
    if workload.kind in ("sidecar", "gateway"):
        return not refs and selector_matches(attachment.selector, workload.labels)
    if workload.kind == "k8s-gateway" and not refs:
        return selector_matches(attachment.selector, workload.labels)
    return any(_ref_matches(ref, policy_namespace, workload, root_namespace, service) for ref in refs)


def _ref_matches(
    ref: TargetRef,
    policy_namespace: str,
    workload: Workload,
    root_namespace: str,
    service: tuple[str, str] | None,
) -> bool:
    labels = workload.labels or {}
    if ref.kind == "Gateway":
        return policy_namespace == workload.namespace and labels.get(GATEWAY_NAME_LABEL) == ref.name
    if ref.kind == "GatewayClass":
        if policy_namespace != root_namespace:
            return False
        if workload.kind == "waypoint":
            return ref.name == WAYPOINT_CLASS
        return labels.get(GATEWAY_CLASS_LABEL) == ref.name
    if ref.kind in ("Service", "ServiceEntry"):
        return workload.kind == "waypoint" and service == (ref.name, policy_namespace)
    return False


def destination_service(host: str, workload_namespace: str | None) -> tuple[str, str] | None:
    """(name, namespace) of the service a waypoint request is for, from its ``:authority``.

    ``name.ns.svc.<domain>[:port]`` and ``name.ns[:port]`` name the namespace; a bare
    ``name`` is in the workload's namespace.
    """
    host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    parts = host.lower().split(".")
    if not parts or not parts[0]:
        return None
    if len(parts) == 1:
        return (parts[0], workload_namespace) if workload_namespace else None
    if len(parts) == 2 or parts[2] == "svc":
        return parts[0], parts[1]
    return None
