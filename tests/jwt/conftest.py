"""Fixtures for tests/jwt (defined in jwt_helpers, a module name that cannot clash with other conftests)."""

from jwt_helpers import _idp_server, ca_bundle, idp, keys  # noqa: F401 - pytest fixtures

