"""``RequestAuthentication.spec.jwtRules`` as validated, immutable values.

The loader hands the raw YAML to :func:`parse_jwt_rules`, which checks what Istio's admission
webhook checks (SPEC section 10) and reports every problem through the collector instead of
raising, so ``validate`` can list them all. Inline JWKS are parsed here, once, so a Check never
parses key material.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from authz_server.jwt.jwks import JwksError, KeySet, parse_jwks
from authz_server.policy.issues import IssueCollector

#: Istio's default JWKS fetch timeout (``jwtRules[].timeout``).
DEFAULT_TIMEOUT_SECONDS = 5.0

_FIELDS = frozenset(
    {
        "issuer",
        "audiences",
        "jwksUri",
        "jwks",
        "fromHeaders",
        "fromParams",
        "fromCookies",
        "outputPayloadToHeader",
        "forwardOriginalToken",
        "outputClaimToHeaders",
        "timeout",
        "spaceDelimitedClaims",
    }
)
_HEADER_FIELDS = frozenset({"name", "prefix"})
_CLAIM_HEADER_FIELDS = frozenset({"header", "claim"})
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_DURATION = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)(h|m|s|ms|us|µs|ns)$")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


@dataclass(frozen=True, slots=True)
class JwtRule:
    """One ``jwtRules[]`` entry (one Envoy ``JwtProvider``).

    ``jwks`` is the parsed inline key set; it is excluded from equality because key objects
    compare by identity, ``jwks_text`` carries the value instead.
    """

    issuer: str = ""
    audiences: tuple[str, ...] = ()
    jwks_uri: str = ""
    jwks_text: str = ""
    jwks: KeySet | None = field(default=None, compare=False)
    from_headers: tuple[tuple[str, str], ...] = ()
    from_params: tuple[str, ...] = ()
    from_cookies: tuple[str, ...] = ()
    output_payload_to_header: str = ""
    forward_original_token: bool = False
    output_claim_to_headers: tuple[tuple[str, str], ...] = ()
    timeout: float = DEFAULT_TIMEOUT_SECONDS
    space_delimited_claims: tuple[str, ...] = ()

    @property
    def output_header_names(self) -> tuple[str, ...]:
        """Header names this rule writes; client copies of them are always stripped."""
        names = [h for h, _ in self.output_claim_to_headers]
        if self.output_payload_to_header:
            names.insert(0, self.output_payload_to_header)
        return tuple(names)


def parse_jwt_rules(raw: object, report: IssueCollector) -> tuple[JwtRule, ...]:
    """Validate ``spec.jwtRules`` and return the rules that are valid.

    Invalid entries are reported (``report.error``) and left out; the caller decides whether
    any error rejects the whole document.
    """
    if raw is None:
        return ()
    if not isinstance(raw, list):
        report.error("jwtRules", "must be a list")
        return ()
    rules: list[JwtRule] = []
    for index, entry in enumerate(raw):
        scoped = report.scoped(f"jwtRules[{index}]")
        before = len(scoped.errors)
        rule = _parse_rule(entry, scoped)
        if rule is not None and len(scoped.errors) == before:
            rules.append(rule)
    return tuple(rules)


def parse_duration(text: object) -> float | None:
    """A protobuf/Go duration string (``5s``, ``1.5s``, ``100ms``) in seconds, or ``None``."""
    if not isinstance(text, str):
        return None
    match = _DURATION.match(text.strip())
    if not match:
        return None
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def _parse_rule(entry: object, report: IssueCollector) -> JwtRule | None:
    if not isinstance(entry, dict):
        report.error("", "must be an object")
        return None
    for key in sorted(set(entry) - _FIELDS, key=str):
        report.error(str(key), "unknown field")

    issuer = _string(entry, "issuer", report)
    jwks_uri = _string(entry, "jwksUri", report)
    jwks_text = _string(entry, "jwks", report)
    if not issuer and not jwks_uri:
        report.error("issuer", "issuer or jwksUri must be non-empty")
    if jwks_uri:
        _check_jwks_uri(jwks_uri, report)
    if jwks_uri and jwks_text:
        report.error("jwks", "jwks and jwksUri are mutually exclusive")
    keys = _parse_inline_jwks(jwks_text, report) if jwks_text else None

    audiences = _string_list(entry, "audiences", report, "audience must be non-empty string")
    params = _string_list(entry, "fromParams", report, "location query must be non-empty string")
    cookies = _string_list(entry, "fromCookies", report, "cookie name must be non-empty string")
    spaced = _string_list(entry, "spaceDelimitedClaims", report, "claim must be non-empty string")
    headers = _from_headers(entry.get("fromHeaders"), report)
    claim_headers = _claim_headers(entry.get("outputClaimToHeaders"), report)

    payload_header = _string(entry, "outputPayloadToHeader", report)
    if payload_header and not _HEADER_NAME.match(payload_header):
        report.error("outputPayloadToHeader", f"invalid header name {payload_header!r}")

    forward = entry.get("forwardOriginalToken", False)
    if not isinstance(forward, bool):
        report.error("forwardOriginalToken", "must be a boolean")
        forward = False

    timeout = DEFAULT_TIMEOUT_SECONDS
    if entry.get("timeout") is not None:
        parsed = parse_duration(entry["timeout"])
        if parsed is None or parsed <= 0:
            report.error("timeout", f"invalid duration {entry['timeout']!r} (expected e.g. 5s, 1.5s, 100ms)")
        else:
            timeout = parsed

    return JwtRule(
        issuer=issuer,
        audiences=audiences,
        jwks_uri=jwks_uri,
        jwks_text=jwks_text,
        jwks=keys,
        from_headers=headers,
        from_params=params,
        from_cookies=cookies,
        output_payload_to_header=payload_header.lower(),
        forward_original_token=forward,
        output_claim_to_headers=claim_headers,
        timeout=timeout,
        space_delimited_claims=spaced,
    )


def _string(entry: dict, key: str, report: IssueCollector) -> str:
    value = entry.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        report.error(key, "must be a string")
        return ""
    return value


def _string_list(entry: dict, key: str, report: IssueCollector, empty_message: str) -> tuple[str, ...]:
    value = entry.get(key)
    if value is None:
        return ()
    if not isinstance(value, list):
        report.error(key, "must be a list of strings")
        return ()
    items: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            report.error(f"{key}[{i}]", "must be a string")
        elif not item:
            report.error(f"{key}[{i}]", empty_message)
        else:
            items.append(item)
    return tuple(items)


def _check_jwks_uri(uri: str, report: IssueCollector) -> None:
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError as exc:
        report.error("jwksUri", f"invalid jwksUri {uri!r}: {exc}")
        return
    if parts.scheme not in ("http", "https"):
        report.error("jwksUri", f"jwksUri {uri!r}: scheme must be http or https")
    elif not parts.hostname:
        report.error("jwksUri", f"jwksUri {uri!r}: missing host")
    elif port == 0:
        report.error("jwksUri", f"jwksUri {uri!r}: invalid port")


def _parse_inline_jwks(text: str, report: IssueCollector) -> KeySet | None:
    try:
        keys = parse_jwks(text)
    except JwksError as exc:
        report.error("jwks", f"jwks parse error: {exc}")
        return None
    for problem in keys.skipped:
        report.warning("jwks", f"key ignored: {problem}")
    if keys.has_private:
        report.warning("jwks", "jwks contains private key material; only the public part is used")
    return keys


def _from_headers(value: object, report: IssueCollector) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        report.error("fromHeaders", "must be a list")
        return ()
    out: list[tuple[str, str]] = []
    for i, item in enumerate(value):
        path = f"fromHeaders[{i}]"
        if not isinstance(item, dict):
            report.error(path, "location header must be an object")
            continue
        for key in sorted(set(item) - _HEADER_FIELDS, key=str):
            report.error(f"{path}.{key}", "unknown field")
        name, prefix = item.get("name"), item.get("prefix", "")
        if not isinstance(prefix, str):
            report.error(f"{path}.prefix", "must be a string")
            prefix = ""
        if not isinstance(name, str) or not name:
            report.error(f"{path}.name", "location header name must be non-empty string")
        elif not _HEADER_NAME.match(name):
            report.error(f"{path}.name", f"invalid header name {name!r}")
        else:
            out.append((name.lower(), prefix))
    return tuple(out)


def _claim_headers(value: object, report: IssueCollector) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        report.error("outputClaimToHeaders", "must be a list")
        return ()
    out: list[tuple[str, str]] = []
    for i, item in enumerate(value):
        path = f"outputClaimToHeaders[{i}]"
        if not isinstance(item, dict):
            report.error(path, "must be an object")
            continue
        for key in sorted(set(item) - _CLAIM_HEADER_FIELDS, key=str):
            report.error(f"{path}.{key}", "unknown field")
        header, claim = item.get("header"), item.get("claim")
        if not isinstance(header, str) or not isinstance(claim, str) or not header or not claim:
            report.error(path, "outputClaimToHeaders header and claim value must be non-empty string")
        elif not _HEADER_NAME.match(header):
            report.error(f"{path}.header", f"invalid header name {header!r}")
        else:
            out.append((header.lower(), claim))
    return tuple(out)
