"""The JWKS lifecycle against a real HTTPS IdP on loopback (CA generated per session)."""

from __future__ import annotations

import asyncio
import time

import pytest

from authz_server.jwt import JwksCache, JwksSettings, JwtAuthenticator, Status, TokenVerifier, parse_jwt_rules
from authz_server.jwt.authenticator import AuthnSettings
from authz_server.policy.issues import IssueCollector
from jwt_helpers import request

ISS = "https://issuer-a.example"


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _claims() -> dict:
    now = int(time.time())
    return {"iss": ISS, "sub": "user-1", "exp": now + 3600}


def _setup(idp, ca_bundle, rule: dict | None = None, clock=None, authn_settings=None, **settings):
    raw = rule or {"issuer": ISS, "jwksUri": idp.url("/jwks")}
    rules = parse_jwt_rules([raw], IssueCollector())
    cache = JwksCache(JwksSettings(ca_bundle=ca_bundle, **settings), **({"clock": clock} if clock else {}))
    return JwtAuthenticator(rules, cache, TokenVerifier(), authn_settings), cache, rules


def test_fetch_over_https_and_rotation(idp, ca_bundle, keys) -> None:
    idp.serve_json("/jwks", keys.jwks("key-1"))
    authn, cache, _ = _setup(idp, ca_bundle, min_refresh_interval=0.0)

    async def scenario():
        assert (await authn.authenticate(request(keys.mint(_claims())))).outcome == "ok"
        idp.serve_json("/jwks", keys.jwks("key-1", "key-new"))
        fresh = keys.mint(_claims(), kid="key-new", sign_with="key-new")
        return await authn.authenticate(request(fresh))

    result = asyncio.run(scenario())
    assert result.outcome == "ok", result.body
    assert idp.count("/jwks") == 2 and cache.stats.kid_refreshes == 1


def test_unknown_kid_refresh_is_single_flight(idp, ca_bundle, keys) -> None:
    idp.serve_json("/jwks", keys.jwks("key-1"))
    authn, cache, _ = _setup(idp, ca_bundle, min_refresh_interval=0.0)

    async def scenario():
        await authn.authenticate(request(keys.mint(_claims())))
        idp.serve_json("/jwks", keys.jwks("key-1", "key-new"), delay=0.2)
        token = keys.mint(_claims(), kid="key-new", sign_with="key-new")
        return await asyncio.gather(*(authn.authenticate(request(token)) for _ in range(25)))

    results = asyncio.run(scenario())
    assert {r.outcome for r in results} == {"ok"}
    assert idp.count("/jwks") == 2


def test_unknown_kid_refresh_is_rate_limited(idp, ca_bundle, keys) -> None:
    idp.serve_json("/jwks", keys.jwks("key-1"))
    authn, cache, _ = _setup(idp, ca_bundle, min_refresh_interval=10.0)
    token = keys.mint(_claims(), kid="key-x", sign_with="key-x")

    async def scenario():
        return [await authn.authenticate(request(token)) for _ in range(5)]

    results = asyncio.run(scenario())
    assert {(r.http_status, r.body) for r in results} == {(401, Status.KID_ALG_MISMATCH)}
    # The first fetch counts against the limit too: no refresh within 10 s of it.
    assert idp.count("/jwks") == 1
    assert cache.stats.rate_limited == 5


def test_outage_keeps_last_good_keys_within_staleness(idp, ca_bundle, keys) -> None:
    clock = Clock()
    idp.serve_json("/jwks", keys.jwks("key-1"), headers={"Cache-Control": "max-age=60"})
    authn, cache, rules = _setup(
        idp, ca_bundle, clock=clock, min_ttl=1.0, max_staleness=600.0, min_refresh_interval=1.0
    )
    token = keys.mint(_claims())

    async def scenario():
        assert (await authn.authenticate(request(token))).outcome == "ok"
        idp.serve_json("/jwks", b"oops", status=503)
        clock.t += 100  # past the 60 s TTL: refresh fails, stale keys still serve
        await cache.prefetch(rules)
        stale = await authn.authenticate(request(token))
        clock.t += 600  # past max staleness
        await cache.prefetch(rules)
        gone = await authn.authenticate(request(token))
        return stale, gone

    stale, gone = asyncio.run(scenario())
    assert stale.outcome == "ok"
    assert (gone.http_status, gone.body, gone.reason) == (401, Status.KID_ALG_MISMATCH, "jwks_unavailable")
    assert cache.stats.fetch_failures == 2 and cache.stats.stale_served >= 1 and cache.stats.too_stale >= 1
    assert not cache.status().ready


@pytest.mark.parametrize("document", [b"not json", b'{"keys": []}', b'{"keys": [{"kty": "RSA", "n": "x"}]}', b"[]"])
def test_malformed_jwks_keeps_last_good(idp, ca_bundle, keys, document: bytes) -> None:
    idp.serve_json("/jwks", keys.jwks("key-1"))
    authn, cache, rules = _setup(idp, ca_bundle, min_refresh_interval=0.0)
    token = keys.mint(_claims())

    async def scenario():
        await cache.prefetch(rules)
        idp.serve_json("/jwks", document)
        await cache.prefetch(rules)
        return await authn.authenticate(request(token))

    assert asyncio.run(scenario()).outcome == "ok"
    assert cache.stats.rejected_documents == 1 and cache.stats.fetches == 2
    assert cache.status().sources[0].last_error


def test_startup_with_idp_down(idp, ca_bundle, keys) -> None:
    idp.serve_json("/jwks", b"down", status=500)
    authn, cache, rules = _setup(idp, ca_bundle)

    async def scenario():
        status = await cache.prefetch(rules)
        with_token = await authn.authenticate(request(keys.mint(_claims())))
        without = await authn.authenticate(request())
        return status, with_token, without

    status, with_token, without = asyncio.run(scenario())
    assert not status.ready
    assert (with_token.http_status, with_token.body) == (401, Status.KID_ALG_MISMATCH)
    assert without.outcome == "none" and without.auth is None


def test_startup_with_idp_down_envoy_mode(idp, ca_bundle, keys) -> None:
    idp.serve_json("/jwks", b"down", status=500)
    authn, _, _ = _setup(idp, ca_bundle, authn_settings=AuthnSettings(jwks_unavailable="envoy"))
    result = asyncio.run(authn.authenticate(request(keys.mint(_claims()))))
    assert (result.http_status, result.body, result.reason) == (401, Status.JWKS_FETCH_FAIL, "jwks_unavailable")


def test_slow_idp_bounded_by_rule_timeout(idp, ca_bundle, keys) -> None:
    idp.serve_json("/jwks", keys.jwks("key-1"), delay=1.0)
    authn, cache, _ = _setup(idp, ca_bundle, rule={"issuer": ISS, "jwksUri": idp.url("/jwks"), "timeout": "200ms"})
    token = keys.mint(_claims())

    async def scenario():
        started = time.perf_counter()
        first = await authn.authenticate(request(token))
        elapsed = time.perf_counter() - started
        started = time.perf_counter()
        second = await authn.authenticate(request(token))
        return first, elapsed, second, time.perf_counter() - started

    first, elapsed, second, second_elapsed = asyncio.run(scenario())
    assert first.http_status == 401 and elapsed < 0.6
    assert second.http_status == 401 and second_elapsed < 0.1  # only the first fetch is waited for
    assert cache.stats.wait_timeouts == 1


def test_oidc_discovery(idp, ca_bundle, keys) -> None:
    issuer = idp.url("/idp")
    idp.serve_json("/idp/.well-known/openid-configuration", {"issuer": issuer, "jwks_uri": idp.url("/idp/keys")})
    idp.serve_json("/idp/keys", keys.jwks("key-1"))
    authn, cache, _ = _setup(idp, ca_bundle, rule={"issuer": issuer})
    token = keys.mint({**_claims(), "iss": issuer})
    result = asyncio.run(authn.authenticate(request(token)))
    assert result.outcome == "ok" and result.auth.issuer == issuer
    assert idp.count("/idp/keys") == 1


def test_tls_verification_required(idp, keys) -> None:
    idp.serve_json("/jwks", keys.jwks("key-1"))
    authn, cache, rules = _setup(idp, None)  # system trust store does not know the test CA
    status = asyncio.run(cache.prefetch(rules))
    assert not status.ready and "TLS certificate not trusted" in status.sources[0].last_error
    assert idp.count("/jwks") == 0


def test_cache_control_and_background_refresh(idp, ca_bundle, keys) -> None:
    clock = Clock()
    idp.serve_json("/jwks", keys.jwks("key-1"), headers={"Cache-Control": "public, max-age=100"})
    authn, cache, rules = _setup(idp, ca_bundle, clock=clock, min_ttl=10.0, max_ttl=1000.0)
    token = keys.mint(_claims())

    async def scenario():
        await cache.prefetch(rules)
        assert cache.status().ready
        clock.t += 85  # past 80 % of max-age=100: refreshed in the background, no waiting
        result = await authn.authenticate(request(token))
        for _ in range(100):
            if idp.count("/jwks") == 2:
                break
            await asyncio.sleep(0.01)
        return result

    assert asyncio.run(scenario()).outcome == "ok"
    assert idp.count("/jwks") == 2


def test_ttl_bounds(idp, ca_bundle, keys) -> None:
    cache = JwksCache(JwksSettings(ca_bundle=ca_bundle, min_ttl=30.0, max_ttl=600.0, default_ttl=300.0))
    assert cache._ttl("max-age=5") == 30.0
    assert cache._ttl("max-age=100000") == 600.0
    assert cache._ttl("") == 300.0
    assert cache._ttl("no-store") == 30.0


def test_key_removed_at_idp_invalidates_cached_token(idp, ca_bundle, keys) -> None:
    idp.serve_json("/jwks", keys.jwks("key-1", "key-2"))
    authn, cache, rules = _setup(idp, ca_bundle, min_refresh_interval=0.0)
    token = keys.mint(_claims())

    async def scenario():
        assert (await authn.authenticate(request(token))).outcome == "ok"
        assert (await authn.authenticate(request(token))).outcome == "ok"
        idp.serve_json("/jwks", keys.jwks("key-2"))
        await cache.prefetch(rules)
        return await authn.authenticate(request(token))

    result = asyncio.run(scenario())
    assert (result.http_status, result.body) == (401, Status.KID_ALG_MISMATCH)
