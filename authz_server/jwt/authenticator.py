"""The jwt_authn filter of one workload: token extraction, Istio's requirement, the outcome.

Istio turns all ``jwtRules`` that apply to a workload (sorted by issuer) into Envoy providers
and the requirement ``requires_any{p1..pn, requires_all{any{pi, allow_missing}...}}`` with
CORS preflight bypass (SPEC 7). Its observable behaviour, reproduced here:

* no token in any configured location → pass, no principal (authorization decides);
* a provider whose locations hold tokens that all verify → success with that token's payload;
* otherwise → 401 with jwt_verify_lib's status (403 for a disallowed audience), preferring a
  real verification error over "issuer not configured" as Envoy's AnyVerifier does.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal
from urllib.parse import unquote

from authz_server.engine.request import RequestAttributes, RequestAuth, strip_query
from authz_server.jwt.jwks import JwksCache
from authz_server.jwt.rules import JwtRule
from authz_server.jwt.verify import (
    ParsedJwt,
    Status,
    TokenVerifier,
    audiences_allowed,
    check_time,
    normalize_audience,
    reason_for,
)

log = logging.getLogger(__name__)

Outcome = Literal["none", "ok", "denied"]
#: Envoy's extractJWT: after the prefix, skip to the first of these and take the rest of the value.
_TOKEN_START = re.compile(r"[A-Za-z0-9_.-]")
#: protobuf's JSON printer (what Envoy base64-encodes for list/object claims) escapes these.
_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_UINT64_LIMIT = 2.0**64
#: Claims Envoy always splits on spaces in the metadata payload.
_SPACE_DELIMITED = ("scope", "permission")
#: kid of the public-only stand-in JWKS istiod pushes when a fetch fails (SPEC 7.1).
_ISTIOD_FALLBACK_KID = "abc"


@dataclass(frozen=True, slots=True)
class AuthnSettings:
    #: What a token gets when its issuer's JWKS never could be fetched: ``istiod`` reproduces
    #: istiod's reject-all stand-in key (kid ``abc``), ``envoy`` Envoy's remote_jwks failure.
    jwks_unavailable: Literal["istiod", "envoy"] = "istiod"


@dataclass(frozen=True, slots=True)
class AuthnResult:
    """What jwt_authn decided, and what it changes in the upstream request."""

    outcome: Outcome
    auth: RequestAuth | None = None
    http_status: int = 0
    body: str = ""
    www_authenticate: str | None = None
    headers_to_set: tuple[tuple[str, str], ...] = ()
    headers_to_remove: tuple[str, ...] = ()
    #: query parameters (decoded names) jwt_authn strips upstream: the consumed token's
    query_params_to_remove: tuple[str, ...] = ()
    reason: str = "no_token"
    kid: str = ""
    issuer: str = ""
    #: First hex digits of the token's SHA-256, for correlating logs without the token.
    token_id: str = ""


@dataclass(frozen=True, slots=True)
class _Location:
    kind: Literal["header", "param", "cookie"]
    name: str
    prefix: str
    #: Indexes of the providers that configured this location.
    providers: frozenset[int]


@dataclass(frozen=True, slots=True)
class _Provider:
    rule: JwtRule
    audiences: frozenset[str]
    space_delimited: tuple[str, ...]


@dataclass(slots=True)
class _Attempt:
    """One provider's verdict on the tokens found in its locations."""

    status: str | None = Status.MISSING
    jwt: ParsedJwt | None = None
    digest: bytes = b""
    #: Overrides the reason derived from ``status`` (e.g. istiod's stand-in key answered).
    reason: str = ""
    token_headers: list[str] = field(default_factory=list)
    token_params: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _Verified:
    """A remembered success and what it stays valid on."""

    result: AuthnResult
    jwt: ParsedJwt
    rule: JwtRule
    fingerprint: str


class JwtAuthenticator:
    """Authenticates requests for one workload; build one per distinct set of rules."""

    def __init__(
        self,
        rules: Iterable[JwtRule],
        jwks: JwksCache,
        verifier: TokenVerifier,
        settings: AuthnSettings | None = None,
    ):
        self.rules = tuple(sorted(rules, key=lambda r: r.issuer))
        self._jwks = jwks
        self._verifier = verifier
        self._settings = settings or AuthnSettings()
        self._providers = tuple(
            _Provider(
                rule,
                frozenset(normalize_audience(a) for a in rule.audiences),
                _SPACE_DELIMITED + tuple(c for c in rule.space_delimited_claims if c not in _SPACE_DELIMITED),
            )
            for rule in self.rules
        )
        self._locations = _locations(self.rules)
        self._sanitize = tuple(dict.fromkeys(h for r in self.rules for h in r.output_header_names))
        # A token that verified gives the same result every time (claims, headers): remember it
        # by (location, token) — the location object carries its kind, name, prefix and the
        # providers that configured it, everything the result depends on besides the token —
        # with what its validity still depends on (time, and the key that verified it still being
        # published) re-checked on every hit. Bounded like the verifier's cache; only
        # single-token requests are remembered.
        self._verified: dict[tuple[_Location, str], _Verified] = {}

    async def authenticate(self, request: RequestAttributes) -> AuthnResult:
        """Never raises: any unexpected failure is a 401, logged without the token."""
        try:
            return await self._authenticate(request)
        except Exception:  # noqa: BLE001 - the request path must answer, whatever the input
            log.exception("jwt authentication failed unexpectedly")
            return self._denied(request, Status.VERIFICATION_FAIL, None, b"", "internal_error")

    async def _authenticate(self, request: RequestAttributes) -> AuthnResult:
        if not self._providers or _is_cors_preflight(request):
            return AuthnResult("none", headers_to_remove=self._sanitize)
        found = self._extract(request)
        if not found:
            return AuthnResult("none", headers_to_remove=self._sanitize)
        key = found[0] if len(found) == 1 else None
        if key is not None and (hit := self._verified.get(key)) is not None and self._still_valid(hit):
            self._verifier.record_hit()
            return hit.result
        attempts = [await self._attempt(i, found) for i in range(len(self._providers))]
        for index, attempt in enumerate(attempts):
            if attempt.status is None and attempt.jwt is not None:
                result = self._success(self._providers[index], attempt)
                if key is not None:
                    self._remember(key, result, attempt, self._providers[index].rule)
                return result
        failed = [a for a in attempts if a.status not in (Status.MISSING, Status.UNKNOWN_ISSUER)]
        failed = failed or [a for a in attempts if a.status == Status.UNKNOWN_ISSUER]
        worst = failed[0]
        return self._denied(request, worst.status or Status.VERIFICATION_FAIL, worst.jwt, worst.digest, worst.reason)

    def _still_valid(self, hit: _Verified) -> bool:
        if check_time(hit.jwt, self._verifier.clock(), self._verifier.settings.leeway) is not None:
            return False
        keys = self._jwks.current_keys(hit.rule)
        return keys is not None and hit.fingerprint in keys.fingerprints

    def _remember(self, key: tuple[_Location, str], result: AuthnResult, attempt: _Attempt, rule: JwtRule) -> None:
        assert attempt.jwt is not None
        fingerprint = self._verifier.verified_by(attempt.digest)
        if not fingerprint:
            return
        if len(self._verified) >= self._verifier.settings.cache_entries:
            self._verified.clear()
        self._verified[key] = _Verified(result, attempt.jwt, rule, fingerprint)

    def _extract(self, request: RequestAttributes) -> list[tuple[_Location, str]]:
        """Tokens per location, in Envoy's order: headers (one per header value), query
        parameters, cookies."""
        params: dict[str, str] | None = None
        cookies: dict[str, str] | None = None
        found: list[tuple[_Location, str]] = []
        for location in self._locations:
            if location.kind == "header":
                for value in _header_values(request, location.name):
                    token = _from_header(value, location.prefix)
                    if token is not None:
                        found.append((location, token))
                continue
            if location.kind == "param":
                params = _query_params(request.raw_path) if params is None else params
                token = params.get(location.name)
            else:
                cookies = _cookies(_header_values(request, "cookie")) if cookies is None else cookies
                token = cookies.get(location.name)
            if token is not None:
                found.append((location, token))
        return found

    async def _attempt(self, index: int, found: list[tuple[_Location, str]]) -> _Attempt:
        """All tokens in this provider's locations must verify (Envoy checks every one)."""
        attempt = _Attempt()
        seen: set[str] = set()
        for location, token in found:
            if index not in location.providers:
                continue
            if location.kind == "header" and location.name not in attempt.token_headers:
                attempt.token_headers.append(location.name)
            elif location.kind == "param" and location.name not in attempt.token_params:
                attempt.token_params.append(location.name)
            if token in seen:
                continue
            seen.add(token)
            status, jwt, digest, reason = await self._verify(self._providers[index], token)
            if attempt.jwt is None or status is not None:
                attempt.jwt, attempt.digest, attempt.reason = jwt, digest, reason
            attempt.status = status
            if status is not None:
                return attempt
        return attempt

    async def _verify(self, provider: _Provider, token: str) -> tuple[str | None, ParsedJwt | None, bytes, str]:
        """Envoy's order: parse → issuer → exp/nbf → audience → signature.

        Returns (status or None, parsed token, digest, reason override).
        """
        parsed, digest, verified_by = self._verifier.load(token)
        if isinstance(parsed, str):
            return parsed, None, digest, ""
        rule = provider.rule
        if rule.issuer and parsed.issuer != rule.issuer:
            return Status.UNKNOWN_ISSUER, parsed, digest, ""
        status = check_time(parsed, self._verifier.clock(), self._verifier.settings.leeway)
        if status is None and not audiences_allowed(provider.audiences, parsed.audiences):
            status = Status.AUDIENCE_NOT_ALLOWED
        if status is not None:
            return status, parsed, digest, ""
        keys = await self._jwks.keys_for(rule)
        if keys is None:
            return self._unavailable(parsed), parsed, digest, "jwks_unavailable"
        status = self._verifier.verify(parsed, digest, keys, verified_by)
        if status == Status.KID_ALG_MISMATCH:
            fresh = await self._jwks.refresh_for_unknown_kid(rule)
            if fresh is not None:
                status = self._verifier.verify(parsed, digest, fresh)
        return status, parsed, digest, ""

    def _unavailable(self, jwt: ParsedJwt) -> str:
        if self._settings.jwks_unavailable == "envoy":
            return Status.JWKS_FETCH_FAIL
        if jwt.kid and jwt.kid != _ISTIOD_FALLBACK_KID:
            return Status.KID_ALG_MISMATCH
        return Status.VERIFICATION_FAIL

    def _success(self, provider: _Provider, attempt: _Attempt) -> AuthnResult:
        jwt = attempt.jwt
        assert jwt is not None
        rule = provider.rule
        to_set: list[tuple[str, str]] = []
        if rule.output_payload_to_header:
            to_set.append((rule.output_payload_to_header, jwt.payload_b64))
        for header, claim in rule.output_claim_to_headers:
            value = _claim_header_value(jwt.payload, claim)
            if value is not None:
                to_set.append((header, value))
        # Client copies of output headers go, except the ones set here: Envoy applies removals
        # after sets, so removing a header we set would drop our own value.
        written = {name for name, _ in to_set}
        remove = [h for h in self._sanitize if h not in written]
        params: tuple[str, ...] = ()
        if not rule.forward_original_token:
            # jwt_authn's removeJwt: a header location loses the header, a query location its
            # parameter; a cookie stays (Envoy does not edit cookies).
            remove.extend(h for h in attempt.token_headers if h not in remove)
            params = tuple(attempt.token_params)
        return AuthnResult(
            "ok",
            auth=RequestAuth(jwt.issuer, jwt.subject, _normalise_claims(jwt.payload, provider.space_delimited)),
            headers_to_set=tuple(to_set),
            headers_to_remove=tuple(remove),
            query_params_to_remove=params,
            reason="ok",
            kid=jwt.kid,
            issuer=jwt.issuer,
            token_id=attempt.digest.hex()[:12],
        )

    def _denied(
        self, request: RequestAttributes, status: str, jwt: ParsedJwt | None, digest: bytes, reason: str = ""
    ) -> AuthnResult:
        scheme = request.headers.get("x-forwarded-proto", "") or "http"
        path = request.path or strip_query(request.raw_path)
        result = AuthnResult(
            "denied",
            http_status=403 if status == Status.AUDIENCE_NOT_ALLOWED else 401,
            body=status,
            www_authenticate=f'Bearer realm="{scheme}://{request.host}{path}", error="invalid_token"',
            headers_to_remove=self._sanitize,
            reason=reason or reason_for(status),
            kid=jwt.kid if jwt else "",
            issuer=jwt.issuer if jwt else "",
            token_id=digest.hex()[:12],
        )
        log.debug("jwt denied: %s (token %s, iss %r, kid %r)", result.reason, result.token_id, result.issuer, result.kid)
        return result


def _locations(rules: tuple[JwtRule, ...]) -> tuple[_Location, ...]:
    """Envoy's ExtractorImpl maps: headers keyed by name+prefix, then params, then cookies."""
    headers: dict[tuple[str, str], set[int]] = {}
    params: dict[str, set[int]] = {}
    cookies: dict[str, set[int]] = {}
    for index, rule in enumerate(rules):
        from_headers, from_params = rule.from_headers, rule.from_params
        if not (rule.from_headers or rule.from_params or rule.from_cookies):
            from_headers, from_params = (("authorization", "Bearer "),), ("access_token",)
        for name, prefix in from_headers:
            headers.setdefault((name, prefix), set()).add(index)
        for name in from_params:
            params.setdefault(name, set()).add(index)
        for name in rule.from_cookies:
            cookies.setdefault(name, set()).add(index)
    return (
        *(_Location("header", n, p, frozenset(i)) for (n, p), i in sorted(headers.items(), key=lambda e: e[0][0] + e[0][1])),
        *(_Location("param", n, "", frozenset(i)) for n, i in sorted(params.items())),
        *(_Location("cookie", n, "", frozenset(i)) for n, i in sorted(cookies.items())),
    )


def _header_values(request: RequestAttributes, name: str) -> tuple[str, ...]:
    """Every value of a header as Envoy's header map holds them: one by one when Envoy sent
    them so (``encode_raw_headers``), else the single comma-joined value of the CheckRequest."""
    if request.header_values is not None:
        return request.header_values.get(name, ())
    value = request.headers.get(name)
    return () if value is None else (value,)


def _from_header(value: str, prefix: str) -> str | None:
    """Envoy 1.40's extractor: find ``prefix`` case-sensitively anywhere in the value, skip to
    the first base64url/dot character after it and take everything from there to the end of the
    value (so trailing junk is part of the token and fails it); no such character → the whole
    value as it is."""
    if not prefix:
        return value
    at = value.find(prefix)
    if at < 0:
        return None
    start = _TOKEN_START.search(value, at + len(prefix))
    return value if start is None else value[start.start():]


def _query_params(raw_path: str) -> dict[str, str]:
    """URL-decoded query parameters; the first occurrence of a name wins (Envoy's map)."""
    query = raw_path.partition("?")[2].partition("#")[0]
    params: dict[str, str] = {}
    for pair in query.split("&"):
        if pair:
            name, _, value = pair.partition("=")
            params.setdefault(unquote(name), unquote(value))
    return params


def raw_query_names(raw_path: str, names: tuple[str, ...]) -> tuple[str, ...]:
    """The query keys of ``raw_path`` that decode to one of ``names``, spelled as sent: what to
    ask Envoy to remove so the parameter jwt_authn would strip is gone however it was encoded."""
    wanted = set(names)
    query = raw_path.partition("?")[2].partition("#")[0]
    keys = (pair.partition("=")[0] for pair in query.split("&") if pair)
    return tuple(dict.fromkeys(key for key in keys if unquote(key) in wanted))


def _cookies(headers: tuple[str, ...]) -> dict[str, str]:
    """Envoy's parseCookies over every Cookie header: ``;``-separated ``name=value``, quotes
    stripped, the first one wins."""
    cookies: dict[str, str] = {}
    for header in headers:
        for part in header.split(";"):
            name, eq, value = part.strip().partition("=")
            if not eq or not name:
                continue
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            cookies.setdefault(name, value)
    return cookies


def _is_cors_preflight(request: RequestAttributes) -> bool:
    headers = request.headers
    return (
        request.method == "OPTIONS"
        and bool(headers.get("origin"))
        and bool(headers.get("access-control-request-method"))
    )


def _normalise_claims(payload: dict[str, Any], space_delimited: tuple[str, ...]) -> dict[str, Any]:
    """The metadata payload: listed string claims split on spaces into lists."""
    split = {
        name: [part for part in payload[name].split(" ") if part]
        for name in space_delimited
        if isinstance(payload.get(name), str)
    }
    return {**payload, **split} if split else payload


def _claim_header_value(payload: dict[str, Any], claim: str) -> str | None:
    """The header value Envoy 1.40 writes for a claim (``a.b`` walks nested objects): a
    string as is (an empty one sets nothing), a bool ``true``/``false``, a number as
    ``convertClaimDoubleToString`` does, a list or object as the base64 of its JSON; null and
    absent claims set nothing."""
    value: Any = payload
    for part in claim.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value or None
    try:
        if isinstance(value, (int, float)):
            return _claim_number(float(value))
        if isinstance(value, (list, dict)):
            return base64.b64encode(_protobuf_json(value).encode()).decode()
    except OverflowError:  # an integer beyond any double: nothing sensible to write
        return None
    return None


def _claim_number(number: float) -> str:
    """Envoy's ``convertClaimDoubleToString``: a whole number in [0, 2^64) as an integer, any
    other number with ``std::to_string`` (six decimals)."""
    if number < 0 or number >= _UINT64_LIMIT or not number.is_integer():
        return f"{number:f}"
    return str(int(number))


def _protobuf_json(value: Any) -> str:
    """JSON as protobuf prints a ``google.protobuf.Value`` (how Envoy holds the payload): compact,
    numbers as doubles in shortest ``%.15g``/``%.17g`` form, non-ASCII kept, ``<``, ``>``,
    U+2028/9 escaped. Object keys keep the token's order (Envoy's own order is its hash map's)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return _simple_dtoa(float(value))
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        return text.translate(str.maketrans(_JSON_ESCAPES)) if any(c in text for c in _JSON_ESCAPES) else text
    if isinstance(value, list):
        return "[" + ",".join(_protobuf_json(item) for item in value) + "]"
    return "{" + ",".join(f"{_protobuf_json(str(k))}:{_protobuf_json(v)}" for k, v in value.items()) + "}"


def _simple_dtoa(number: float) -> str:
    """protobuf's ``SimpleDtoa``: ``%.15g`` when it round-trips, else ``%.17g``."""
    short = f"{number:.15g}"
    return short if float(short) == number else f"{number:.17g}"
