"""The ``istio.io/dry-run`` annotation, parsed as Istio does (Go ``strconv.ParseBool``)."""

from __future__ import annotations

from typing import Any, Mapping

from authz_server.policy.issues import IssueCollector

DRY_RUN_ANNOTATION = "istio.io/dry-run"
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def parse_go_bool(text: str) -> bool | None:
    """Go's ParseBool: exactly these spellings, anything else is not a bool (``None``)."""
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    return None


def parse_dry_run(annotations: Mapping[str, Any], report: IssueCollector) -> bool:
    """True when the policy is dry-run. An unparsable value is logged and the policy *enforced*."""
    if not isinstance(annotations, Mapping) or DRY_RUN_ANNOTATION not in annotations:
        return False
    raw = annotations[DRY_RUN_ANNOTATION]
    value = parse_go_bool(raw) if isinstance(raw, str) else None
    if value is None:
        report.warning(f"[{DRY_RUN_ANNOTATION}]", f"invalid value {raw!r} (expected true/false): policy is enforced")
        return False
    return value
