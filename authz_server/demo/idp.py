"""A local OpenID provider: OIDC discovery and a JWKS over HTTPS, and a token minter.

The demo and the end-to-end tests need an issuer the authz server reaches the way it reaches a
real one — ``jwksUri`` over HTTPS with certificate verification (``--jwks-ca-bundle``), OIDC
discovery, ``Cache-Control`` — and whose keys a test can rotate while the server runs. The RSA
keys are generated at start-up and never written to disk.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Mapping

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from .background import BackgroundServer
from .pki import CertificateAuthority, issue_workload_cert

DISCOVERY_PATH = "/.well-known/openid-configuration"
JWKS_PATH = "/jwks.json"
DEFAULT_AUDIENCE = "httpbin.foo"


def _new_key() -> tuple[str, rsa.RSAPrivateKey]:
    """A fresh RS256 signing key and a random key id for it."""
    return uuid.uuid4().hex[:12], rsa.generate_private_key(public_exponent=65537, key_size=2048)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_IdpServer"

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        documents = {DISCOVERY_PATH: self.server.idp.discovery, JWKS_PATH: self.server.idp.jwks}
        build = documents.get(self.path.split("?", 1)[0])
        if build is None:
            self.send_error(404)
            return
        self.server.idp.count_request(self.path)
        payload = json.dumps(build()).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("cache-control", f"public, max-age={self.server.idp.max_age_s}")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        """Quiet: :attr:`IdentityProvider.requests` counts what was fetched."""


class _IdpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int, context: ssl.SSLContext, idp: "IdentityProvider") -> None:
        super().__init__((host, port), _Handler)
        self.context = context
        self.idp = idp

    def get_request(self) -> tuple[socket.socket, Any]:
        """Defer the TLS handshake to the handler thread, so a stalled client blocks only itself."""
        sock, address = self.socket.accept()
        return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), address


class IdentityProvider(BackgroundServer):
    """The IdP on a background thread (a context manager); ``port=0`` picks a free port.

    Its server certificate is signed by *ca* for ``127.0.0.1`` and ``localhost``, so the authz
    server trusts it with ``--jwks-ca-bundle <ca.cert_path>``. The issuer defaults to the
    server's own URL, ``https://127.0.0.1:<port>``, which makes OIDC discovery work as well.
    """

    def __init__(
        self,
        ca: CertificateAuthority,
        *,
        issuer: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        max_age_s: int = 300,
    ) -> None:
        cert = issue_workload_cert(ca, None, dns_names=["localhost"], ip_addresses=[host], name="idp")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(cert.cert_path), str(cert.key_path))
        self.ca_path = ca.cert_path
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._keys: dict[str, rsa.RSAPrivateKey] = dict([_new_key()])
        self._requests: dict[str, int] = {}
        super().__init__(_IdpServer(host, port, context, self), "idp")
        self.url = f"https://{host}:{self.port}"
        self.issuer = issuer or self.url

    @property
    def jwks_uri(self) -> str:
        return self.url + JWKS_PATH

    @property
    def kid(self) -> str:
        """The key id new tokens are signed with (the newest key)."""
        with self._lock:
            return next(reversed(self._keys))

    def discovery(self) -> dict[str, Any]:
        """The OIDC discovery document: only what a relying party needs to find the keys."""
        return {
            "issuer": self.issuer,
            "jwks_uri": self.jwks_uri,
            "id_token_signing_alg_values_supported": ["RS256"],
        }

    def jwks(self) -> dict[str, Any]:
        """The published public keys, newest last."""
        with self._lock:
            keys = list(self._keys.items())
        published = []
        for kid, key in keys:
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
            published.append({**jwk, "kid": kid, "alg": "RS256", "use": "sig"})
        return {"keys": published}

    def rotate(self, *, keep_previous: bool = True) -> str:
        """Publish a new signing key and return its kid; *keep_previous* leaves the old ones up,
        as an IdP does while tokens signed with them are still valid."""
        kid, key = _new_key()
        with self._lock:
            if not keep_previous:
                self._keys.clear()
            self._keys[kid] = key
        return kid

    def mint(
        self,
        claims: Mapping[str, Any] | None = None,
        *,
        subject: str = "alice",
        audience: str | list[str] | None = DEFAULT_AUDIENCE,
        expires_in_s: float = 600.0,
        issuer: str | None = None,
        forged: bool = False,
    ) -> str:
        """An RS256 token from this IdP; *claims* are added to (and override) the standard ones.

        A negative *expires_in_s* gives an expired token. *forged* signs with a throw-away key
        under the published kid: well-formed, but its signature does not verify.
        """
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": issuer or self.issuer,
            "sub": subject,
            "iat": now,
            "exp": now + int(expires_in_s),
        }
        if audience is not None:
            payload["aud"] = audience
        payload.update(claims or {})
        with self._lock:
            kid, key = next(reversed(self._keys.items()))
        if forged:
            key = _new_key()[1]
        return jwt.encode(payload, key, algorithm="RS256", headers={"kid": kid})

    def count_request(self, path: str) -> None:
        with self._lock:
            self._requests[path] = self._requests.get(path, 0) + 1

    @property
    def requests(self) -> dict[str, int]:
        """How often each document was fetched, by path (to see when the server refreshed)."""
        with self._lock:
            return dict(self._requests)

