"""RequestAuthentication: rule model, JWKS key store, token verification, authenticator.

Public API::

    rules = parse_jwt_rules(spec.get("jwtRules"), report)          # policy loader
    jwks = JwksCache(JwksSettings(ca_bundle=...)); await jwks.prefetch(rules)
    verifier = TokenVerifier(VerifySettings(leeway=60))
    authn = JwtAuthenticator(rules_of_workload, jwks, verifier)
    result = await authn.authenticate(request)                      # never raises
"""

from authz_server.jwt.authenticator import AuthnResult, AuthnSettings, JwtAuthenticator
from authz_server.jwt.jwks import JwksCache, JwksError, JwksSettings, JwksStatus, KeySet, parse_jwks
from authz_server.jwt.rules import JwtRule, parse_jwt_rules
from authz_server.jwt.verify import Status, TokenVerifier, VerifySettings

__all__ = [
    "AuthnResult",
    "AuthnSettings",
    "JwksCache",
    "JwksError",
    "JwksSettings",
    "JwksStatus",
    "JwtAuthenticator",
    "JwtRule",
    "KeySet",
    "Status",
    "TokenVerifier",
    "VerifySettings",
    "parse_jwks",
    "parse_jwt_rules",
]
