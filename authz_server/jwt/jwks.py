"""JSON Web Key Sets: parsing into verification keys, and the async cache of remote sets.

Why a cache of our own: istiod refreshes JWKS every 20 minutes, never on an unknown ``kid``,
and replaces the keys with a reject-all set when the IdP is briefly down (SPEC 7.1). Here a
Check only ever waits for the *first* fetch of an issuer (bounded by the rule's timeout) or
for a rate-limited, single-flight refresh after an unknown ``kid``; everything else happens in
the background, and the last good keys are kept (up to a maximum staleness) when the IdP is
down, slow, or returns garbage.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, HMACAlgorithm, OKPAlgorithm, RSAAlgorithm
from jwt.exceptions import InvalidKeyError

from authz_server.jwt.http_get import HttpGetError, HttpGetter

log = logging.getLogger(__name__)

#: JWK ``kty`` → the JWS ``alg`` values a key of that type can verify (jwt_verify_lib).
ALGS_FOR_KTY = {
    "RSA": frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
    "oct": frozenset({"HS256", "HS384", "HS512"}),
    "OKP": frozenset({"EdDSA"}),
}
#: EC curve → the one ES alg whose signature size and hash fit it.
EC_ALG_FOR_CURVE = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
_MAX_AGE = re.compile(r"(?:^|[,\s])max-age\s*=\s*\"?(\d+)", re.IGNORECASE)


class JwksError(ValueError):
    """A JWKS document that yields no usable verification key."""


@dataclass(frozen=True, slots=True)
class Jwk:
    """One verification key. ``key`` is a cryptography public key, or bytes for ``oct``."""

    kty: str
    kid: str
    alg: str
    crv: str
    key: Any
    #: Digest of (kid, alg, public material): identifies the key across refreshes so a
    #: verified-token cache entry can check its key is still published.
    fingerprint: str

    def can_verify(self, alg: str) -> bool:
        if self.kty == "EC":
            return EC_ALG_FOR_CURVE.get(self.crv) == alg
        return alg in ALGS_FOR_KTY.get(self.kty, ())


@dataclass(frozen=True, slots=True)
class KeySet:
    """The usable keys of one JWKS document, in document order."""

    keys: tuple[Jwk, ...]
    has_private: bool = False
    #: Why individual keys were ignored (jwt_verify_lib skips bad keys too).
    skipped: tuple[str, ...] = ()
    fingerprints: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fingerprints", frozenset(k.fingerprint for k in self.keys))


def parse_jwks(document: str | bytes | dict) -> KeySet:
    """Parse a JWKS (``{"keys": [...]}``); raise :class:`JwksError` if no key is usable."""
    if isinstance(document, (str, bytes)):
        try:
            document = json.loads(document)
        except (ValueError, RecursionError):
            raise JwksError("Jwks is an invalid JSON") from None
    if not isinstance(document, dict):
        raise JwksError("Jwks is an invalid JSON")
    if "keys" not in document:
        raise JwksError("Jwks does not have [keys] field")
    if not isinstance(document["keys"], list):
        raise JwksError("[keys] in Jwks is not an array")
    keys: list[Jwk] = []
    skipped: list[str] = []
    has_private = False
    for index, raw in enumerate(document["keys"]):
        try:
            jwk, private = _parse_jwk(raw)
        except JwksError as exc:
            skipped.append(f"keys[{index}]: {exc}")
            continue
        keys.append(jwk)
        has_private = has_private or private
    if not keys:
        detail = f" ({'; '.join(skipped)})" if skipped else ""
        raise JwksError(f"Jwks doesn't have any valid public key{detail}")
    return KeySet(tuple(keys), has_private, tuple(skipped))


def _parse_jwk(raw: object) -> tuple[Jwk, bool]:
    if not isinstance(raw, dict):
        raise JwksError("key is not an object")
    kty, kid, alg, crv = raw.get("kty"), raw.get("kid", ""), raw.get("alg", ""), raw.get("crv", "")
    if not isinstance(kty, str) or not kty:
        raise JwksError("[kty] is missing in [keys]")
    if not all(isinstance(v, str) for v in (kid, alg, crv)):
        raise JwksError("[kid], [alg] and [crv] must be strings")
    if raw.get("use", "sig") != "sig":
        raise JwksError(f"key {kid!r} is not for signatures (use={raw.get('use')!r})")
    private = any(name in raw for name in ("d", "p", "q", "dp", "dq", "qi"))
    try:
        if kty == "RSA":
            if alg and not alg.startswith(("RS", "PS")):
                raise JwksError("[alg] is not started with [RS] or [PS] for an RSA key")
            key = RSAAlgorithm.from_jwk(raw)
            if isinstance(key, rsa.RSAPrivateKey):
                key = key.public_key()
            numbers = key.public_numbers()
            material = f"{numbers.n}:{numbers.e}"
        elif kty == "EC":
            if crv not in EC_ALG_FOR_CURVE:
                raise JwksError("[crv] or [alg] field is not supported for an EC key")
            if alg and alg != EC_ALG_FOR_CURVE[crv]:
                raise JwksError("[crv] field specified is not compatible with [alg] for an EC key")
            key = ECAlgorithm.from_jwk(raw)
            if isinstance(key, ec.EllipticCurvePrivateKey):
                key = key.public_key()
            numbers = key.public_numbers()
            material = f"{crv}:{numbers.x}:{numbers.y}"
        elif kty == "OKP":
            if crv != "Ed25519":
                raise JwksError("[crv] field is not supported for an OKP key")
            if alg and alg != "EdDSA":
                raise JwksError("[alg] is not [EdDSA] for an OKP key")
            key = OKPAlgorithm.from_jwk(raw)
            if isinstance(key, ed25519.Ed25519PrivateKey):
                key = key.public_key()
            if not isinstance(key, ed25519.Ed25519PublicKey):
                raise JwksError("[crv] field is not supported for an OKP key")
            material = key.public_bytes_raw().hex()
        elif kty == "oct":
            if alg and not alg.startswith("HS"):
                raise JwksError("[alg] does not start with [HS] for an HMAC key")
            if not isinstance(raw.get("k"), str):
                raise JwksError("[k] field is missing for an HMAC key")
            key = HMACAlgorithm.from_jwk(raw)
            material = hashlib.sha256(key).hexdigest()
            private = True
        else:
            raise JwksError(f"[kty] is not supported in [keys]: {kty!r}")
    except (InvalidKeyError, ValueError, TypeError, KeyError) as exc:
        if isinstance(exc, JwksError):
            raise
        raise JwksError(f"bad {kty} key {kid!r}: {exc}") from None
    fingerprint = hashlib.sha256(f"{kty}|{kid}|{alg}|{material}".encode()).hexdigest()[:32]
    return Jwk(kty, kid, alg, crv, key, fingerprint), private and kty != "oct"


@dataclass(frozen=True, slots=True)
class JwksSettings:
    """Cache policy for remote JWKS. Times in seconds."""

    #: TTL when the IdP sends no ``Cache-Control: max-age``.
    default_ttl: float = 300.0
    #: Bounds applied to the IdP's ``max-age``.
    min_ttl: float = 30.0
    max_ttl: float = 86400.0
    #: Refresh in the background once this fraction of the TTL has elapsed.
    refresh_fraction: float = 0.8
    #: At most one fetch per issuer per this interval (unknown-``kid`` refreshes, retries).
    min_refresh_interval: float = 10.0
    #: Keys stay usable this long past their TTL while the IdP cannot be reached.
    max_staleness: float = 86400.0
    #: CA bundle for HTTPS verification; ``None`` = system trust store.
    ca_bundle: str | None = None
    max_response_bytes: int = 1 << 20


@dataclass(slots=True)
class JwksStats:
    """Plain counters; the metrics layer reads them."""

    fetches: int = 0
    fetch_failures: int = 0
    rejected_documents: int = 0
    kid_refreshes: int = 0
    rate_limited: int = 0
    wait_timeouts: int = 0
    stale_served: int = 0
    too_stale: int = 0


@dataclass(frozen=True, slots=True)
class SourceStatus:
    issuer: str
    uri: str
    has_keys: bool
    usable: bool
    age_seconds: float | None
    last_error: str


@dataclass(frozen=True, slots=True)
class JwksStatus:
    """Readiness: every remote source has usable keys (fetched once, within staleness)."""

    ready: bool
    sources: tuple[SourceStatus, ...]


@dataclass(slots=True)
class _Source:
    """One remote key source: an issuer and its jwksUri (``""`` = OIDC discovery)."""

    issuer: str
    uri: str
    timeout: float
    keys: KeySet | None = None
    fetched_at: float = -math.inf
    refresh_at: float = -math.inf
    expires_at: float = -math.inf
    attempted_at: float = -math.inf
    completed: int = 0
    last_error: str = ""
    inflight: asyncio.Task | None = None


class FetchError(Exception):
    """Why one fetch failed (logged and counted, never raised to a Check)."""


class JwksCache:
    """Keys for every rule, inline or remote, on one event loop.

    :meth:`keys_for` is what a Check calls. It returns ``None`` when no usable keys exist
    (never fetched successfully, or staler than ``max_staleness``).
    """

    def __init__(self, settings: JwksSettings | None = None, clock: Callable[[], float] = time.monotonic):
        self.settings = settings or JwksSettings()
        self.stats = JwksStats()
        self._clock = clock
        self._sources: dict[tuple[str, str], _Source] = {}
        #: called with (issuer, "success" | "failure" | "rejected") after every fetch, for metrics
        self.on_fetch: Callable[[str, str], None] | None = None
        # Fetches are coroutines under the rule's timeout, never threads: a slow or stalled IdP
        # cannot occupy the executor policy reloads run on (see http_get).
        self._http = HttpGetter(ssl.create_default_context(cafile=self.settings.ca_bundle),
                                self.settings.max_response_bytes)

    async def keys_for(self, rule: Any) -> KeySet | None:
        """The key set to verify ``rule``'s tokens with. Waits only for an issuer's first fetch."""
        if rule.jwks is None and not rule.jwks_text:
            source = self._source(rule)
            if source.keys is None and source.completed == 0:
                await self._join(source, self._clock())
                return self._usable(source, self._clock())
        return self.current_keys(rule)

    def current_keys(self, rule: Any) -> KeySet | None:
        """The keys usable right now, without waiting (a due refresh starts in the background)."""
        if rule.jwks is not None or rule.jwks_text:
            return rule.jwks
        source = self._source(rule)
        now = self._clock()
        if now >= source.refresh_at:
            self._start(source, now)
        return self._usable(source, now)

    async def refresh_for_unknown_kid(self, rule: Any) -> KeySet | None:
        """Fetch now because a token's ``kid`` is unknown; single-flight and rate-limited.

        Returns the new key set if it differs from the one the caller already tried.
        """
        if rule.jwks is not None or rule.jwks_text:
            return None
        source = self._source(rule)
        before = source.keys
        now = self._clock()
        if source.inflight is None and now - source.attempted_at < self.settings.min_refresh_interval:
            self.stats.rate_limited += 1
            return None
        if source.inflight is None:
            self.stats.kid_refreshes += 1
        await self._join(source, now)
        keys = self._usable(source, self._clock())
        return keys if keys is not None and keys is not before else None

    async def prefetch(self, rules: Any) -> JwksStatus:
        """Register and fetch every remote source concurrently (start-up); bounded by timeouts."""
        now = self._clock()
        sources = {id(s): s for s in (self._source(r) for r in rules if r.jwks is None and not r.jwks_text)}
        await asyncio.gather(*(self._join(s, now) for s in sources.values()))
        return self.status()

    async def run_refresher(self, interval: float = 1.0) -> None:
        """Refresh due sources even without traffic; run as a task and cancel it to stop."""
        while True:
            now = self._clock()
            for source in list(self._sources.values()):
                if now >= source.refresh_at:
                    self._start(source, now)
            await asyncio.sleep(interval)

    def status(self) -> JwksStatus:
        now = self._clock()
        entries = tuple(
            SourceStatus(
                issuer=s.issuer,
                uri=s.uri,
                has_keys=s.keys is not None,
                usable=self._fresh_enough(s, now),
                age_seconds=None if s.keys is None else now - s.fetched_at,
                last_error=s.last_error,
            )
            for s in self._sources.values()
        )
        return JwksStatus(all(e.usable for e in entries), entries)

    def _source(self, rule: Any) -> _Source:
        key = (rule.issuer, rule.jwks_uri)
        source = self._sources.get(key)
        if source is None:
            source = self._sources[key] = _Source(rule.issuer, rule.jwks_uri, rule.timeout)
        return source

    def _fresh_enough(self, source: _Source, now: float) -> bool:
        return source.keys is not None and now <= source.expires_at + self.settings.max_staleness

    def _usable(self, source: _Source, now: float) -> KeySet | None:
        if source.keys is None:
            return None
        if now <= source.expires_at:
            return source.keys
        if self._fresh_enough(source, now):
            self.stats.stale_served += 1
            return source.keys
        self.stats.too_stale += 1
        return None

    def _start(self, source: _Source, now: float) -> asyncio.Task | None:
        """Start a background fetch unless one runs or the per-issuer rate limit forbids it."""
        if source.inflight is not None:
            return source.inflight
        if now - source.attempted_at < self.settings.min_refresh_interval:
            return None
        source.attempted_at = now
        source.inflight = asyncio.get_running_loop().create_task(self._refresh(source))
        return source.inflight

    async def _join(self, source: _Source, now: float) -> None:
        task = self._start(source, now)
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), source.timeout)
        except asyncio.TimeoutError:
            self.stats.wait_timeouts += 1

    async def _refresh(self, source: _Source) -> None:
        self.stats.fetches += 1
        try:
            keys, ttl = await self._download(source)
        except (FetchError, HttpGetError, JwksError, OSError, ValueError) as exc:
            reason = str(exc) or type(exc).__name__
            if isinstance(exc, JwksError):
                self.stats.rejected_documents += 1
            self.stats.fetch_failures += 1
            self._notify(source, "rejected" if isinstance(exc, JwksError) else "failure")
            source.last_error = reason
            log.warning(
                "JWKS fetch failed for issuer %r (%s): %s; %s",
                source.issuer,
                source.uri or "OIDC discovery",
                reason,
                "keeping last good keys" if source.keys is not None else "no keys yet",
            )
        else:
            now = self._clock()
            source.keys = keys
            source.fetched_at = now
            source.expires_at = now + ttl
            source.refresh_at = now + ttl * self.settings.refresh_fraction
            source.last_error = ""
            self._notify(source, "success")
        finally:
            source.completed += 1
            source.inflight = None

    def _notify(self, source: _Source, result: str) -> None:
        if self.on_fetch is not None:
            self.on_fetch(source.issuer, result)

    async def _download(self, source: _Source) -> tuple[KeySet, float]:
        """Discovery (when needed) and the key set, together within the rule's timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + source.timeout
        uri = source.uri or await self._discover(source)
        response = await self._http.get(uri, max(deadline - loop.time(), 0.0))
        return parse_jwks(response.body), self._ttl(response.headers.get("cache-control", ""))

    async def _discover(self, source: _Source) -> str:
        url = source.issuer.rstrip("/") + "/.well-known/openid-configuration"
        body = (await self._http.get(url, source.timeout)).body
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            raise FetchError(f"OIDC discovery document at {url} is not JSON") from None
        uri = document.get("jwks_uri") if isinstance(document, dict) else None
        if not isinstance(uri, str) or not uri.startswith(("https://", "http://")):
            raise FetchError(f"OIDC discovery document at {url} has no http(s) jwks_uri")
        return uri

    def _ttl(self, cache_control: str) -> float:
        settings = self.settings
        lowered = cache_control.lower()
        if "no-store" in lowered or "no-cache" in lowered:
            return settings.min_ttl
        match = _MAX_AGE.search(cache_control)
        if match is None:
            return settings.default_ttl
        return min(max(float(match.group(1)), settings.min_ttl), settings.max_ttl)
