"""Decide described requests offline through the App a server builds.

:class:`OfflineDecider` is ``explain``'s path — App, CheckRequest adapter, Authorizer, JWT layer,
engine — with one difference: no JWKS is ever fetched. Every jwtRule's keys are replaced, for
the run only, by the run's test key plus the keys the test file lists for that issuer and the
rule's own inline ``jwks``; tokens are then verified for real against those.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

from envoy.service.auth.v3.external_auth_pb2 import CheckRequest

from authz_server.app import App
from authz_server.explain import Explanation, explain
from authz_server.jwt.jwks import parse_jwks
from authz_server.jwt.rules import JwtRule
from authz_server.policy.loader import PolicySet
from authz_server.policy_store import ReloadResult
from authz_server.policy_tests.requests import RequestSpec
from authz_server.policy_tests.signing_key import SigningKey
from authz_server.settings import OPTIONS, Option

#: the options an offline decision depends on: those of ``explain``
DECISION_OPTIONS: tuple[Option, ...] = tuple(o for o in OPTIONS if "explain" in o.commands)
#: what a test file's ``settings`` may set, by flag name without dashes (``workload-kind``)
FILE_SETTINGS: dict[str, Option] = {
    o.flag[2:]: o for o in DECISION_OPTIONS if o.dest not in ("policies", "log_level")
}

Settings = tuple[tuple[str, Any], ...]
#: public JWKS keys per issuer (a test file's ``jwks``)
IssuerKeys = Mapping[str, tuple[Mapping[str, Any], ...]]


def default_args(**values: Any) -> argparse.Namespace:
    """The settings ``explain`` would have with no flags and no environment, then ``values``."""
    args = argparse.Namespace(**{o.dest: o.parse(o.default) for o in DECISION_OPTIONS})
    args.decision_log = "off"
    vars(args).update(values)
    return args


class OfflineDecider:
    """One policy set with one group of settings, deciding requests offline."""

    def __init__(self, args: argparse.Namespace, key: SigningKey, issuer_keys: IssuerKeys | None = None) -> None:
        self.key = key
        self.issuer_keys = issuer_keys or {}
        self.app = App(args)
        server_factory = self.app.store.authenticator_factory
        assert server_factory is not None
        self.app.store.authenticator_factory = lambda rules: server_factory(tuple(map(self._offline, rules)))
        self.load: ReloadResult = self.app.reload()

    @property
    def policy_set(self) -> PolicySet | None:
        return self.app.store.policy_set

    def jwt_rules(self) -> list[JwtRule]:
        return self.app.jwt_rules()

    async def decide(self, request: RequestSpec) -> Explanation:
        """The verdict and explanation; raises RequestDescriptionError for an unusable ``jwt``."""
        return await self.decide_check_request(request.check_request(self.key, self.jwt_rules()))

    async def decide_check_request(self, check_request: CheckRequest) -> Explanation:
        return await explain(check_request, self.app.store.engine(), self.app.authorizer, self.app.context)

    def _offline(self, rule: JwtRule) -> JwtRule:
        keys: list[Mapping[str, Any]] = [self.key.public_jwk, *self.issuer_keys.get(rule.issuer, ())]
        if rule.jwks_text:
            keys.extend(json.loads(rule.jwks_text).get("keys", []))
        text = json.dumps({"keys": keys})
        return dataclasses.replace(rule, jwks_uri="", jwks_text=text, jwks=parse_jwks(text))


class DeciderPool:
    """One :class:`OfflineDecider` per (policy path, settings, test keys): each set loads once."""

    def __init__(self, base: argparse.Namespace) -> None:
        self.base = base
        self.key = SigningKey()
        self._deciders: dict[str, OfflineDecider] = {}

    def get(self, policies: Path | str, settings: Settings = (), issuer_keys: IssuerKeys | None = None) -> OfflineDecider:
        cache_key = json.dumps([str(Path(policies).resolve()), settings, issuer_keys or {}], sort_keys=True, default=str)
        decider = self._deciders.get(cache_key)
        if decider is None:
            args = argparse.Namespace(**vars(self.base))
            vars(args).update(dict(settings), policies=str(policies), decision_log="off")
            decider = self._deciders[cache_key] = OfflineDecider(args, self.key, issuer_keys)
        return decider
