"""Typed readers for raw YAML values that report problems instead of raising.

Shared by the AuthorizationPolicy and RequestAuthentication parsers so every document gets
the same checks: strict field names, the right JSON types, non-empty strings in lists.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from authz_server.policy.issues import IssueCollector
from authz_server.policy.model import Attachment, TargetRef

_TARGET_KINDS = {"Gateway", "GatewayClass", "Service", "ServiceEntry"}


def check_fields(raw: Mapping[str, Any], allowed: Iterable[str], report: IssueCollector) -> None:
    """Unknown fields are errors: a typo (``action: DENY`` under ``rules``) must not pass."""
    allowed = set(allowed)
    for key in raw:
        if key not in allowed:
            report.error(str(key), f"unknown field (expected one of: {', '.join(sorted(allowed))})")


def as_mapping(raw: Any, path: str, report: IssueCollector) -> Mapping[str, Any] | None:
    if isinstance(raw, Mapping):
        return raw
    report.error(path, f"must be an object, got {type_name(raw)}")
    return None


def as_string(raw: Any, path: str, report: IssueCollector, *, required: bool = False) -> str | None:
    if raw is None:
        if required:
            report.error(path, "is required")
        return None
    if not isinstance(raw, str):
        report.error(path, f"must be a string, got {type_name(raw)}")
        return None
    if required and raw == "":
        report.error(path, "must not be empty")
        return None
    return raw


def as_string_list(raw: Any, path: str, report: IssueCollector) -> tuple[str, ...] | None:
    """A list of non-empty strings; ``None`` (after reporting) when it is anything else."""
    if not isinstance(raw, list):
        report.error(path, f"must be a list of strings, got {type_name(raw)}")
        return None
    values: list[str] = []
    ok = True
    for i, item in enumerate(raw):
        if not isinstance(item, str):
            hint = " (quote it)" if isinstance(item, (int, float, bool)) else ""
            report.error(f"{path}[{i}]", f"must be a string, got {type_name(item)}{hint}")
            ok = False
        elif item == "":
            report.error(f"{path}[{i}]", "empty string is not allowed")
            ok = False
        else:
            values.append(item)
    return tuple(values) if ok else None


def parse_attachment(spec: Mapping[str, Any], namespace: str, report: IssueCollector) -> Attachment:
    """``selector`` or ``targetRef``/``targetRefs`` (mutually exclusive), Istio-validated."""
    selector = None
    if "selector" in spec and spec["selector"] is not None:
        selector = _parse_selector(spec["selector"], report.scoped("selector"))
    refs: list[TargetRef] = []
    if spec.get("targetRef") is not None:
        ref = _parse_target_ref(spec["targetRef"], namespace, report.scoped("targetRef"))
        refs.extend([ref] if ref else [])
    if spec.get("targetRefs") is not None:
        items = spec["targetRefs"]
        if not isinstance(items, list):
            report.error("targetRefs", f"must be a list, got {type_name(items)}")
        else:
            for i, item in enumerate(items):
                ref = _parse_target_ref(item, namespace, report.scoped(f"targetRefs[{i}]"))
                refs.extend([ref] if ref else [])
    if spec.get("targetRef") is not None and spec.get("targetRefs") is not None:
        report.error("targetRef", "only one of targetRef or targetRefs can be set")
    if selector is not None and (spec.get("targetRef") is not None or spec.get("targetRefs")):
        report.error("selector", "only one of selector or targetRef(s) can be set")
    return Attachment(selector, tuple(refs))


def _parse_selector(raw: Any, report: IssueCollector) -> dict[str, str] | None:
    selector = as_mapping(raw, "", report)
    if selector is None:
        return None
    check_fields(selector, ["matchLabels"], report)
    labels = selector.get("matchLabels") or {}
    labels = as_mapping(labels, "matchLabels", report)
    if labels is None:
        return None
    if not labels:
        report.warning("matchLabels", "empty selector selects every workload of the namespace")
    result: dict[str, str] = {}
    for key, value in labels.items():
        path = f"matchLabels[{key}]"
        if not isinstance(key, str) or key == "":
            report.error(path, "label key must be a non-empty string")
        elif "*" in key:
            report.error(path, "wildcard is not supported in selector keys")
        elif not isinstance(value, str):
            report.error(path, f"label value must be a string, got {type_name(value)}")
        elif "*" in value:
            report.error(path, "wildcard is not supported in selector values")
        else:
            result[key] = value
    return result


def _parse_target_ref(raw: Any, namespace: str, report: IssueCollector) -> TargetRef | None:
    ref = as_mapping(raw, "", report)
    if ref is None:
        return None
    check_fields(ref, ["group", "kind", "name", "namespace"], report)
    kind = as_string(ref.get("kind"), "kind", report, required=True)
    name = as_string(ref.get("name"), "name", report, required=True)
    group = as_string(ref.get("group"), "group", report) or ""
    ref_ns = as_string(ref.get("namespace"), "namespace", report)
    if kind and kind not in _TARGET_KINDS:
        report.error("kind", f"unsupported kind {kind!r} (expected one of {sorted(_TARGET_KINDS)})")
    if ref_ns and ref_ns != namespace:
        report.error("namespace", f"cross-namespace targetRef {ref_ns!r} is not allowed (policy is in {namespace!r})")
    if kind and name:
        return TargetRef(group, kind, name)
    return None


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(value), type(value).__name__
    )
