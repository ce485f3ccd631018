"""A request as tests and diffs describe it: ``explain``'s request format plus ``jwt``.

``jwt: {claims: {...}}`` asks for a token carrying those claims, signed by the run's test key
(:mod:`.signing_key`) and placed where the issuer's jwtRule looks for it (its first
``fromHeaders`` entry, else its first ``fromParams``, else ``fromCookies``, else
``Authorization: Bearer``); ``header:``/``param:``/``cookie:`` place it elsewhere, e.g. to test
that a token in the wrong place is ignored.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from envoy.service.auth.v3.external_auth_pb2 import CheckRequest

from authz_server.explain import RequestDescriptionError, check_request_from_description
from authz_server.jwt.rules import JwtRule
from authz_server.policy_tests.signing_key import SigningKey

JWT_FIELDS = ("claims", "header", "prefix", "param", "cookie")
LOCATION_FIELDS = ("header", "param", "cookie")


@dataclass(frozen=True)
class JwtSpec:
    claims: Mapping[str, Any]
    #: (kind, name, prefix) when the test places the token itself
    location: tuple[str, str, str] | None = None

    @property
    def issuer(self) -> str:
        return str(self.claims["iss"])


@dataclass(frozen=True)
class RequestSpec:
    #: the request in ``explain``'s format, already checked by its parser
    description: Mapping[str, Any]
    jwt: JwtSpec | None = None

    def check_request(self, key: SigningKey, rules: Sequence[JwtRule]) -> CheckRequest:
        """The CheckRequest Envoy would send; ``rules`` are the policy set's jwtRules.

        Raises :class:`RequestDescriptionError` when ``jwt`` names an issuer no rule has.
        """
        if self.jwt is None:
            return check_request_from_description(self.description)
        kind, name, prefix = self.jwt.location or _default_location(self.jwt.issuer, rules)
        token = key.sign(self.jwt.claims)
        description = copy.deepcopy(dict(self.description))
        headers = {str(k).lower(): v for k, v in (description.get("headers") or {}).items()}
        if kind == "header":
            headers[name.lower()] = prefix + token
        elif kind == "param":
            path = str(description.get("path", "/"))
            description["path"] = f"{path}{'&' if '?' in path else '?'}{name}={token}"
        else:
            cookie = headers.get("cookie")
            headers["cookie"] = f"{cookie}; {name}={token}" if cookie else f"{name}={token}"
        description["headers"] = headers
        return check_request_from_description(description)


def parse_request_spec(raw: Any) -> RequestSpec:
    """Validate a request description; the error message names the field at fault."""
    if not isinstance(raw, Mapping):
        raise RequestDescriptionError("must be an object")
    description = {k: v for k, v in raw.items() if k != "jwt"}
    check_request_from_description(description)  # every explain field problem, now
    jwt = _parse_jwt(raw["jwt"]) if raw.get("jwt") is not None else None
    return RequestSpec(description, jwt)


def _parse_jwt(raw: Any) -> JwtSpec:
    if not isinstance(raw, Mapping):
        raise RequestDescriptionError("jwt must be an object")
    unknown = set(raw) - set(JWT_FIELDS)
    if unknown:
        raise RequestDescriptionError(f"jwt: unknown fields {sorted(map(str, unknown))} "
                                      f"(expected {', '.join(JWT_FIELDS)})")
    claims = raw.get("claims")
    if not isinstance(claims, Mapping) or not all(isinstance(k, str) for k in claims):
        raise RequestDescriptionError("jwt.claims must be an object of claims")
    if not isinstance(claims.get("iss"), str) or not claims["iss"]:
        raise RequestDescriptionError("jwt.claims.iss must be the issuer (a non-empty string)")
    places = [k for k in LOCATION_FIELDS if raw.get(k) is not None]
    if len(places) > 1:
        raise RequestDescriptionError(f"jwt: give at most one of {', '.join(LOCATION_FIELDS)}")
    if raw.get("prefix") is not None and places != ["header"]:
        raise RequestDescriptionError("jwt.prefix goes with jwt.header")
    location = None
    if places:
        name, prefix = raw[places[0]], raw.get("prefix", "")
        if not isinstance(name, str) or not name or not isinstance(prefix, str):
            raise RequestDescriptionError(f"jwt.{places[0]} must be a non-empty string")
        location = (places[0], name, prefix)
    return JwtSpec(dict(claims), location)


def _default_location(issuer: str, rules: Sequence[JwtRule]) -> tuple[str, str, str]:
    """Where Envoy's jwt_authn looks first for this issuer's tokens."""
    for rule in rules:
        if rule.issuer != issuer:
            continue
        if rule.from_headers:
            name, prefix = rule.from_headers[0]
            return "header", name, prefix
        if rule.from_params:
            return "param", rule.from_params[0], ""
        if rule.from_cookies:
            return "cookie", rule.from_cookies[0], ""
        return "header", "authorization", "Bearer "
    issuers = sorted({r.issuer for r in rules if r.issuer})
    raise RequestDescriptionError(
        f"jwt.claims.iss {issuer!r}: no jwtRule in the policy set has this issuer"
        + (f" (issuers: {', '.join(issuers)})" if issuers else " (no RequestAuthentication)"))
