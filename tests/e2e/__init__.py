"""End-to-end tests through real Envoy processes (see conftest for the shared fixtures)."""
