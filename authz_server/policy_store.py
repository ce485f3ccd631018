"""The current policy engine, swapped atomically on reload; a bad set never replaces a good one.

Readers call :meth:`PolicyStore.engine` and get one consistent, fully compiled engine: a
reload builds the new engine completely before a single reference assignment publishes it,
so in-flight Checks finish on the set they started with.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from authz_server.engine.engine import AuthenticatorFactory, MeshSettings, PolicyEngine
from authz_server.policy.issues import Issue
from authz_server.policy.loader import PolicySet, load_policies, parse_sources

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ReloadResult:
    ok: bool
    errors: tuple[Issue, ...]
    warnings: tuple[Issue, ...]


class PolicyStore:
    def __init__(
        self,
        path: str | Path,
        mesh: MeshSettings,
        authenticator_factory: AuthenticatorFactory | None = None,
        allow_empty: bool = False,
        fallback: tuple[tuple[str, str], ...] | None = None,
    ) -> None:
        self.path = str(path)
        #: serve a set without policies (it allows every request); otherwise such a set is
        #: rejected like any invalid one: not ready at start, the last good set kept on reload
        self.allow_empty = allow_empty
        self.mesh = mesh
        self.authenticator_factory = authenticator_factory
        self._engine: PolicyEngine | None = None
        self.generation = 0
        self.last_good_at: float | None = None
        self.last_attempt_at: float | None = None
        self.last_errors: tuple[Issue, ...] = ()
        #: the last good set's texts from the supervisor (``policy.handover``): served, once, if
        #: the path's set is invalid before any set of this store's own has loaded
        self._fallback = fallback

    @property
    def loaded(self) -> bool:
        return self._engine is not None

    def engine(self) -> PolicyEngine:
        if self._engine is None:
            raise LookupError(f"no valid policy set loaded from {self.path}")
        return self._engine

    @property
    def policy_set(self) -> PolicySet | None:
        return self._engine.policy_set if self._engine else None

    def reload(self) -> ReloadResult:
        """Load the path again; publish it only when it has no error at all."""
        self.last_attempt_at = time.time()
        policy_set = load_policies(self.path, self.allow_empty)
        for warning in policy_set.warnings:
            log.warning("policy: %s", warning)
        if not policy_set.ok:
            self.last_errors = policy_set.errors
            for error in policy_set.errors:
                log.error("policy: %s", error)
            fallback = self._take_fallback()
            if fallback is not None:
                kept = "serving the last good set the supervisor kept (as the other workers do) until it is fixed"
            else:
                kept = f"keeping generation {self.generation}" if self._engine else "no policy set loaded"
            log.error("policy set at %s rejected (%d errors); %s", self.path, len(policy_set.errors), kept)
            if fallback is not None:
                self._publish(fallback)
            return ReloadResult(False, policy_set.errors, policy_set.warnings)
        self._fallback = None
        self._publish(policy_set)
        self.last_errors = ()
        return ReloadResult(True, (), policy_set.warnings)

    def _take_fallback(self) -> PolicySet | None:
        fallback, self._fallback = self._fallback, None
        if fallback is None or self._engine is not None:
            return None
        policy_set = parse_sources(self.path, list(fallback), self.allow_empty)
        return policy_set if policy_set.ok else None

    def _publish(self, policy_set: PolicySet) -> None:
        """Compile ``policy_set`` and make it the one Checks are decided by."""
        if not (policy_set.authorization_policies or policy_set.request_authentications):
            log.warning("policy set at %s is empty: every request is allowed (--allow-empty-policies)", self.path)
        engine = PolicyEngine(policy_set, self.mesh, self.authenticator_factory)
        if self._engine is not None:
            engine.warm_like(self._engine)
        self._engine = engine
        self.generation += 1
        self.last_good_at = policy_set.loaded_at
        log.info(
            "policy set generation %d loaded from %s: %d AuthorizationPolicies, %d RequestAuthentications",
            self.generation, self.path, len(policy_set.authorization_policies), len(policy_set.request_authentications),
        )
