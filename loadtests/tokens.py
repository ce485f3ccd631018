"""Signing keys, RS256 tokens and the matching policies, all made at run time (nothing committed).

One issuer, one audience, a ``group`` claim: the benchmark's policy allows principals of that
issuer whose ``group`` is :data:`ALLOWED_GROUP`, so a token minted here with the default group is
allowed, one with another group is denied (403), and a tampered one fails verification (401).
The same key set feeds this server's RequestAuthentication (inline ``jwks``) and Envoy's native
``jwt_authn`` (``local_jwks``), so every variant verifies the same tokens against the same keys.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import jwt as pyjwt
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

ISSUER = "https://issuer.bench.local"
AUDIENCE = "bench"
ALLOWED_GROUP = "bench"
NAMESPACE = "bench"
WORKLOAD_LABELS = {"app": "bench"}
KID = "bench-key-1"
TOKEN_LIFETIME_S = 6 * 3600


@dataclass(frozen=True)
class SigningKey:
    """An RSA key and its public JWKS (the JSON string policies embed)."""

    private: rsa.RSAPrivateKey
    jwks: str

    @classmethod
    def generate(cls) -> "SigningKey":
        private = rsa.generate_private_key(65537, 2048)
        public = json.loads(RSAAlgorithm.to_jwk(private.public_key()))
        jwks = json.dumps({"keys": [{**public, "kid": KID, "alg": "RS256", "use": "sig"}]})
        return cls(private, jwks)

    def mint(self, subject: str, group: str = ALLOWED_GROUP, jti: str | None = None) -> str:
        """An RS256 token for *subject*; distinct *jti* values make distinct tokens."""
        now = int(time.time())
        claims = {
            "iss": ISSUER, "aud": AUDIENCE, "sub": subject, "group": group,
            "iat": now, "exp": now + TOKEN_LIFETIME_S, "jti": jti or subject,
        }
        return pyjwt.encode(claims, self.private, algorithm="RS256", headers={"kid": KID})

    def pool(self, size: int, prefix: str) -> list[str]:
        """*size* distinct allowed tokens (distinct subjects), e.g. one fresh pool per trial round."""
        return [self.mint(f"{prefix}-user-{n}") for n in range(size)]


def tampered(token: str) -> str:
    """The token with its signature's first character changed: parses, fails verification."""
    head, _, signature = token.rpartition(".")
    return f"{head}.{'B' if signature[0] != 'B' else 'C'}{signature[1:]}"


def policy_documents(key: SigningKey) -> list[dict]:
    """RequestAuthentication (inline JWKS) + an ALLOW on the issuer's principals and the claim.

    Istio semantics the load mix relies on: a bad token → 401; no token → no principal → 403;
    a valid token with another ``group`` → 403.
    """
    selector = {"matchLabels": dict(WORKLOAD_LABELS)}
    return [
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "RequestAuthentication",
            "metadata": {"name": "bench-jwt", "namespace": NAMESPACE},
            "spec": {
                "selector": selector,
                "jwtRules": [{"issuer": ISSUER, "audiences": [AUDIENCE], "jwks": key.jwks}],
            },
        },
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "bench-allow-group", "namespace": NAMESPACE},
            "spec": {
                "selector": selector,
                "action": "ALLOW",
                "rules": [
                    {
                        "from": [{"source": {"requestPrincipals": [f"{ISSUER}/*"]}}],
                        "when": [{"key": "request.auth.claims[group]", "values": [ALLOWED_GROUP]}],
                    }
                ],
            },
        },
    ]


def write_policies(key: SigningKey, path: Path) -> Path:
    """The policy set as a multi-document YAML file for ``authz-server serve --policies``."""
    path.write_text(yaml.safe_dump_all(policy_documents(key), sort_keys=False))
    return path


def write_tokens(tokens: list[str], path: Path) -> Path:
    """One token per line: the wrk Lua script and Locust read this format."""
    path.write_text("\n".join(tokens) + "\n")
    return path
