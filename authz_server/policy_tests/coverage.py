"""Which policy rules, and which ``from``/``to``/``when`` entries, no test exercised.

An item is *exercised* when a test's request satisfied it while its policy applied to the
test's workload, whatever the order of evaluation: a rule when all of it matched, a
``from``/``to`` entry when all its fields matched, a ``when`` entry when its condition held.
Only requests that reached authorization count (a JWT rejection or an unknown workload decides
before any rule is looked at). A jwtRule is exercised when a test presented a token to it.
"""

from __future__ import annotations

from dataclasses import dataclass

from authz_server.authorizer import Verdict
from authz_server.engine.compiler import CompiledPolicy, Labelled
from authz_server.engine.engine import PolicyEngine
from authz_server.engine.request import RequestAttributes
from authz_server.explain import workload_view
from authz_server.policy.loader import PolicySet
from authz_server.policy.model import Action, AuthorizationPolicy, FieldMatch

#: reasons of verdicts that authorization (RBAC) decided
AUTHORIZATION_REASONS = frozenset({"allowed_by_policy", "no_allow_policies", "denied_by_policy", "no_allow_match"})

Key = tuple[str, str, int, str]


@dataclass(frozen=True)
class Item:
    key: Key
    #: what a reviewer reads: ``foo/allow-x (file#2) rule[1] from[0] (source.principals)``
    text: str
    kind: str  # "policy", "rule", "entry" or "jwtRule"


class Coverage:
    def __init__(self) -> None:
        self._items: dict[Key, Item] = {}
        self._hit: set[Key] = set()

    def add_policy_set(self, policy_set: PolicySet) -> None:
        """Register every item of a loaded set (sets shared by several test files count once)."""
        for policy in policy_set.authorization_policies:
            if policy.action is Action.CUSTOM:
                continue  # Istio's routing to this server; never evaluated here
            self._add(_key(policy), f"{_name(policy)}: applied to no tested workload", "policy")
            for index, rule in enumerate(policy.rules or ()):
                self._add(_key(policy, index), f"{_name(policy)} rule[{index}]", "rule")
                for part, clauses in (("from", rule.sources), ("to", rule.operations)):
                    for i, clause in enumerate(clauses or ()):
                        self._add(_key(policy, index, f"{part}[{i}]"),
                                  f"{_name(policy)} rule[{index}] {part}[{i}] ({_fields(clause)})", "entry")
                for i, condition in enumerate(rule.conditions):
                    self._add(_key(policy, index, f"when[{i}]"),
                              f"{_name(policy)} rule[{index}] when[{i}] ({_fields((condition,))})", "entry")
        for ra in policy_set.request_authentications:
            for index, rule in enumerate(ra.jwt_rules):
                self._add((str(ra.origin), ra.ref, index, "jwtRules"),
                          f"RequestAuthentication {ra.ref} ({ra.origin}) jwtRules[{index}] (issuer {rule.issuer}): "
                          "no test presented a token", "jwtRule")

    def record(self, engine: PolicyEngine, attrs: RequestAttributes, verdict: Verdict) -> None:
        """Mark what one decided request exercised (``attrs`` as authorization saw them)."""
        view = workload_view(attrs, engine)
        if view is None:
            return
        if verdict.jwt_result and verdict.jwt_result != "no_token":
            for ra in view.request_authentications:
                for index, rule in enumerate(ra.jwt_rules):
                    if rule.issuer == verdict.jwt_issuer:
                        self._hit.add((str(ra.origin), ra.ref, index, "jwtRules"))
        if verdict.reason not in AUTHORIZATION_REASONS:
            return
        policies = view.policies
        for group in (policies.deny, policies.allow, policies.audit, policies.dry_deny, policies.dry_allow):
            for compiled in group:
                self._record_policy(compiled, attrs)

    def _record_policy(self, compiled: CompiledPolicy, attrs: RequestAttributes) -> None:
        policy = compiled.policy
        self._hit.add(_key(policy))
        for rule in compiled.rules:
            if rule.test(attrs):
                self._hit.add(_key(policy, rule.index))
            for part, clauses in (("from", rule.sources), ("to", rule.operations)):
                for i, clause in enumerate(clauses or ()):
                    if _holds(clause, attrs):
                        self._hit.add(_key(policy, rule.index, f"{part}[{i}]"))
            for i, (_, test) in enumerate(rule.conditions):
                if test(attrs):
                    self._hit.add(_key(policy, rule.index, f"when[{i}]"))

    def missed(self) -> list[Item]:
        """Items no test exercised; a policy that applied nowhere stands for all its rules."""
        unapplied = {item.key[:2] for key, item in self._items.items() if item.kind == "policy" and key not in self._hit}
        return [item for key, item in self._items.items()
                if key not in self._hit and (item.kind in ("policy", "jwtRule") or key[:2] not in unapplied)]

    def summary(self) -> str:
        def count(kinds: tuple[str, ...]) -> tuple[int, int]:
            keys = [k for k, item in self._items.items() if item.kind in kinds]
            return sum(1 for k in keys if k in self._hit), len(keys)
        rules, entries, jwt = count(("rule",)), count(("entry",)), count(("jwtRule",))
        return (f"coverage: {rules[0]} of {rules[1]} rules, {entries[0]} of {entries[1]} from/to/when entries, "
                f"{jwt[0]} of {jwt[1]} jwtRules exercised")

    def _add(self, key: Key, text: str, kind: str) -> None:
        self._items.setdefault(key, Item(key, text, kind))


def _key(policy: AuthorizationPolicy, rule: int = -1, part: str = "") -> Key:
    return (str(policy.origin), policy.ref, rule, part)


def _name(policy: AuthorizationPolicy) -> str:
    dry = " dry-run" if policy.dry_run else ""
    return f"{policy.action.value}{dry} {policy.ref} ({policy.origin})"


def _fields(fields: tuple[FieldMatch, ...]) -> str:
    """``from[0].source.principals`` -> ``source.principals``; ``when[0][key]`` -> ``key``."""
    names = []
    for f in fields:
        label = f.label
        if label.startswith("when["):
            names.append(label.split("][", 1)[1][:-1] if "][" in label else label)
        else:
            names.append(label.split(".", 1)[1] if "." in label else label)
    return ", ".join(names) or "no fields"


def _holds(clause: Labelled, attrs: RequestAttributes) -> bool:
    return all(test(attrs) for _, test in clause)
