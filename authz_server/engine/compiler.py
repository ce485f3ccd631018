"""Compile AuthorizationPolicies into request tests, once, at load time.

A rule is ``OR(from) AND OR(to) AND AND(when)``; a source/operation is the AND of its fields
(SPEC section 3). The compiled form keeps each field's label so ``explain`` can say which part
of a rule did not match, while the hot path only calls :attr:`CompiledRule.test` — on the rules
the rule index (:mod:`authz_server.engine.index`, keyed on :attr:`CompiledRule.options`) cannot
rule out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from authz_server.engine.attributes import CompileEnv, RequestTest, compile_field
from authz_server.engine.index import Option, rule_options
from authz_server.engine.request import RequestAttributes
from authz_server.policy.model import AuthorizationPolicy, FieldMatch, Rule

Labelled = tuple[tuple[str, RequestTest], ...]


@dataclass(frozen=True, slots=True)
class CompiledRule:
    index: int
    sources: tuple[Labelled, ...] | None
    operations: tuple[Labelled, ...] | None
    conditions: Labelled
    test: RequestTest
    #: necessary conditions the rule index can key on (empty: always tried)
    options: tuple[Option, ...] = ()

    def mismatches(self, req: RequestAttributes) -> list[str]:
        """Why this rule does not match ``req`` (empty when it does), for explain output."""
        why: list[str] = []
        for name, clauses in (("from", self.sources), ("to", self.operations)):
            if clauses is None or any(all(t(req) for _, t in c) for c in clauses):
                continue
            failed = [label for c in clauses for label, t in c if not t(req)]
            why.append(f"no {name} entry matched (failed: {', '.join(failed)})")
        why.extend(f"{label} not satisfied" for label, t in self.conditions if not t(req))
        return why


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    policy: AuthorizationPolicy
    rules: tuple[CompiledRule, ...]

    def first_match(self, req: RequestAttributes) -> int | None:
        """Index of the first matching rule; ``None`` (never matches) for a spec without rules."""
        for rule in self.rules:
            if rule.test(req):
                return rule.index
        return None


def compile_policy(policy: AuthorizationPolicy, env: CompileEnv) -> CompiledPolicy:
    rules = tuple(_compile_rule(i, rule, env) for i, rule in enumerate(policy.rules or ()))
    return CompiledPolicy(policy, rules)


def _labelled(fields: Sequence[FieldMatch], env: CompileEnv) -> Labelled:
    return tuple((f.label, compile_field(f, env)) for f in fields)


def _all(tests: Sequence[RequestTest]) -> RequestTest:
    tests = tuple(tests)
    if not tests:
        return lambda req: True
    if len(tests) == 1:
        return tests[0]
    return lambda req: all(t(req) for t in tests)


def _any(tests: Sequence[RequestTest]) -> RequestTest:
    tests = tuple(tests)
    if len(tests) == 1:
        return tests[0]
    return lambda req: any(t(req) for t in tests)


def _compile_rule(index: int, rule: Rule, env: CompileEnv) -> CompiledRule:
    sources = None if rule.sources is None else tuple(_labelled(s, env) for s in rule.sources)
    operations = None if rule.operations is None else tuple(_labelled(o, env) for o in rule.operations)
    conditions = _labelled(rule.conditions, env)
    parts: list[RequestTest] = []
    for clauses in (sources, operations):
        if clauses is not None:
            parts.append(_any([_all([t for _, t in c]) for c in clauses]))
    parts.extend(t for _, t in conditions)
    return CompiledRule(index, sources, operations, conditions, _all(parts), rule_options(rule, env))
