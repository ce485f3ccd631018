"""ONE authz server for the whole mesh, through real Envoy: a trusted LB and the ingress gateway,
three server sidecars in one namespace (two reached by the chart's EnvoyFilter, one not), the
client sidecar and the egress gateway — each Check decided for the workload that sent it.

Every proxy's ext_authz filter is what istiod renders for the CUSTOM provider plus exactly the
merge the chart's EnvoyFilter applies (:class:`authz_server.demo.envoy_config.IdentityMerge`;
``tests/deploy`` checks the chart renders the same). The server runs with no static identity.
"""

from __future__ import annotations

import json
import textwrap
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from authz_server.demo import envoy_config as ec
from authz_server.demo.client import Reply, request
from authz_server.demo.processes import ManagedProcess, ProcessGroup, free_port
from authz_server.demo.topology import ROLES, SERVICE_HOST, Mesh, start_mesh
from authz_server.demo.upstream import EchoUpstream

from .conftest import EXTERNAL_HOST, OTHER_EXTERNAL_HOST

ADMIN_HOST, LEGACY_HOST = ROLES["admin-api"].host, ROLES["legacy"].host
POLICY_HEADER = "x-ext-authz-policy"
POLICIES = textwrap.dedent("""\
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: ingress-banned-client, namespace: istio-system}
    spec:
      selector: {matchLabels: {istio: ingressgateway}}
      action: DENY
      rules: [{from: [{source: {remoteIpBlocks: ["127.0.0.3/32"]}}]}]
    ---
    # Passes only when the SNI reaches the server (include_tls_session): an absent attribute
    # satisfies notValues.
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: ingress-sni, namespace: istio-system}
    spec:
      selector: {matchLabels: {istio: ingressgateway}}
      action: DENY
      rules: [{when: [{key: connection.sni, notValues: ["www.example.com"]}]}]
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: httpbin-callers, namespace: foo}
    spec:
      selector: {matchLabels: {app: httpbin}}
      rules:
      - from: [{source: {principals: ["cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account",
                                      "cluster.local/ns/foo/sa/sleep"]}}]
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: admin-api-lockdown, namespace: foo}
    spec:
      selector: {matchLabels: {app: admin-api}}
      action: DENY
      rules: [{to: [{operation: {paths: ["/admin/*"]}}]}]
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: admin-api-no-role-claims, namespace: foo}
    spec:
      selector: {matchLabels: {app: admin-api}}
      action: DENY
      rules: [{when: [{key: "request.headers[x-role]", values: ["admin"]}]}]
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: egress-allow, namespace: istio-system}
    spec:
      selector: {matchLabels: {istio: egressgateway}}
      rules:
      - from: [{source: {principals: ["cluster.local/ns/foo/sa/sleep"]}}]
        to: [{operation: {hosts: ["api.external.example"]}}]
    """)


class Release:
    """The mesh, the one server process, and its metrics port."""

    def __init__(self, mesh: Mesh, server: ManagedProcess, metrics_port: int) -> None:
        self.mesh, self.server, self.metrics_port = mesh, server, metrics_port

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as reply:
            return reply.read().decode()

    def decisions(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.server.log_path.read_text().splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def release(
    tmp_path_factory: pytest.TempPathFactory, apps: dict[str, EchoUpstream],
    external: EchoUpstream, other_external: EchoUpstream,
) -> Iterator[Release]:
    workdir = tmp_path_factory.mktemp("one-release")
    (workdir / "policies.yaml").write_text(POLICIES)
    port, metrics_port = free_port(), free_port()
    with ProcessGroup(workdir) as group:
        server = group.start_authz_server(
            workdir / "policies.yaml", port, ["--metrics-listen", f"127.0.0.1:{metrics_port}"])
        mesh = start_mesh(
            group, ec.AuthzSettings(port=port), apps={name: app.port for name, app in apps.items()},
            external_hosts={EXTERNAL_HOST: external.port, OTHER_EXTERNAL_HOST: other_external.port},
        )
        yield Release(mesh, server, metrics_port)


def _through_lb(release: Release, path: str = "/get", source: str = "127.0.0.2", **kwargs: Any) -> Reply:
    return request(release.mesh.lb_port, path, host=release.mesh.ingress_host, source=source, **kwargs)


def _from_sleep(release: Release, host: str, path: str = "/get", **kwargs: Any) -> Reply:
    return request(release.mesh.sleep_sidecar_port, path, host=host, **kwargs)


def _denied_by(reply: Reply) -> tuple[int, str]:
    return reply.status, reply.headers.get(POLICY_HEADER, "")


def test_each_app_of_one_namespace_gets_its_own_selector_policies(release: Release) -> None:
    assert _from_sleep(release, SERVICE_HOST, "/admin/users").json()["name"] == "httpbin"
    assert _denied_by(_from_sleep(release, ADMIN_HOST, "/admin/users")) == (403, "foo/admin-api-lockdown")
    assert _from_sleep(release, ADMIN_HOST, "/status").json()["name"] == "admin-api"


def test_plaintext_and_mtls_callers_are_identified(release: Release) -> None:
    """Plaintext: no certificate on either side, the namespace from the call metadata, the labels
    from node metadata — httpbin's ALLOW (principals only) denies, admin-api (no ALLOW) allows."""
    plaintext_httpbin = request(release.mesh.ports["httpbin"], "/get", host=SERVICE_HOST)
    assert _denied_by(plaintext_httpbin) == (403, "no-allow-match")
    assert request(release.mesh.ports["admin-api"], "/status", host=ADMIN_HOST).json()["name"] == "admin-api"
    assert _from_sleep(release, SERVICE_HOST).status == 200  # mTLS sleep: allowed by principal


def test_remote_ip_at_the_gateway_is_what_the_trusted_lb_saw(release: Release) -> None:
    assert _through_lb(release, headers={"x-forwarded-for": "127.0.0.3"}).json()["name"] == "httpbin"
    assert _denied_by(_through_lb(release, source="127.0.0.3")) == (403, "istio-system/ingress-banned-client")
    # ... and the SNI reached the server (ingress-sni would deny otherwise): the 200 above.


@pytest.mark.parametrize("roles", [["user", "admin"], ["admin", "user"], ["admin"]])
def test_a_repeated_header_cannot_bypass_a_header_deny(release: Release, roles: list[str]) -> None:
    assert _denied_by(_from_sleep(release, ADMIN_HOST, "/status", headers={"x-role": roles})) == \
        (403, "foo/admin-api-no-role-claims")


def test_header_values_are_matched_as_native_rbac_would(release: Release) -> None:
    # One header line "user,admin" is one value, not "admin": native Envoy RBAC does not deny it either.
    assert _from_sleep(release, ADMIN_HOST, "/status", headers={"x-role": "user,admin"}).status == 200


def test_egress_gateway_is_decided_as_the_egress_gateway(release: Release) -> None:
    assert _from_sleep(release, EXTERNAL_HOST, "/v1").json()["name"] == "external"
    assert _denied_by(_from_sleep(release, OTHER_EXTERNAL_HOST, "/v1")) == (403, "no-allow-match")


def test_an_unknown_identity_is_denied_with_its_reason_everywhere(release: Release) -> None:
    """The legacy sidecar is not reached by the EnvoyFilter: over mTLS its namespace is known
    (its certificate) but not its labels; in plaintext neither. Namespace foo has selector
    policies, so both are denied — visibly, never by skipping those policies."""
    assert _denied_by(_from_sleep(release, LEGACY_HOST)) == (403, "unknown_workload_labels")
    assert _denied_by(request(release.mesh.ports["legacy"], "/get", host=LEGACY_HOST)) == \
        (403, "unknown_workload_namespace")
    metrics = release.metrics()
    for reason in ("unknown_workload_labels", "unknown_workload_namespace"):
        assert f'authz_checks_total{{decision="deny",reason="{reason}"}}' in metrics
    logged = _wait_for_decisions(release, {"unknown_workload_labels", "unknown_workload_namespace"})
    assert logged["unknown_workload_labels"]["workload"] == {"namespace": "foo", "kind": "sidecar", "labels": None}
    assert logged["unknown_workload_namespace"]["workload"]["namespace"] is None


def test_the_decision_log_names_the_workload_of_every_check(release: Release) -> None:
    _from_sleep(release, ADMIN_HOST, "/status")
    _through_lb(release)
    logged = _wait_for_decisions(release, {"allowed_by_policy", "no_allow_policies"})
    workloads = {(d["workload"]["namespace"], d["workload"]["kind"], (d["workload"]["labels"] or {}).get("app"))
                 for d in release.decisions()}
    assert {("istio-system", "gateway", "istio-ingressgateway"), ("foo", "sidecar", "httpbin"),
            ("foo", "sidecar", "admin-api")} <= workloads
    assert logged["no_allow_policies"]["workload"]["labels_digest"]


def _wait_for_decisions(release: Release, reasons: set[str], timeout_s: float = 15.0) -> dict[str, dict[str, Any]]:
    """The latest logged decision per reason, once every reason in *reasons* is in the log (the
    log is flushed at least every second)."""
    deadline = time.monotonic() + timeout_s
    while True:
        latest = {d["reason"]: d for d in release.decisions()}
        if reasons <= set(latest) or time.monotonic() > deadline:
            assert reasons <= set(latest), f"not logged: {reasons - set(latest)}"
            return latest
        time.sleep(0.1)
