"""Many AuthorizationPolicies in one workload's scope, for the policy-count scale of the benchmark.

The benchmark's own policy (:func:`loadtests.tokens.policy_documents`: the issuer's request
principals and ``group == bench``) stays the only one that matches a benchmark request, and it
comes *last*, so a plain scan has to try every other rule first. The others are what a gateway
serving many teams carries; a tenth of them live in the mesh root namespace:

* ``realistic`` — cycling through principals + paths; request principals of the benchmark issuer +
  a ``group`` claim (the same issuer on every one: only the claim tells them apart); hosts + paths +
  a header; DENY ``ipBlocks``; DENY paths; namespaces + methods;
* ``distinct`` — every policy an ALLOW on a host or a path of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from . import tokens

ROOT_NAMESPACE = "istio-system"
MIXES = ("realistic", "distinct")


def documents(key: tokens.SigningKey, count: int, mix: str = "realistic") -> list[dict[str, Any]]:
    """The RequestAuthentication, ``count - 1`` non-matching policies, then the matching one."""
    if mix not in MIXES:
        raise ValueError(f"unknown policy mix {mix!r} (expected one of {', '.join(MIXES)})")
    authn, allow = tokens.policy_documents(key)
    build = _realistic if mix == "realistic" else _distinct
    return [authn, *(_policy(i, *build(i)) for i in range(count - 1)), allow]


def write(key: tokens.SigningKey, count: int, path: Path, mix: str = "realistic") -> Path:
    """The policy set as one multi-document YAML file."""
    path.write_text(yaml.safe_dump_all(documents(key, count, mix), sort_keys=False))
    return path


def _policy(i: int, action: str, rules: list[dict[str, Any]]) -> dict[str, Any]:
    root = i % 10 == 9
    spec: dict[str, Any] = {"action": action, "rules": rules}
    if not root:
        spec["selector"] = {"matchLabels": dict(tokens.WORKLOAD_LABELS)}
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": f"mix-{i}", "namespace": ROOT_NAMESPACE if root else tokens.NAMESPACE},
        "spec": spec,
    }


def _realistic(i: int) -> tuple[str, list[dict[str, Any]]]:
    kind = i % 6
    if kind == 0:
        return "ALLOW", [{"from": [{"source": {"principals": [f"cluster.local/ns/team-{i}/sa/client"]}}],
                          "to": [{"operation": {"paths": [f"/svc-{i}/*"]}}]}]
    if kind == 1:
        return "ALLOW", [{"from": [{"source": {"requestPrincipals": [f"{tokens.ISSUER}/*"]}}],
                          "when": [{"key": "request.auth.claims[group]", "values": [f"team-{i}"]}]}]
    if kind == 2:
        return "ALLOW", [{"to": [{"operation": {"hosts": [f"app-{i}.example.com"], "paths": [f"/api/v{i % 3}/*"]}}],
                          "when": [{"key": "request.headers[x-tenant]", "values": [f"tenant-{i}"]}]}]
    if kind == 3:
        return "DENY", [{"from": [{"source": {"ipBlocks": [f"10.{i // 256 % 256}.{i % 256}.0/24"]}}]}]
    if kind == 4:
        return "DENY", [{"to": [{"operation": {"paths": [f"/admin-{i}/*", f"/internal-{i}"]}}]}]
    return "ALLOW", [{"from": [{"source": {"namespaces": [f"team-{i}"]}}],
                      "to": [{"operation": {"methods": ["GET", "POST"]}}]}]


def _distinct(i: int) -> tuple[str, list[dict[str, Any]]]:
    if i % 2:
        return "ALLOW", [{"to": [{"operation": {"hosts": [f"app-{i}.example.com"]}}]}]
    return "ALLOW", [{"to": [{"operation": {"paths": [f"/svc-{i}"]}}]}]
