"""What a test expects of a verdict, and how a verdict falls short of it.

Only what a test states is checked: ``decision: deny`` alone passes for any deny. Header
expectations name headers; ``null`` as a value means "must not be there".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from authz_server.authorizer import Verdict
from authz_server.policy.issues import IssueCollector

FIELDS = ("decision", "status", "reason", "policy", "rule", "dryRun", "upstreamHeaders", "removedHeaders",
          "responseHeaders")
DRY_RUN_ACTIONS = ("ALLOW", "DENY")
DRY_RUN_RESULTS = ("allowed", "denied")
_UNSET: Any = object()

HeaderExpectations = tuple[tuple[str, str | None], ...]


@dataclass(frozen=True)
class DryRunExpectation:
    result: str
    #: the dry-run policy that matched (``ns/name``); ``None`` = not checked, ``""`` = none matched
    policy: str | None = None


@dataclass(frozen=True)
class Expectation:
    decision: str | None = None
    status: int | None = None
    reason: str | None = None
    #: ``""`` = decided by no policy; ``None`` = not checked
    policy: str | None = None
    rule: int | None = None
    dry_run: tuple[tuple[str, DryRunExpectation], ...] = ()
    upstream_headers: HeaderExpectations = ()
    removed_headers: tuple[str, ...] = ()
    response_headers: HeaderExpectations = ()

    def mismatches(self, verdict: Verdict) -> list[str]:
        """One line per expectation the verdict does not meet (empty when it meets them all)."""
        problems: list[str] = []
        decision = "allow" if verdict.allowed else "deny"
        for name, expected, actual in (
            ("decision", self.decision, decision),
            ("status", self.status, verdict.http_status),
            ("reason", self.reason, verdict.reason),
            ("policy", self.policy, verdict.policy),
            ("rule", self.rule, verdict.rule),
        ):
            if expected is not None and expected != actual:
                problems.append(f"{name}: expected {_show(expected)}, got {_show(actual)}")
        results = {r.action.value: r for r in verdict.dry_run}
        for action, want in self.dry_run:
            got = results.get(action)
            if got is None:
                problems.append(f"dryRun.{action}: expected {want.result}, but no dry-run {action} policy applies")
                continue
            if got.engine_result != want.result:
                problems.append(f"dryRun.{action}: expected {want.result}, got {got.engine_result}")
            if want.policy is not None and got.policy != want.policy:
                problems.append(f"dryRun.{action}.policy: expected {_show(want.policy)}, got {_show(got.policy)}")
        problems += _header_mismatches("upstreamHeaders", self.upstream_headers, verdict.upstream_headers)
        removed = set(verdict.remove_headers)
        problems += [f"removedHeaders: {name} is not removed upstream"
                     for name in self.removed_headers if name not in removed]
        to_client = verdict.response_headers if verdict.allowed else verdict.deny_headers
        problems += _header_mismatches("responseHeaders", self.response_headers, to_client)
        return problems


def _header_mismatches(what: str, expected: HeaderExpectations, actual: tuple[tuple[str, str], ...]) -> list[str]:
    values = dict(actual)
    problems = []
    for name, want in expected:
        got = values.get(name)
        if want is None and got is not None:
            problems.append(f"{what}.{name}: expected absent, got {got!r}")
        elif want is not None and got != want:
            problems.append(f"{what}.{name}: expected {want!r}, got " + ("nothing" if got is None else repr(got)))
    return problems


def _show(value: Any) -> str:
    return "none" if value in ("", None) else str(value)


def parse_expectation(raw: Any, report: IssueCollector) -> Expectation | None:
    """Validate ``expect``; every problem goes to ``report`` (field path under ``expect``)."""
    if not isinstance(raw, Mapping) or not raw:
        report.error("", "must be an object with at least one of " + ", ".join(FIELDS))
        return None
    before = len(report.errors)
    for key in raw:
        if key not in FIELDS:
            report.error(str(key), f"unknown field (expected {', '.join(FIELDS)})")
    decision = raw.get("decision")
    if decision is not None:
        decision = str(decision).lower() if isinstance(decision, str) else decision
        if decision not in ("allow", "deny"):
            report.error("decision", f"must be allow or deny, got {raw['decision']!r}")
    status = _int(raw, "status", report, 100, 599)
    reason = _string(raw, "reason", report)
    policy = _string(raw, "policy", report, nullable=True)
    rule = _int(raw, "rule", report, 0, None)
    expectation = Expectation(
        decision=decision, status=status, reason=reason, policy=policy, rule=rule,
        dry_run=_dry_run(raw.get("dryRun"), report.scoped("dryRun")),
        upstream_headers=_headers(raw.get("upstreamHeaders"), report.scoped("upstreamHeaders")),
        removed_headers=_names(raw.get("removedHeaders"), report.scoped("removedHeaders")),
        response_headers=_headers(raw.get("responseHeaders"), report.scoped("responseHeaders")),
    )
    return expectation if len(report.errors) == before else None


def _int(raw: Mapping[str, Any], key: str, report: IssueCollector, low: int, high: int | None) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f">= {low}"
        report.error(key, f"must be an integer {bounds}, got {value!r}")
        return None
    return value


def _string(raw: Mapping[str, Any], key: str, report: IssueCollector, nullable: bool = False) -> str | None:
    value = raw.get(key, _UNSET)
    if value is _UNSET or (value is None and not nullable):
        return None
    if value is None:
        return ""
    if not isinstance(value, str):
        report.error(key, f"must be a string, got {value!r}")
        return None
    return value


def _dry_run(raw: Any, report: IssueCollector) -> tuple[tuple[str, DryRunExpectation], ...]:
    """``{DENY: denied}`` or ``{DENY: {result: denied, policy: ns/name}}``."""
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        report.error("", "must be an object keyed by ALLOW/DENY")
        return ()
    out = []
    for action, value in raw.items():
        name = str(action).upper()
        if name not in DRY_RUN_ACTIONS:
            report.error(str(action), "must be ALLOW or DENY (the dry-run engines)")
            continue
        if isinstance(value, str):
            value = {"result": value}
        if not isinstance(value, Mapping) or set(value) - {"result", "policy"}:
            report.error(str(action), "must be allowed/denied or {result, policy}")
            continue
        result = value.get("result")
        if result not in DRY_RUN_RESULTS:
            report.error(f"{action}.result", f"must be allowed or denied, got {result!r}")
            continue
        policy = value.get("policy", _UNSET)
        if policy is not _UNSET and policy is not None and not isinstance(policy, str):
            report.error(f"{action}.policy", "must be a string (ns/name)")
            continue
        out.append((name, DryRunExpectation(result, None if policy is _UNSET else policy or "")))
    return tuple(out)


def _headers(raw: Any, report: IssueCollector) -> HeaderExpectations:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        report.error("", "must be an object: header name -> value (null = must be absent)")
        return ()
    out = []
    for name, value in raw.items():
        if not isinstance(name, str) or not name:
            report.error(str(name), "header name must be a non-empty string")
        elif value is not None and not isinstance(value, (str, int)):
            report.error(name, f"must be a string or null, got {value!r}")
        else:
            out.append((name.lower(), None if value is None else str(value)))
    return tuple(out)


def _names(raw: Any, report: IssueCollector) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(n, str) and n for n in raw):
        report.error("", "must be a list of header names")
        return ()
    return tuple(n.lower() for n in raw)
