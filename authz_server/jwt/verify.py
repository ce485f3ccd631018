"""Token verification as Envoy's jwt_authn / jwt_verify_lib does it, with a verified-token cache.

A token is parsed once (:func:`parse_jwt`), its signature checked once per lifetime
(:class:`TokenVerifier`); the checks that depend on the rule or the clock (issuer, exp/nbf,
audience, key still published) are cheap and run on every request. Failures are returned as
jwt_verify_lib status strings (the 401/403 body Envoy sends), never raised.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

from cachetools import TLRUCache
from cryptography.exceptions import InvalidSignature
from jwt.algorithms import get_default_algorithms

from authz_server.jwt.jwks import KeySet


class Status:
    """jwt_verify_lib status strings (``status.cc``) used as the local-reply body."""

    MISSING = "Jwt is missing"
    NOT_YET_VALID = "Jwt not yet valid"
    EXPIRED = "Jwt is expired"
    BAD_FORMAT = "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
    HEADER_BAD_BASE64 = "Jwt header is an invalid Base64url encoded"
    HEADER_BAD_JSON = "Jwt header is an invalid JSON"
    HEADER_BAD_ALG = "Jwt header [alg] field is required and must be a string"
    ALG_NOT_IMPLEMENTED = "Jwt header [alg] is not supported"
    HEADER_BAD_KID = "Jwt header [kid] field is not a string"
    PAYLOAD_BAD_BASE64 = "Jwt payload is an invalid Base64url encoded"
    PAYLOAD_BAD_JSON = "Jwt payload is an invalid JSON"
    ED25519_SIGNATURE_LENGTH = "Jwt ED25519 signature is wrong length"
    SIGNATURE_BAD_BASE64 = "Jwt signature is an invalid Base64url encoded"
    UNKNOWN_ISSUER = "Jwt issuer is not configured"
    AUDIENCE_NOT_ALLOWED = "Audiences in Jwt are not allowed"
    VERIFICATION_FAIL = "Jwt verification fails"
    KID_ALG_MISMATCH = "Jwks doesn't have key to match kid or alg from Jwt"
    JWKS_FETCH_FAIL = "Jwks remote fetch is failed"


#: Short machine-usable reasons for logs and metrics.
REASONS = {
    Status.MISSING: "no_token",
    Status.NOT_YET_VALID: "not_yet_valid",
    Status.EXPIRED: "expired",
    Status.UNKNOWN_ISSUER: "issuer_not_configured",
    Status.AUDIENCE_NOT_ALLOWED: "audience_not_allowed",
    Status.VERIFICATION_FAIL: "bad_signature",
    Status.ED25519_SIGNATURE_LENGTH: "bad_signature",
    Status.KID_ALG_MISMATCH: "unknown_kid",
    Status.JWKS_FETCH_FAIL: "jwks_unavailable",
    Status.ALG_NOT_IMPLEMENTED: "unsupported_alg",
}


def reason_for(status: str) -> str:
    return REASONS.get(status, "malformed")


_IMPLEMENTED_ALGS = frozenset(
    {"ES256", "ES384", "ES512", "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA"}
)
_ALGORITHMS = {name: alg for name, alg in get_default_algorithms().items() if name in _IMPLEMENTED_ALGS}
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*(={1,2})?")
_B64_TRANSLATE = bytes.maketrans(b"-_", b"+/")
#: ASCII whitespace the base64 decoder of Envoy 1.40 (absl on simdutf) skips anywhere.
_BASE64_SPACE = str.maketrans("", "", " \t\n\f\r")
#: protobuf's JSON parser (what Envoy uses) refuses nesting deeper than this.
MAX_JSON_DEPTH = 100
_UINT64_LIMIT = 2**64


@dataclass(frozen=True, slots=True)
class VerifySettings:
    """Request-path limits. Times in seconds."""

    #: Tokens longer than this are refused before any parsing.
    max_token_bytes: int = 8192
    #: Clock skew for exp/nbf (Envoy's default is 60 s).
    leeway: int = 60
    #: Entries in the verified-token cache.
    cache_entries: int = 10000
    #: Lifetime of a cache entry for a token without ``exp``.
    cache_ttl_without_exp: float = 300.0


@dataclass(frozen=True, slots=True)
class ParsedJwt:
    """The three segments of a token, decoded once."""

    header: dict[str, Any]
    payload: dict[str, Any]
    alg: str
    kid: str
    issuer: str
    subject: str | None
    audiences: tuple[str, ...]
    exp: int
    nbf: int
    payload_b64: str
    signing_input: bytes
    signature: bytes


def _b64decode(segment: str) -> bytes | None:
    """absl::WebSafeBase64Unescape as Envoy 1.40 builds it (simdutf, loose last chunk): ASCII
    whitespace anywhere is skipped; padding is optional but, when present, must complete the
    last quantum; nothing else is accepted."""
    compact = segment
    match = _BASE64URL.fullmatch(compact)
    if match is None:
        compact = segment.translate(_BASE64_SPACE)
        match = _BASE64URL.fullmatch(compact)
        if match is None:
            return None
    if match.group(1) is not None:
        if len(compact) % 4:
            return None
    elif len(compact) % 4 == 1:
        return None
    data = compact.encode("ascii").translate(_B64_TRANSLATE)
    try:
        return binascii.a2b_base64(data + b"=" * (-len(data) % 4), strict_mode=False)
    except binascii.Error:
        return None


def _json_object(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict) or _too_deep(value, data):
        return None
    return value


def _reject_constant(name: str) -> Any:
    """``NaN``/``Infinity`` are not JSON; protobuf's parser (Envoy's) refuses them."""
    raise ValueError(f"{name} is not JSON")


def _too_deep(value: Any, data: bytes) -> bool:
    if data.count(b"{") + data.count(b"[") <= MAX_JSON_DEPTH:
        return False
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return True
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def _uint64(payload: dict[str, Any], name: str) -> int | str:
    """jwt_verify_lib ``GetUInt64``: absent = 0; a number in [0, 2^64) else a status string."""
    value = payload.get(name)
    if value is None and name not in payload:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"Jwt payload [{name}] field is not an integer"
    if not 0 <= value < _UINT64_LIMIT or value != value:
        return f"Jwt payload [{name}] field is not a positive 64 bit integer"
    return int(value)


def parse_jwt(token: str) -> ParsedJwt | str:
    """Parse like jwt_verify_lib ``Jwt::parseFromString``; a status string on failure."""
    parts = [p for p in token.split(".") if p]
    if len(parts) != 3:
        return Status.BAD_FORMAT
    header_b64, payload_b64, signature_b64 = parts
    header_bytes = _b64decode(header_b64)
    if header_bytes is None:
        return Status.HEADER_BAD_BASE64
    header = _json_object(header_bytes)
    if header is None:
        return Status.HEADER_BAD_JSON
    alg = header.get("alg")
    if not isinstance(alg, str):
        return Status.HEADER_BAD_ALG
    if alg not in _IMPLEMENTED_ALGS:
        return Status.ALG_NOT_IMPLEMENTED
    kid = header.get("kid", "")
    if not isinstance(kid, str):
        return Status.HEADER_BAD_KID

    payload_bytes = _b64decode(payload_b64)
    if payload_bytes is None:
        return Status.PAYLOAD_BAD_BASE64
    payload = _json_object(payload_bytes)
    if payload is None:
        return Status.PAYLOAD_BAD_JSON
    for name in ("iss", "sub"):
        if name in payload and not isinstance(payload[name], str):
            return f"Jwt payload [{name}] field is not a string"
    times = {}
    for name in ("iat", "nbf", "exp"):
        value = _uint64(payload, name)
        if isinstance(value, str):
            return value
        times[name] = value
    if "jti" in payload and not isinstance(payload["jti"], str):
        return "Jwt payload [jti] field is not a string"
    aud = payload.get("aud")
    if aud is None:
        audiences: tuple[str, ...] = ()
    elif isinstance(aud, str):
        audiences = (aud,)
    elif isinstance(aud, list) and all(isinstance(a, str) for a in aud):
        audiences = tuple(aud)
    else:
        return "Jwt payload [aud] field is not a string or string list"

    signature = _b64decode(signature_b64)
    if signature is None:
        return Status.SIGNATURE_BAD_BASE64
    return ParsedJwt(
        header=header,
        payload=payload,
        alg=alg,
        kid=kid,
        issuer=payload.get("iss", ""),
        subject=payload.get("sub"),
        audiences=audiences,
        exp=times["exp"],
        nbf=times["nbf"],
        payload_b64=payload_b64,
        signing_input=f"{header_b64}.{payload_b64}".encode("ascii"),
        signature=signature,
    )


def check_time(jwt: ParsedJwt, now: float, leeway: int) -> str | None:
    """``Jwt::verifyTimeConstraint``: nbf with skew, exp (if present) with skew."""
    now_s = int(now)
    if now_s + leeway < jwt.nbf:
        return Status.NOT_YET_VALID
    if jwt.exp and now_s > jwt.exp + leeway:
        return Status.EXPIRED
    return None


def normalize_audience(audience: str) -> str:
    """jwt_verify_lib ``CheckAudience``: drop an http(s):// scheme and one trailing ``/``."""
    for scheme in ("http://", "https://"):
        if audience.startswith(scheme):
            audience = audience[len(scheme) :]
            break
    return audience[:-1] if audience.endswith("/") else audience


def audiences_allowed(allowed: frozenset[str], token_audiences: tuple[str, ...]) -> bool:
    """``allowed`` already normalised; empty = any audience (and none) accepted."""
    if not allowed:
        return True
    return any(normalize_audience(a) in allowed for a in token_audiences)


def verify_signature(jwt: ParsedJwt, keys: KeySet) -> tuple[str | None, str]:
    """``verifyJwtWithoutTimeChecking``: (status or None, fingerprint of the key that verified).

    A key is a candidate when its ``kid`` matches (or either side has none) and its ``alg``,
    if set, equals the token's. It verifies only if its type permits the alg, so an RSA key is
    never used as an HMAC secret and ``alg: none`` never reaches here.
    """
    matched = False
    algorithm = _ALGORITHMS[jwt.alg]
    for jwk in keys.keys:
        if jwt.kid and jwk.kid and jwk.kid != jwt.kid:
            continue
        if jwk.alg and jwk.alg != jwt.alg:
            continue
        matched = True
        if not jwk.can_verify(jwt.alg):
            continue
        if jwk.kty == "OKP" and len(jwt.signature) != 64:
            return Status.ED25519_SIGNATURE_LENGTH, ""
        try:
            ok = algorithm.verify(jwt.signing_input, jwk.key, jwt.signature)
        except (InvalidSignature, ValueError, TypeError):
            ok = False
        if ok:
            return None, jwk.fingerprint
    return (Status.VERIFICATION_FAIL if matched else Status.KID_ALG_MISMATCH), ""


@dataclass(frozen=True, slots=True)
class _Entry:
    jwt: ParsedJwt
    #: Fingerprint of the key that verified the signature.
    fingerprint: str


class TokenVerifier:
    """Parses tokens and verifies signatures at most once per token lifetime.

    The cache is keyed by a SHA-256 digest of the token, bounded in entries, and an entry
    expires with its token (``exp`` + leeway). A hit still runs the clock, issuer and audience
    checks (the caller does), and counts only if the verifying key is still in the key set.
    """

    def __init__(self, settings: VerifySettings | None = None, clock: Callable[[], float] = time.time):
        self.settings = settings or VerifySettings()
        self.clock = clock
        self.hits = 0
        self.misses = 0
        self._cache: TLRUCache = TLRUCache(
            maxsize=self.settings.cache_entries, ttu=self._entry_expiry, timer=clock
        )

    def _entry_expiry(self, _key: bytes, entry: _Entry, now: float) -> float:
        limit = now + self.settings.cache_ttl_without_exp
        if entry.jwt.exp:
            return min(limit, entry.jwt.exp + self.settings.leeway + 1)
        return limit

    def record_hit(self) -> None:
        """Count a hit served from a result cache in front of this one (the authenticator's)."""
        self.hits += 1

    def verified_by(self, digest: bytes) -> str:
        """Fingerprint of the key that verified this token ("" when it is not cached as verified)."""
        entry = self._cache.get(digest)
        return entry.fingerprint if entry is not None else ""

    @property
    def cache_size(self) -> int:
        """Tokens currently cached (for metrics)."""
        return len(self._cache)

    def load(self, token: str) -> tuple[ParsedJwt | str, bytes, str]:
        """(parsed token or failure status, digest, fingerprint of the key that verified it
        before or ""). Oversize tokens are neither hashed nor parsed."""
        if len(token) > self.settings.max_token_bytes:
            return Status.BAD_FORMAT, b"", ""
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        entry = self._cache.get(digest)
        if entry is not None:
            return entry.jwt, digest, entry.fingerprint
        return parse_jwt(token), digest, ""

    def verify(self, jwt: ParsedJwt, digest: bytes, keys: KeySet, verified_by: str = "") -> str | None:
        """Signature status for ``jwt`` against ``keys``; ``verified_by`` (from :meth:`load`)
        skips the signature check while that key is still in the set."""
        if verified_by and verified_by in keys.fingerprints:
            self.hits += 1
            return None
        self.misses += 1
        status, fingerprint = verify_signature(jwt, keys)
        if status is None:
            self._cache[digest] = _Entry(jwt, fingerprint)
        return status
