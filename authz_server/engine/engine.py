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
from authz_server.engine.scope import applies
from authz_server.policy.loader import PolicySet
from authz_server.jwt.authenticator import JwtAuthenticator
from authz_server.jwt.rules import JwtRule
from authz_server.policy.model import Action, RequestAuthentication

WORKLOAD_CACHE_SIZE = 4096


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

    def for_workload(self, workload: Workload, service: tuple[str, str] | None = None) -> WorkloadView:
        key = (workload.namespace, frozenset(workload.labels.items()), workload.kind, service)
        view = self._views.get(key)
        if view is None:
            view = self._select(workload, service)
            if len(self._views) >= WORKLOAD_CACHE_SIZE:
                self._views.clear()
            self._views[key] = view
        return view

    def _select(self, workload: Workload, service: tuple[str, str] | None) -> WorkloadView:
        root = self.mesh.root_namespace
        policies = [
            c for c in self._compiled
            if applies(c.policy.attachment, c.policy.namespace, workload, root, service)
        ]
        ras = tuple(
            ra for ra in self.policy_set.request_authentications
            if applies(ra.attachment, ra.namespace, workload, root, service)
        )
        # Istio merges the jwtRules of every applicable RequestAuthentication, sorted by issuer.
        rules = tuple(sorted((rule for ra in ras for rule in ra.jwt_rules), key=lambda r: r.issuer))
        authenticator = self.authenticator_factory(rules) if rules and self.authenticator_factory else None
        return WorkloadView(WorkloadPolicies.split(policies), ras, authenticator)
