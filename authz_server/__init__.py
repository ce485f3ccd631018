"""Envoy ext_authz (v3 gRPC) authorization server for Istio.

Layout: ``policy`` (Istio's schema: load, validate, model), ``engine`` (compile and decide),
``jwt`` (RequestAuthentication: tokens and JWKS), ``authorizer`` (authn then authz, as Istio
orders them), ``grpc_api`` (CheckRequest/CheckResponse and the server), ``cli``.
"""

__version__ = "0.1.0"
