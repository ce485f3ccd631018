"""The authorization decision for one request, over the policies of its workload (SPEC 1, 3, 9).

DENY before ALLOW; no enforced ALLOW policy means allow; ALLOW policies that all miss mean
deny. AUDIT and dry-run policies are evaluated for the record and never change the outcome.
"""

from __future__ import annotations

from dataclasses import dataclass

from authz_server.engine.compiler import CompiledPolicy
from authz_server.engine.request import RequestAttributes
from authz_server.policy.model import Action, AuthorizationPolicy

RBAC_DENIED_BODY = "RBAC: access denied"


@dataclass(frozen=True, slots=True)
class DryRunResult:
    """What a dry-run engine would have decided, in Istio's shadow-metadata terms.

    ``engine_result`` is ``allowed``/``denied``; ``effective_policy_id`` is the Istio rule id
    (``ns[foo]-policy[x]-rule[0]``) that matched, empty when none did.
    """

    action: Action
    engine_result: str
    effective_policy_id: str
    policy: str


@dataclass(slots=True)
class AuthzDecision:  # built once per Check: not frozen, to skip frozen-dataclass setattr costs
    allowed: bool
    #: machine-readable: allowed_by_policy, no_allow_policies, denied_by_policy, no_allow_match
    reason: str
    policy: AuthorizationPolicy | None = None
    rule: int | None = None
    dry_run: tuple[DryRunResult, ...] = ()
    audited: tuple[str, ...] = ()

    @property
    def detail(self) -> str:
        """One human sentence saying why."""
        if self.policy is not None:
            verb = "allowed" if self.allowed else "denied"
            return f"{verb} by {self.policy.action.value} policy {self.policy.ref} rule[{self.rule}]"
        if self.reason == "no_allow_policies":
            return "allowed: no enforced ALLOW policy applies to this workload"
        return "denied: ALLOW policies apply to this workload and none matched"


@dataclass(frozen=True, slots=True)
class WorkloadPolicies:
    """The compiled policies that apply to one workload, split by how they act."""

    deny: tuple[CompiledPolicy, ...] = ()
    allow: tuple[CompiledPolicy, ...] = ()
    audit: tuple[CompiledPolicy, ...] = ()
    dry_deny: tuple[CompiledPolicy, ...] = ()
    dry_allow: tuple[CompiledPolicy, ...] = ()

    @classmethod
    def split(cls, policies: list[CompiledPolicy]) -> WorkloadPolicies:
        """Sort policies into engines; CUSTOM ones are Istio's routing, not ours to evaluate."""
        def pick(action: Action, dry: bool) -> tuple[CompiledPolicy, ...]:
            return tuple(p for p in policies if p.policy.action is action and p.policy.dry_run is dry)
        return cls(
            deny=pick(Action.DENY, False),
            allow=pick(Action.ALLOW, False),
            audit=pick(Action.AUDIT, False),  # a dry-run AUDIT has no effect either way
            dry_deny=pick(Action.DENY, True),
            dry_allow=pick(Action.ALLOW, True),
        )

    def decide(self, req: RequestAttributes) -> AuthzDecision:
        dry_run = self._dry_run(req) if (self.dry_deny or self.dry_allow) else ()
        audited = self._audited(req) if self.audit else ()
        for policy in self.deny:
            rule = policy.first_match(req)
            if rule is not None:
                return AuthzDecision(False, "denied_by_policy", policy.policy, rule, dry_run, audited)
        if not self.allow:
            return AuthzDecision(True, "no_allow_policies", None, None, dry_run, audited)
        for policy in self.allow:
            rule = policy.first_match(req)
            if rule is not None:
                return AuthzDecision(True, "allowed_by_policy", policy.policy, rule, dry_run, audited)
        return AuthzDecision(False, "no_allow_match", None, None, dry_run, audited)

    def _dry_run(self, req: RequestAttributes) -> tuple[DryRunResult, ...]:
        results = []
        for action, engine, on_match, on_miss in (
            (Action.DENY, self.dry_deny, "denied", "allowed"),
            (Action.ALLOW, self.dry_allow, "allowed", "denied"),
        ):
            if not engine:
                continue
            result = DryRunResult(action, on_miss, "", "")
            for policy in engine:
                rule = policy.first_match(req)
                if rule is not None:
                    result = DryRunResult(action, on_match, policy.policy.rule_id(rule), policy.policy.ref)
                    break
            results.append(result)
        return tuple(results)

    def _audited(self, req: RequestAttributes) -> tuple[str, ...]:
        ids = []
        for policy in self.audit:
            rule = policy.first_match(req)
            if rule is not None:
                ids.append(policy.policy.rule_id(rule))
        return tuple(ids)
