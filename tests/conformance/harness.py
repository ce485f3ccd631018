"""Turn a conformance case (cases.yaml) into what the server sees: policies, keys, a CheckRequest.

Keys are generated per test session (never committed); ``{{JWKS:name}}`` placeholders become
the JSON of the generated public keys; tokens are minted exactly as the case's ``jwt`` field
describes (header, claims with ``now±N``, signing key, tampering, location).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import quote

import jwt as pyjwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from envoy.config.core.v3.address_pb2 import Address, SocketAddress
from envoy.service.auth.v3.attribute_context_pb2 import AttributeContext
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest

from authz_server.engine.request import Workload
from authz_server.grpc_api.check_request import RequestContextSettings

_NOW = re.compile(r"^now([+-]\d+)?$")


@dataclass(frozen=True)
class KeyRing:
    """The case file's named RSA keys and the JWKS documents that publish them."""

    private: Mapping[str, rsa.RSAPrivateKey]
    jwks: Mapping[str, str]

    @classmethod
    def generate(cls, meta: Mapping[str, Any]) -> KeyRing:
        private = {name: rsa.generate_private_key(public_exponent=65537, key_size=2048) for name in meta["keys"]}
        published: dict[str, list[dict[str, Any]]] = {name: [] for name in meta["jwks"]}
        for name, spec in meta["keys"].items():
            jwk = json.loads(pyjwt.algorithms.RSAAlgorithm.to_jwk(private[name].public_key()))
            jwk.update({"alg": spec["alg"], "use": "sig"})
            if "kid" in spec:
                jwk["kid"] = spec["kid"]
            for jwks_name in spec.get("published_in", []):
                published[jwks_name].append(jwk)
        return cls(private, {name: json.dumps({"keys": keys}) for name, keys in published.items()})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(raw: Mapping[str, Any], now: int) -> dict[str, Any]:
    out = {}
    for key, value in raw.items():
        if isinstance(value, str) and (m := _NOW.match(value)):
            value = now + int(m.group(1) or 0)
        out[key] = value
    return out


def mint(spec: Mapping[str, Any], keys: KeyRing, now: int | None = None) -> str:
    """The token string a case's ``jwt`` field describes."""
    if "raw" in spec:
        return spec["raw"]
    now = int(time.time()) if now is None else now
    header = dict(spec["header"])
    claims = _claims(spec["claims"], now)
    tamper = spec.get("tamper")
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    if tamper == "alg-none-empty-signature":
        return signing_input + "."
    if tamper == "hs256-with-rsa-public-key":
        key_name = spec["sign_with"].split("=public-key-")[1]
        secret = keys.private[f"key-{key_name}"].public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return signing_input + "." + _b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())
    key = keys.private[spec["sign_with"]]
    alg = header.pop("alg")
    return pyjwt.encode(claims, key, algorithm=alg, headers=header)


def substitute_jwks(policies: Any, keys: KeyRing, unreachable_uri: str) -> Any:
    """Replace ``{{JWKS:name}}`` with key JSON and external jwksUris with a closed local port.

    Tests never leave the machine: an unreachable IdP is modelled by a loopback port nobody
    listens on, which fails exactly like an unreachable host.
    """
    if isinstance(policies, dict):
        out = {}
        for key, value in policies.items():
            if key == "jwksUri" and isinstance(value, str):
                out[key] = unreachable_uri
            else:
                out[key] = substitute_jwks(value, keys, unreachable_uri)
        return out
    if isinstance(policies, list):
        return [substitute_jwks(v, keys, unreachable_uri) for v in policies]
    if isinstance(policies, str) and policies.startswith("{{JWKS:"):
        return keys.jwks[policies[len("{{JWKS:"):-2]]
    return policies


PROXY_KINDS = {"sidecar": "sidecar", "ingress_gateway": "gateway"}


def context_for(request: Mapping[str, Any], meta: Mapping[str, Any]) -> RequestContextSettings:
    """The server settings a deployment for this case's workload would have."""
    workload = meta["workloads"][request["workload"]]
    kind = PROXY_KINDS[request["proxy"]]
    return RequestContextSettings(
        Workload(workload["namespace"], dict(workload["labels"]), kind), int(request.get("num_trusted_proxies") or 0)
    )


def check_request(request: Mapping[str, Any], meta: Mapping[str, Any], keys: KeyRing) -> CheckRequest:
    """The CheckRequest Istio's Envoy would send for the case's request (SPEC 8.1)."""
    workload = meta["workloads"][request["workload"]]
    path = request["path_seen_by_authz"]
    headers: dict[str, str] = {}
    for name, value in (request.get("headers") or {}).items():
        headers[name.lower()] = ",".join(value) if isinstance(value, list) else str(value)
    if request.get("x_forwarded_for_seen_by_authz"):
        headers["x-forwarded-for"] = request["x_forwarded_for_seen_by_authz"]
    token_spec = request.get("jwt")
    if token_spec:
        token = mint(token_spec, keys)
        location = token_spec["location"]
        if "header" in location:
            headers[location["header"].lower()] = location.get("value_prefix", "") + token
        elif "cookie" in location:
            headers["cookie"] = f"{location['cookie']}={token}"
        elif "query" in location:
            sep = "&" if "?" in path else "?"
            path = f"{path}{sep}{location['query']}={quote(token)}"
    headers.update({":method": request["method"], ":path": path, ":authority": request["host"]})
    http = AttributeContext.HttpRequest(
        method=request["method"], host=request["host"], path=path, headers=headers, scheme="http", protocol="HTTP/1.1"
    )
    source = AttributeContext.Peer(
        address=Address(socket_address=SocketAddress(address=request["source_ip"], port_value=45678)),
        principal=request.get("source_principal") or "",
    )
    destination = AttributeContext.Peer(
        address=Address(socket_address=SocketAddress(address=request["destination_ip"],
                                                     port_value=int(request["destination_port"]))),
        principal=workload.get("own_principal", ""),
    )
    attrs = AttributeContext(source=source, destination=destination, request=AttributeContext.Request(http=http))
    if request.get("sni"):
        attrs.tls_session.sni = request["sni"]
    return CheckRequest(attributes=attrs)
