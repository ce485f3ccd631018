"""The authorization decision for one request, over the policies of its workload (SPEC 1, 3, 9).

DENY before ALLOW; no enforced ALLOW policy means allow; ALLOW policies that all miss mean
deny. AUDIT and dry-run policies are evaluated for the record and never change the outcome.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from authz_server.engine.compiler import CompiledPolicy
from authz_server.engine.index import IndexedGroup, ScanGroup, rule_group
from authz_server.engine.request import RequestAttributes
from authz_server.policy.model import Action, AuthorizationPolicy

RBAC_DENIED_BODY = "RBAC: access denied"
RuleGroup = ScanGroup | IndexedGroup


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
    """The compiled policies that apply to one workload, split by how they act.

    Each engine is tried through a rule group (:mod:`authz_server.engine.index`): indexed when
    it is large, a plain scan when small or when ``indexed=False`` forces it (the reference the
    differential test compares the index against).
    """

    deny: tuple[CompiledPolicy, ...] = ()
    allow: tuple[CompiledPolicy, ...] = ()
    audit: tuple[CompiledPolicy, ...] = ()
    dry_deny: tuple[CompiledPolicy, ...] = ()
    dry_allow: tuple[CompiledPolicy, ...] = ()
    #: ``None``: index the groups large enough to gain from it; ``True``/``False`` force it
    indexed: bool | None = None
    _groups: tuple[RuleGroup, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        groups = tuple(rule_group(g, self.indexed) for g in (self.deny, self.allow, self.audit,
                                                              self.dry_deny, self.dry_allow))
        object.__setattr__(self, "_groups", groups)

    @classmethod
    def split(cls, policies: list[CompiledPolicy], indexed: bool | None = None) -> WorkloadPolicies:
        """Sort policies into engines; CUSTOM ones are Istio's routing, not ours to evaluate."""
        def pick(action: Action, dry: bool) -> tuple[CompiledPolicy, ...]:
            return tuple(p for p in policies if p.policy.action is action and p.policy.dry_run is dry)
        return cls(
            deny=pick(Action.DENY, False),
            allow=pick(Action.ALLOW, False),
            audit=pick(Action.AUDIT, False),  # a dry-run AUDIT has no effect either way
            dry_deny=pick(Action.DENY, True),
            dry_allow=pick(Action.ALLOW, True),
            indexed=indexed,
        )

    def decide(self, req: RequestAttributes) -> AuthzDecision:
        deny, allow, audit, dry_deny, dry_allow = self._groups
        dry_run = self._dry_run(req) if (self.dry_deny or self.dry_allow) else ()
        audited = tuple(p.policy.rule_id(rule) for p, rule in audit.every(req)) if self.audit else ()
        hit = deny.first(req) if self.deny else None
        if hit is not None:
            return AuthzDecision(False, "denied_by_policy", hit[0].policy, hit[1], dry_run, audited)
        if not self.allow:
            return AuthzDecision(True, "no_allow_policies", None, None, dry_run, audited)
        hit = allow.first(req)
        if hit is not None:
            return AuthzDecision(True, "allowed_by_policy", hit[0].policy, hit[1], dry_run, audited)
        return AuthzDecision(False, "no_allow_match", None, None, dry_run, audited)

    def _dry_run(self, req: RequestAttributes) -> tuple[DryRunResult, ...]:
        results = []
        for action, policies, group, on_match, on_miss in (
            (Action.DENY, self.dry_deny, self._groups[3], "denied", "allowed"),
            (Action.ALLOW, self.dry_allow, self._groups[4], "allowed", "denied"),
        ):
            if not policies:
                continue
            hit = group.first(req)
            if hit is None:
                results.append(DryRunResult(action, on_miss, "", ""))
            else:
                results.append(DryRunResult(action, on_match, hit[0].policy.rule_id(hit[1]), hit[0].policy.ref))
        return tuple(results)
