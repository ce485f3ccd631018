"""The whole decision for one request: authentication (JWT) then authorization, as Istio orders it.

Istio's chain after the CUSTOM hop is jwt_authn -> RBAC AUDIT/DENY/ALLOW (SPEC 1). This module
runs the same chain over the policies of the request's workload and returns a
:class:`Verdict` that the gRPC adapter turns into a CheckResponse and ``explain`` into text.
It never raises for a request: internal failures become a fail-closed (or, when configured,
fail-open) verdict with the reason logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from authz_server.engine.decide import RBAC_DENIED_BODY, AuthzDecision, DryRunResult
from authz_server.engine.engine import PolicyEngine
from authz_server.engine.request import RequestAttributes
from authz_server.engine.scope import destination_service
from authz_server.jwt.authenticator import AuthnResult, raw_query_names

log = logging.getLogger(__name__)

Headers = tuple[tuple[str, str], ...]


@dataclass(slots=True)
class Verdict:
    """What to answer Envoy, and why.

    Treated as immutable (response caches key on its fields) but not ``frozen``: a frozen
    dataclass pays ``object.__setattr__`` per field on construction, once per Check.
    """

    allowed: bool
    http_status: int
    body: str
    #: machine-readable reason (allowed_by_policy, no_allow_match, jwt_expired, ...)
    reason: str
    #: one human sentence
    detail: str
    policy: str = ""
    rule: int | None = None
    #: headers for the client on deny (www-authenticate, the policy header)
    deny_headers: Headers = ()
    #: headers to set on / remove from the upstream request on allow
    upstream_headers: Headers = ()
    #: headers added to the client's response on allow (the dry-run header)
    response_headers: Headers = ()
    remove_headers: tuple[str, ...] = ()
    #: query parameters removed from the upstream request on allow (a consumed JWT), as the
    #: request spells them
    remove_query_params: tuple[str, ...] = ()
    dry_run: tuple[DryRunResult, ...] = ()
    audited: tuple[str, ...] = ()
    request_principal: str = ""
    #: JWT outcome when a RequestAuthentication applied: its reason (ok, no_token, expired, ...),
    #: the issuer it concerned and a short digest of the token (never the token)
    jwt_result: str = ""
    jwt_issuer: str = ""
    token_id: str = ""


@dataclass(frozen=True, slots=True)
class VerdictSettings:
    #: header naming the denying policy on a deny ("" disables it)
    policy_header: str = "x-ext-authz-policy"
    #: static headers added to every allowed request upstream
    ok_headers: Headers = ()
    #: allow when the server itself fails (never for a policy deny)
    fail_open: bool = False
    #: response header carrying dry-run results to the client ("" = none)
    dry_run_header: str = ""


class Authorizer:
    """Runs authn + authz against whatever policy engine is current (hot reload swaps it)."""

    def __init__(self, current_engine: Callable[[], PolicyEngine], settings: VerdictSettings | None = None) -> None:
        self._current_engine = current_engine
        self.settings = settings or VerdictSettings()

    async def check(self, req: RequestAttributes) -> Verdict:
        try:
            return await self._check(req)
        except LookupError as exc:  # no policy set loaded yet
            return self.failure("no_policy_set", str(exc))
        except Exception:  # a bug must not become an open door or a gRPC error
            log.exception("internal error while deciding %s %s", req.method, req.path)
            return self.failure("internal_error", "internal error while deciding")

    def failure(self, reason: str, detail: str, header: str = "error") -> Verdict:
        """Fail closed (403) unless fail-open is configured; *header* is the policy header's value."""
        if self.settings.fail_open:
            return Verdict(True, 200, "", reason, f"{detail} (fail-open)", upstream_headers=self.settings.ok_headers)
        return Verdict(False, 403, RBAC_DENIED_BODY, reason, detail, deny_headers=self._policy_header(header))

    async def _check(self, req: RequestAttributes) -> Verdict:
        workload = req.workload
        service = None
        if workload.kind == "waypoint" and workload.namespace is not None:
            service = destination_service(req.host, workload.namespace)
        engine = self._current_engine()
        view = engine.for_workload(workload, service)
        unknown = view.unknown_identity
        if unknown is not None:
            return self.failure(unknown, _unknown_identity_detail(view.unscoped), header=unknown)
        authn: AuthnResult | None = None
        if view.authenticator is not None:
            authn = await view.authenticator.authenticate(req)
            if authn.outcome == "denied":
                headers = self._policy_header(f"jwt:{authn.reason}")
                if authn.www_authenticate:
                    headers = (("www-authenticate", authn.www_authenticate), *headers)
                return Verdict(
                    False, authn.http_status, authn.body, f"jwt_{authn.reason}",
                    f"JWT rejected ({authn.reason}): {authn.body}", deny_headers=headers,
                    jwt_result=authn.reason, jwt_issuer=authn.issuer, token_id=authn.token_id,
                )
            if authn.auth is not None:
                req.auth = authn.auth
            if authn.headers_to_remove or authn.headers_to_set:
                _apply_header_changes(req, authn)
        return self._authorize(view.policies.decide(req), authn, req)

    def _authorize(self, decision: AuthzDecision, authn: AuthnResult | None, req: RequestAttributes) -> Verdict:
        policy = decision.policy.ref if decision.policy else ""
        auth = req.auth
        allowed = decision.allowed
        dry_run = self._dry_run_header(decision)
        return Verdict(
            allowed,
            200 if allowed else 403,
            "" if allowed else RBAC_DENIED_BODY,
            decision.reason,
            decision.detail,
            policy,
            decision.rule,
            deny_headers=() if allowed else (*self._policy_header(policy or "no-allow-match"), *dry_run),
            response_headers=dry_run if allowed else (),
            upstream_headers=((*authn.headers_to_set, *self.settings.ok_headers) if authn and allowed
                              else self.settings.ok_headers if allowed else ()),
            remove_headers=authn.headers_to_remove if authn and allowed else (),
            remove_query_params=(raw_query_names(req.raw_path, authn.query_params_to_remove)
                                 if authn and allowed and authn.query_params_to_remove else ()),
            dry_run=decision.dry_run,
            audited=decision.audited,
            request_principal=f"{auth.issuer}/{auth.subject}" if auth and auth.subject is not None else "",
            jwt_result=authn.reason if authn else "",
            jwt_issuer=authn.issuer if authn else "",
            token_id=authn.token_id if authn else "",
        )

    def _dry_run_header(self, decision: AuthzDecision) -> Headers:
        """``deny=denied:ns[foo]-policy[x]-rule[0]; allow=denied`` — what dry-run engines said."""
        if not self.settings.dry_run_header or not decision.dry_run:
            return ()
        value = "; ".join(
            f"{d.action.value.lower()}={d.engine_result}" + (f":{d.effective_policy_id}" if d.effective_policy_id else "")
            for d in decision.dry_run
        )
        return ((self.settings.dry_run_header, value),)

    def _policy_header(self, value: str) -> Headers:
        name = self.settings.policy_header
        return ((name, value),) if name else ()


def _unknown_identity_detail(unscoped: tuple[tuple[str, str], ...]) -> str:
    """``workload labels unknown, needed to scope foo/a, foo/b (+3 more)`` — what to fix."""
    missing = "namespace" if any(what == "namespace" for what, _ in unscoped) else "labels"
    refs = [ref for what, ref in unscoped if what == missing]
    shown = ", ".join(refs[:3]) + (f" (+{len(refs) - 3} more)" if len(refs) > 3 else "")
    return (f"workload {missing} unknown (the proxy sent none and none is configured), "
            f"needed to scope {shown}")


def _apply_header_changes(req: RequestAttributes, authn: AuthnResult) -> None:
    """Show authorization the headers jwt_authn leaves: client copies of output headers and a
    consumed token removed, claim/payload headers added (SPEC 7; a spoofed claim header must
    not satisfy a ``request.headers`` rule)."""
    removed = set(authn.headers_to_remove)
    added = dict(authn.headers_to_set)
    headers = {k: v for k, v in req.headers.items() if k not in removed}
    headers.update(added)
    req.headers = headers
    if req.header_values is not None:
        values = {k: v for k, v in req.header_values.items() if k not in removed}
        values.update({k: (v,) for k, v in added.items()})
        req.header_values = values
