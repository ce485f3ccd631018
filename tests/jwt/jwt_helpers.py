"""Helpers for the JWT tests: generated keys, a test CA, a real HTTPS JWKS server on loopback, minting.

Nothing secret is committed: every key and certificate is generated per test session.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from authz_server.demo.pki import issue_workload_cert, make_ca
from authz_server.engine.request import RequestAttributes


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_jwk(key: Any, kid: str | None, alg: str | None) -> dict:
    """The public JWK of a private key, with optional kid/alg."""
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        jwk = json.loads(RSAAlgorithm.to_jwk(public))
    elif isinstance(public, ec.EllipticCurvePublicKey):
        jwk = json.loads(ECAlgorithm.to_jwk(public))
    else:
        jwk = json.loads(OKPAlgorithm.to_jwk(public))
    jwk["use"] = "sig"
    if kid is not None:
        jwk["kid"] = kid
    if alg is not None:
        jwk["alg"] = alg
    return jwk


@dataclass
class Keys:
    """Signing keys by name, generated once per session."""

    rsa: dict[str, rsa.RSAPrivateKey]
    ec256: ec.EllipticCurvePrivateKey
    ed: ed25519.Ed25519PrivateKey

    def jwks(self, *kids: str) -> dict:
        return {"keys": [public_jwk(self.rsa[k], k, "RS256") for k in kids]}

    def jwks_text(self, *kids: str) -> str:
        return json.dumps(self.jwks(*kids))

    def mint(
        self,
        claims: dict,
        kid: str | None = "key-1",
        sign_with: str = "key-1",
        alg: str = "RS256",
        extra_header: dict | None = None,
    ) -> str:
        headers: dict[str, Any] = {"typ": "JWT", **(extra_header or {})}
        if kid is not None:
            headers["kid"] = kid
        key = {"ec256": self.ec256, "ed": self.ed}.get(sign_with) or self.rsa[sign_with]
        return pyjwt.encode(claims, key, algorithm=alg, headers=headers)

    def public_pem(self, name: str) -> bytes:
        return self.rsa[name].public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def raw_token(header: dict, payload: dict | bytes, signature: bytes = b"") -> str:
    """A token assembled by hand (for tampering tests)."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return f"{b64url(json.dumps(header).encode())}.{b64url(body)}.{b64url(signature)}"


def hs256_with_public_key(keys: Keys, claims: dict, kid: str = "key-1") -> str:
    """Algorithm confusion: HS256 keyed with key-1's public PEM."""
    head = b64url(json.dumps({"alg": "HS256", "kid": kid, "typ": "JWT"}).encode())
    body = b64url(json.dumps(claims).encode())
    mac = hmac.new(keys.public_pem("key-1"), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(mac)}"


@pytest.fixture(scope="session")
def keys() -> Keys:
    return Keys(
        rsa={name: rsa.generate_private_key(65537, 2048) for name in ("key-1", "key-2", "key-x", "key-new")},
        ec256=ec.generate_private_key(ec.SECP256R1()),
        ed=ed25519.Ed25519PrivateKey.generate(),
    )


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


class IdP:
    """Behaviour of the HTTPS JWKS server, changed by tests while it runs."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: dict[str, int] = {}
        self.lock = threading.Lock()
        self.base = ""

    def url(self, path: str) -> str:
        return self.base + path

    def serve_json(self, path: str, document: Any, **kwargs: Any) -> None:
        body = document if isinstance(document, bytes) else json.dumps(document).encode()
        self.routes[path] = Route(body=body, **kwargs)

    def count(self, path: str) -> int:
        with self.lock:
            return self.hits.get(path, 0)

    def reset(self) -> None:
        with self.lock:
            self.routes.clear()
            self.hits.clear()


def _handler(idp: IdP) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server API
            with idp.lock:
                idp.hits[self.path] = idp.hits.get(self.path, 0) + 1
            route = idp.routes.get(self.path)
            if route is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if route.delay:
                time.sleep(route.delay)
            try:
                self.send_response(route.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(route.body)))
                for name, value in route.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(route.body)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                pass

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


def _make_ca_and_cert(directory: Path) -> tuple[Path, Path, Path]:
    """A test CA and a server certificate for 127.0.0.1/localhost, from the project's PKI kit."""
    ca = make_ca(directory, "authz-server test CA")
    cert = issue_workload_cert(ca, None, dns_names=["localhost"], ip_addresses=["127.0.0.1"], name="server")
    return ca.cert_path, cert.cert_path, cert.key_path


@pytest.fixture(scope="session")
def _idp_server(tmp_path_factory: pytest.TempPathFactory):
    ca_path, cert_path, key_path = _make_ca_and_cert(tmp_path_factory.mktemp("pki"))
    idp = IdP()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(idp))
    server.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    idp.base = f"https://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield idp, str(ca_path)
    server.shutdown()
    server.server_close()


@pytest.fixture
def idp(_idp_server) -> IdP:
    """The running HTTPS IdP, emptied for each test."""
    server, _ = _idp_server
    server.reset()
    return server


@pytest.fixture
def ca_bundle(_idp_server) -> str:
    return _idp_server[1]


def request(
    token: str | None = None,
    *,
    method: str = "GET",
    host: str = "httpbin.foo:8000",
    path: str = "/headers",
    headers: dict[str, str] | None = None,
) -> RequestAttributes:
    """A request carrying ``token`` as ``Authorization: Bearer``."""
    all_headers = {k.lower(): v for k, v in (headers or {}).items()}
    if token is not None:
        all_headers["authorization"] = f"Bearer {token}"
    return RequestAttributes(
        method=method, host=host, path=path.partition("?")[0], raw_path=path, headers=all_headers
    )


def build(raw_rules: list, jwks_settings: Any = None, verify_settings: Any = None, **authn_kwargs: Any):
    """Parse raw ``jwtRules`` (failing on any validation error) into (authenticator, cache, verifier)."""
    from authz_server.jwt import JwksCache, JwtAuthenticator, TokenVerifier, parse_jwt_rules
    from authz_server.policy.issues import IssueCollector

    report = IssueCollector()
    rules = parse_jwt_rules(raw_rules, report)
    assert not report.errors, [str(i) for i in report.errors]
    cache = JwksCache(jwks_settings)
    verifier = TokenVerifier(verify_settings)
    return JwtAuthenticator(rules, cache, verifier, **authn_kwargs), cache, verifier
