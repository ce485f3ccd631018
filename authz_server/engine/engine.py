"""A loaded policy set, compiled, answering "which policies apply to this workload".

Compilation happens once per policy set (at load or reload). Selecting and splitting the
policies for a workload happens once per distinct workload identity and is cached (bounded):
a sidecar-local server sees one identity, a shared server a handful.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Hashable

from authz_server.engine.attributes import CompileEnv
from authz_server.engine.compiler import CompiledPolicy, compile_policy
from authz_server.engine.decide import WorkloadPolicies
from authz_server.engine.request import Workload
from authz_server.engine.scope import applies, missing_identity
from authz_server.policy.loader import PolicySet
from authz_server.jwt.authenticator import JwtAuthenticator
from authz_server.jwt.rules import JwtRule
from authz_server.policy.model import Action, RequestAuthentication

WORKLOAD_CACHE_SIZE = 4096
#: workloads a new engine prepares before it serves (the most recent ones of the engine it replaces)
WARM_WORKLOADS = 64


@dataclass(frozen=True, slots=True)
class MeshSettings:
    root_namespace: str = "istio-system"
    trust_domain: str = "cluster.local"
    trust_domain_aliases: tuple[str, ...] = ()

    @property
    def compile_env(self) -> CompileEnv:
        return CompileEnv(trust_domains=(self.trust_domain, *self.trust_domain_aliases))


@dataclass(frozen=True, slots=True)
class WorkloadView:
    """Everything that applies to one workload: its authorization engines and its JWT checks."""

    policies: WorkloadPolicies
    request_authentications: tuple[RequestAuthentication, ...]
    #: ``None`` when no RequestAuthentication applies (tokens are then not looked at, as in Istio)
    authenticator: JwtAuthenticator | None
    #: enforced policies (and RequestAuthentications) that cannot be scoped because the workload's
    #: namespace or labels are unknown, as (what is missing, policy ref); requests are denied for them
    unscoped: tuple[tuple[str, str], ...] = ()

    @property
    def unknown_identity(self) -> str | None:
        """``unknown_workload_namespace`` / ``unknown_workload_labels`` when some policy cannot be
        scoped (the namespace first: without it even the candidate policies are unknown)."""
        missing = {what for what, _ in self.unscoped}
        for what in ("namespace", "labels"):
            if what in missing:
                return f"unknown_workload_{what}"
        return None


AuthenticatorFactory = Callable[[tuple[JwtRule, ...]], JwtAuthenticator]


@dataclass
class PolicyEngine:
    policy_set: PolicySet
    mesh: MeshSettings = field(default_factory=MeshSettings)
    #: builds the JWT authenticator of a workload from its merged jwtRules (shares the JWKS cache)
    authenticator_factory: AuthenticatorFactory | None = None

    def __post_init__(self) -> None:
        env = self.mesh.compile_env
        self._compiled: list[CompiledPolicy] = [
            compile_policy(p, env) for p in self.policy_set.authorization_policies if p.action is not Action.CUSTOM
        ]
        # A plain dict (cleared when full) rather than an LRU: a lookup per Check must be cheap,
        # and the number of distinct workload identities a server sees is small.
        self._views: dict[Hashable, WorkloadView] = {}
        # Workloads with the same policies share one split (and its rule index): memory and
        # build time follow the distinct policy sets, not the number of workload identities.
        self._splits: dict[tuple[int, ...], WorkloadPolicies] = {}

    def for_workload(self, workload: Workload, service: tuple[str, str] | None = None) -> WorkloadView:
        labels = None if workload.labels is None else frozenset(workload.labels.items())
        key = (workload.namespace, labels, workload.kind, service)
        view = self._views.get(key)
        if view is None:
            view = self._select(workload, service)
            if len(self._views) >= WORKLOAD_CACHE_SIZE:
                self._views.clear()
            self._views[key] = view
        return view

    def warm_like(self, previous: PolicyEngine, limit: int = WARM_WORKLOADS) -> None:
        """Prepare the views *previous* served most recently, so that after a reload (run off the
        event loop) no Check waits for its workload's policies to be selected and indexed."""
        for namespace, labels, kind, service in list(previous._views)[-limit:]:
            self.for_workload(Workload(namespace, None if labels is None else dict(labels), kind), service)

    def _select(self, workload: Workload, service: tuple[str, str] | None) -> WorkloadView:
        root = self.mesh.root_namespace
        selected = tuple(
            i for i, c in enumerate(self._compiled)
            if applies(c.policy.attachment, c.policy.namespace, workload, root, service)
        )
        split = self._splits.get(selected)
        if split is None:
            if len(self._splits) >= WORKLOAD_CACHE_SIZE:
                self._splits.clear()
            split = self._splits[selected] = WorkloadPolicies.split([self._compiled[i] for i in selected])
        ras = tuple(
            ra for ra in self.policy_set.request_authentications
            if applies(ra.attachment, ra.namespace, workload, root, service)
        )
        # Istio merges the jwtRules of every applicable RequestAuthentication, sorted by issuer.
        rules = tuple(sorted((rule for ra in ras for rule in ra.jwt_rules), key=lambda r: r.issuer))
        authenticator = self.authenticator_factory(rules) if rules and self.authenticator_factory else None
        return WorkloadView(split, ras, authenticator, self._unscoped(workload))

    def _unscoped(self, workload: Workload) -> tuple[tuple[str, str], ...]:
        """Enforced policies and RequestAuthentications whose scope the workload cannot decide.

        Dry-run policies are left out: they never change a decision, so an unknown identity is
        no reason to deny for them (they are simply not evaluated for such a workload).
        """
        if workload.namespace is not None and workload.labels is not None:
            return ()
        root = self.mesh.root_namespace
        attached = [(c.policy.attachment, c.policy.namespace, c.policy.ref)
                    for c in self._compiled if not c.policy.dry_run]
        attached += [(ra.attachment, ra.namespace, ra.ref) for ra in self.policy_set.request_authentications]
        found = ((missing_identity(attachment, namespace, workload, root), ref)
                 for attachment, namespace, ref in attached)
        return tuple((missing, ref) for missing, ref in found if missing is not None)
