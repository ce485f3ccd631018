"""Envoy ext_authz v3 gRPC: CheckRequest in, CheckResponse out, and the server."""
