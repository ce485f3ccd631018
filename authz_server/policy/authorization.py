"""Parse and validate an AuthorizationPolicy spec as Istio's admission webhook would (SPEC 10)."""

from __future__ import annotations

from typing import Any, Mapping

from authz_server.policy.fields import as_mapping, as_string, as_string_list, check_fields, type_name
from authz_server.policy.issues import IssueCollector
from authz_server.policy.model import Action, FieldMatch, Rule
from authz_server.policy.vocabulary import (
    ATTRIBUTE_KINDS,
    CUSTOM_FORBIDDEN_ATTRIBUTES,
    OPERATION_FIELDS,
    SOURCE_FIELDS,
    ValueKind,
    value_problem,
    when_key_attribute,
)

SPEC_FIELDS = ("selector", "targetRef", "targetRefs", "action", "provider", "rules")
MAX_SERVICE_ACCOUNTS = 16


def parse_action(spec: Mapping[str, Any], report: IssueCollector) -> Action | None:
    raw = spec.get("action")
    if raw is None:
        return Action.ALLOW
    if not isinstance(raw, str) or raw not in Action.__members__:
        report.error("action", f"invalid action {raw!r} (expected ALLOW, DENY, AUDIT or CUSTOM)")
        return None
    return Action[raw]


def parse_provider(spec: Mapping[str, Any], action: Action | None, report: IssueCollector) -> str | None:
    raw = spec.get("provider")
    if raw is None:
        if action is Action.CUSTOM:
            report.error("provider", "CUSTOM action requires provider.name")
        return None
    if action is not Action.CUSTOM:
        report.error("provider", f"provider can only be used with CUSTOM action, not {action.value if action else '?'}")
        return None
    provider = as_mapping(raw, "provider", report)
    if provider is None:
        return None
    check_fields(provider, ["name"], report.scoped("provider"))
    return as_string(provider.get("name"), "provider.name", report, required=True)


def parse_rules(
    spec: Mapping[str, Any], action: Action | None, namespace: str, report: IssueCollector
) -> tuple[Rule, ...] | None:
    """``None`` for a spec without ``rules`` (allow-nothing for ALLOW, rejected for DENY/CUSTOM)."""
    raw = spec.get("rules")
    if raw is None:
        if action in (Action.DENY, Action.CUSTOM):
            report.error("rules", f"{action.value} policy without rules is meaningless (use rules: [{{}}] to match everything)")
        return None
    if not isinstance(raw, list):
        report.error("rules", f"must be a list, got {type_name(raw)}")
        return None
    rules = []
    for i, item in enumerate(raw):
        rule = _parse_rule(item, action, namespace, report.scoped(f"rules[{i}]"))
        if rule is not None:
            rules.append(rule)
    return tuple(rules)


def _parse_rule(raw: Any, action: Action | None, namespace: str, report: IssueCollector) -> Rule | None:
    if raw is None:
        raw = {}
    rule = as_mapping(raw, "", report)
    if rule is None:
        return None
    check_fields(rule, ["from", "to", "when"], report)
    sources = _parse_clauses(rule, "from", "source", SOURCE_FIELDS, action, namespace, report)
    operations = _parse_clauses(rule, "to", "operation", OPERATION_FIELDS, action, namespace, report)
    conditions: list[FieldMatch] = []
    raw_when = rule.get("when")
    if raw_when is not None:
        if not isinstance(raw_when, list):
            report.error("when", f"must be a list, got {type_name(raw_when)}")
        else:
            for i, cond in enumerate(raw_when):
                parsed = _parse_condition(cond, action, namespace, report.scoped(f"when[{i}]"), f"when[{i}]")
                if parsed is not None:
                    conditions.append(parsed)
    return Rule(sources, operations, tuple(conditions))


def _parse_clauses(
    rule: Mapping[str, Any],
    key: str,
    inner: str,
    fields: Mapping[str, str],
    action: Action | None,
    namespace: str,
    report: IssueCollector,
) -> tuple[tuple[FieldMatch, ...], ...] | None:
    if key not in rule or rule[key] is None:
        return None
    items = rule[key]
    if not isinstance(items, list):
        report.error(key, f"must be a list, got {type_name(items)}")
        return None
    if not items:
        report.error(key, f"empty `{key}` is not allowed (omit it to match everything)")
        return None
    clauses = []
    for i, item in enumerate(items):
        where = f"{key}[{i}]"
        entry = as_mapping(item, where, report)
        if entry is None:
            continue
        check_fields(entry, [inner], report.scoped(where))
        body = entry.get(inner)
        if not body:
            report.error(f"{where}.{inner}", f"empty {inner} is not allowed")
            continue
        body = as_mapping(body, f"{where}.{inner}", report)
        if body is None:
            continue
        clause = _parse_fields(body, fields, action, namespace, report.scoped(f"{where}.{inner}"), f"{where}.{inner}")
        clauses.append(clause)
    return tuple(clauses)


def _parse_fields(
    body: Mapping[str, Any],
    fields: Mapping[str, str],
    action: Action | None,
    namespace: str,
    report: IssueCollector,
    label: str,
) -> tuple[FieldMatch, ...]:
    allowed = [name for field in fields for name in (field, "not" + field[0].upper() + field[1:])]
    check_fields(body, allowed, report)
    matches = []
    for field, attribute in fields.items():
        not_field = "not" + field[0].upper() + field[1:]
        values = _values(body, field, attribute, report)
        not_values = _values(body, not_field, attribute, report)
        if values is None and not_values is None:
            continue
        if action is Action.CUSTOM and attribute in CUSTOM_FORBIDDEN_ATTRIBUTES:
            report.error(field, f"{field}/{not_field} cannot be used in a CUSTOM policy (the provider runs before authentication)")
        matches.append(
            FieldMatch(attribute, (), _qualify(attribute, values or (), namespace),
                       _qualify(attribute, not_values or (), namespace), f"{label}.{field}")
        )
    has = {m.attribute for m in matches}
    if "source.serviceAccount" in has and has & {"source.principal", "source.namespace"}:
        report.error("serviceAccounts", "cannot be combined with principals or namespaces")
    return tuple(matches)


def _values(body: Mapping[str, Any], field: str, attribute: str, report: IssueCollector) -> tuple[str, ...] | None:
    if field not in body or body[field] is None:
        return None
    values = as_string_list(body[field], field, report)
    if values is None:
        return None
    kind = ATTRIBUTE_KINDS[attribute]
    for i, value in enumerate(values):
        if problem := value_problem(kind, value):
            report.error(f"{field}[{i}]", problem)
    if kind is ValueKind.SERVICE_ACCOUNT and len(values) > MAX_SERVICE_ACCOUNTS:
        report.error(field, f"at most {MAX_SERVICE_ACCOUNTS} service accounts are allowed, got {len(values)}")
    return values


def _qualify(attribute: str, values: tuple[str, ...], namespace: str) -> tuple[str, ...]:
    """The short ``serviceAccounts: [sa]`` form means the *policy's* namespace (SPEC 2)."""
    if attribute != "source.serviceAccount":
        return values
    return tuple(v if "/" in v else f"{namespace}/{v}" for v in values)


def _parse_condition(
    raw: Any, action: Action | None, namespace: str, report: IssueCollector, label: str
) -> FieldMatch | None:
    cond = as_mapping(raw, "", report)
    if cond is None:
        return None
    check_fields(cond, ["key", "values", "notValues"], report)
    key = as_string(cond.get("key"), "key", report, required=True)
    if key is None:
        return None
    parsed = when_key_attribute(key)
    if parsed is None:
        report.error("key", f"unknown attribute {key!r}")
        return None
    attribute, params = parsed
    if action is Action.CUSTOM and attribute in CUSTOM_FORBIDDEN_ATTRIBUTES:
        report.error("key", f"{key} cannot be used in a CUSTOM policy (the provider runs before authentication)")
    values = _values(cond, "values", attribute, report)
    not_values = _values(cond, "notValues", attribute, report)
    if not values and not not_values:
        report.error("", f"condition {key!r} needs values or notValues")
        return None
    return FieldMatch(attribute, params, _qualify(attribute, values or (), namespace),
                      _qualify(attribute, not_values or (), namespace), f"{label}[{key}]")
