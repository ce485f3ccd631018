"""A signing key made for one test run, so tests can give JWT claims without real keys.

The runner signs a token with the claims a test gives and publishes this key as the issuer's
JWKS for the run: the token then goes through the real jwt_authn path (extraction, issuer,
audiences, expiry, signature, claim headers, token removal). ES256 because a P-256 key is made
in microseconds; the private key never leaves the process.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import jwt as pyjwt
from cryptography.hazmat.primitives.asymmetric import ec

KID = "authz-server-test-key"
#: lifetime of a minted token when the test gives no ``exp``
DEFAULT_LIFETIME_SECONDS = 3600


class SigningKey:
    def __init__(self) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        jwk = pyjwt.algorithms.ECAlgorithm.to_jwk(self._key.public_key(), as_dict=True)
        self.public_jwk: dict[str, Any] = {**jwk, "kid": KID, "alg": "ES256", "use": "sig"}

    def sign(self, claims: Mapping[str, Any]) -> str:
        """A token with ``claims``; ``iat`` and ``exp`` (now + 1 h) are added when absent."""
        now = int(time.time())
        payload = {"iat": now, "exp": now + DEFAULT_LIFETIME_SECONDS, **claims}
        return pyjwt.encode(payload, self._key, algorithm="ES256", headers={"kid": KID})
