"""Micro-benchmark of the JWT layer (not a test): µs per authenticate() decision.

Also (3): the whole decision for a cached token — authentication plus the policy engine (an
ALLOW on the issuer's principals and a claim), through the same Authorizer a Check uses, without
the gRPC framework.

Measures (1) a cached token: extraction, digest lookup, exp/nbf, issuer and audience checks and
the key-still-published check, and (2) a cache miss: parsing plus a full RS256 verification.

Run:  .venv/bin/python loadtests/bench_jwt.py [iterations]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import jwt as pyjwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from authz_server.authorizer import Authorizer
from authz_server.engine.engine import PolicyEngine
from authz_server.engine.request import RequestAttributes, Workload
from authz_server.policy.loader import PolicySet, parse_documents
from authz_server.jwt import JwksCache, JwtAuthenticator, TokenVerifier, parse_jwt_rules
from authz_server.policy.issues import IssueCollector

ISSUER = "https://issuer-a.example"


POLICY = f"""
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: foo}}
spec:
  jwtRules: [{{issuer: "{ISSUER}", jwksUri: "https://unused.example/jwks"}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: readers, namespace: foo}}
spec:
  rules:
  - from: [{{source: {{requestPrincipals: ["{ISSUER}/*"]}}}}]
    when: [{{key: "request.auth.claims[scope]", values: ["read"]}}]
"""


def _request(token: str) -> RequestAttributes:
    return RequestAttributes(
        method="GET", host="httpbin.foo:8000", path="/headers", raw_path="/headers",
        headers={"authorization": f"Bearer {token}", "user-agent": "bench"}, workload=Workload("foo"),
    )


def _authorizer(authn: JwtAuthenticator) -> Authorizer:
    aps: list = []
    ras: list = []
    issues: list = []
    parse_documents(POLICY, "bench.yaml", aps, ras, issues)
    # The RequestAuthentication only makes the engine ask for an authenticator: the bench's.
    engine = PolicyEngine(PolicySet("bench.yaml", tuple(aps), tuple(ras), tuple(issues)),
                          authenticator_factory=lambda rules: authn)
    return Authorizer(lambda: engine)


async def _per_call_us(authn: JwtAuthenticator, requests: list[RequestAttributes]) -> float:
    started = time.perf_counter()
    for req in requests:
        result = await authn.authenticate(req)
        assert result.outcome == "ok", result.body
    return (time.perf_counter() - started) / len(requests) * 1e6


def main(iterations: int) -> None:
    key = rsa.generate_private_key(65537, 2048)
    jwk = {**json.loads(RSAAlgorithm.to_jwk(key.public_key())), "kid": "key-1", "alg": "RS256", "use": "sig"}
    rules = parse_jwt_rules(
        [{"issuer": ISSUER, "audiences": ["api"], "jwks": json.dumps({"keys": [jwk]})}], IssueCollector()
    )
    authn = JwtAuthenticator(rules, JwksCache(), TokenVerifier())
    exp = int(time.time()) + 3600

    def mint(n: int) -> str:
        claims = {"iss": ISSUER, "sub": "user-1", "aud": "api", "exp": exp, "jti": str(n), "scope": "read write"}
        return pyjwt.encode(claims, key, algorithm="RS256", headers={"kid": "key-1"})

    cached = _request(mint(0))
    asyncio.run(authn.authenticate(cached))
    misses = [_request(mint(n)) for n in range(1, min(iterations, 3000) + 1)]

    authorizer = _authorizer(authn)

    async def decide_us() -> float:
        started = time.perf_counter()
        for _ in range(iterations):
            req = _request(cached.headers["authorization"][7:])
            verdict = await authorizer.check(req)
            assert verdict.allowed, verdict.detail
        return (time.perf_counter() - started) / iterations * 1e6

    async def run() -> tuple[float, float, float]:
        await _per_call_us(authn, [cached] * 1000)  # warm-up
        hit = await _per_call_us(authn, [cached] * iterations)
        miss = await _per_call_us(authn, misses)
        return hit, miss, await decide_us()

    hit, miss, decision = asyncio.run(run())
    print(f"cached token:            {hit:8.1f} µs/decision ({iterations} calls)")
    print(f"full RS256 verification: {miss:8.1f} µs/decision ({len(misses)} distinct tokens)")
    print(f"cached token + policies: {decision:8.1f} µs/decision (authn + engine, {iterations} calls)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("iterations", nargs="?", type=int, default=20000, help="calls per measurement [20000]")
    main(parser.parse_args().iterations)
