"""The Helm chart: every mode renders valid objects, wired the way Istio needs them."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import cache

import helm_python
import pytest
import yaml
from envoy_data_plane.envoy.extensions.filters.http.ext_authz.v3 import ExtAuthz
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import HttpFilter

from authz_server.demo import envoy_config as ec
from authz_server.demo.envoy_api import write_config
from authz_server.demo.processes import envoy_validate
from authz_server.policy.loader import load_policies
from authz_server.settings import add_options

from chart_validation import CHART, is_istio_kind, istio_errors, load_values, mesh_errors, render, validate

CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
MODES = {p.name.removesuffix("-values.yaml"): p for p in CI_VALUES}
PROVIDER, LOCAL_PROVIDER = "istio-ext-authz", "istio-ext-authz-local"
SERVICE_FQDN = "authz-istio-ext-authz.istio-ext-authz.svc.cluster.local"


@cache
def rendered(mode: str) -> tuple[list[dict], str]:
    return render(load_values(MODES[mode]))


def objects(mode: str, kind: str | None = None) -> list[dict]:
    return [o for o in rendered(mode)[0] if kind is None or o["kind"] == kind]


def one(mode: str, kind: str, name: str | None = None) -> dict:
    found = [o for o in objects(mode, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"{mode}: expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def custom_policies(mode: str) -> list[dict]:
    return [o for o in objects(mode, "AuthorizationPolicy") if o["spec"]["action"] == "CUSTOM"]


def mesh_providers(mode: str) -> dict[str, dict]:
    cm = one(mode, "ConfigMap", "authz-istio-ext-authz-mesh-config")
    mesh = yaml.safe_load(cm["data"]["mesh"])
    return {p["name"]: p["envoyExtAuthzGrpc"] for p in mesh["extensionProviders"]}


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_every_mode_has_a_values_file():
    assert set(MODES) >= {"ingress", "mesh", "egress", "ambient", "sidecar-local"}


@pytest.mark.parametrize("mode", MODES)
def test_every_rendered_object_is_valid(mode):
    errors = {}
    for obj in objects(mode):
        label = f"{obj['kind']}/{obj['metadata']['name']}"
        errors[label] = validate(obj)
        if obj["kind"] == "ConfigMap" and "mesh" in obj["data"]:
            errors[label] += mesh_errors(yaml.safe_load(obj["data"]["mesh"]))
    assert {k: v for k, v in errors.items() if v} == {}
    assert any(is_istio_kind(o) for o in objects(mode)), "no Istio object was validated"


@pytest.mark.parametrize("mode", MODES)
def test_policies_for_the_server_are_valid_istio_objects(mode):
    """The ConfigMap holds Istio policies for the server (not the cluster); they must still be
    what Istio's admission would accept, since the server reads Istio's schema."""
    cm = one(mode, "ConfigMap", "authz-istio-ext-authz-policies")
    docs = [d for text in cm["data"].values() for d in yaml.safe_load_all(text) if d]
    assert docs
    for doc in docs:
        assert doc["kind"] in ("AuthorizationPolicy", "RequestAuthentication")
        assert istio_errors(doc) == [], doc["metadata"]["name"]


@pytest.mark.parametrize("mode", MODES)
def test_example_policies_load_in_the_real_server(mode, tmp_path):
    """What the chart mounts is what the server loads: no error, and at least one policy."""
    cm = one(mode, "ConfigMap", "authz-istio-ext-authz-policies")
    for name, text in cm["data"].items():
        (tmp_path / name).write_text(text)
    policy_set = load_policies(tmp_path)
    assert [str(e) for e in policy_set.errors] == []
    assert policy_set.authorization_policies or policy_set.request_authentications


EXPECTED_CUSTOM = {
    # mode: (namespace, selector matchLabels, targetRefs, provider)
    "ingress": ("istio-system", {"istio": "ingressgateway"}, None, PROVIDER),
    "mesh": ("shop", {"app": "checkout"}, None, PROVIDER),
    "egress": ("istio-system", {"istio": "egressgateway"}, None, PROVIDER),
    "ambient": ("shop", None, [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "waypoint"}],
                PROVIDER),
    "sidecar-local": ("istio-ext-authz", {"app": "httpbin", "version": "v1"}, None, LOCAL_PROVIDER),
}


@pytest.mark.parametrize("mode", EXPECTED_CUSTOM)
def test_mode_renders_its_custom_policy(mode):
    namespace, selector, target_refs, provider = EXPECTED_CUSTOM[mode]
    policy = custom_policies(mode)[0]
    spec = policy["spec"]
    assert policy["metadata"]["namespace"] == namespace
    assert spec["provider"] == {"name": provider}
    assert spec.get("selector", {}).get("matchLabels") == selector
    assert spec.get("targetRefs") == target_refs
    if mode == "egress":  # only the listed outbound hosts go to the server
        assert spec["rules"] == [{"to": [{"operation": {"hosts": ["api.stripe.com", "*.github.com"]}}]}]
    else:  # Istio never calls a CUSTOM provider without a matching rule: [{}] matches everything
        assert spec["rules"] == [{}]


@pytest.mark.parametrize("mode", MODES)
def test_policy_providers_are_declared_in_the_mesh_config(mode):
    providers = mesh_providers(mode)
    used = {p["spec"]["provider"]["name"] for p in custom_policies(mode)}
    assert used and used <= set(providers)
    for name, grpc in providers.items():
        assert grpc["timeout"].endswith(("ms", "s")) and grpc["failOpen"] is False
        if name == PROVIDER:  # the chart's Service, on its gRPC port
            svc = one(mode, "Service")
            assert grpc["service"] == SERVICE_FQDN
            assert {"name": "grpc", "port": grpc["port"], "targetPort": "grpc", "appProtocol": "grpc"} \
                in svc["spec"]["ports"]
        else:  # sidecar-local: a ServiceEntry host that resolves to the pod's loopback
            se = one(mode, "ServiceEntry")
            assert se["spec"]["hosts"] == [grpc["service"]]
            assert se["spec"]["endpoints"] == [{"address": "127.0.0.1"}]
            assert se["spec"]["resolution"] == "STATIC"
            assert se["spec"]["ports"][0]["number"] == grpc["port"]


@pytest.mark.parametrize("mode", MODES)
def test_notes_print_the_same_extension_providers(mode):
    notes = rendered(mode)[1]
    block = notes.split("extensionProviders:\n", 1)[1].split("\n\n", 1)[0]
    printed = {p["name"]: p["envoyExtAuthzGrpc"] for p in yaml.safe_load(block)}
    assert printed == mesh_providers(mode)


CENTRAL_MODES = ("ingress", "egress", "ambient", "mesh")


@pytest.mark.parametrize("mode", CENTRAL_MODES)
def test_server_deployment(mode):
    deploy = one(mode, "Deployment", "authz-istio-ext-authz")
    pod = deploy["spec"]["template"]["spec"]
    [server] = pod["containers"]
    env = env_of(server)
    # One Deployment for every caller: no static identity, each Check carries its proxy's.
    assert not {"AUTHZ_WORKLOAD_NAMESPACE", "AUTHZ_WORKLOAD_LABELS"} & set(env)
    assert env["AUTHZ_LISTEN"]["value"] == "0.0.0.0:9000"
    assert env["AUTHZ_POLICIES"]["value"] == "/etc/authz/policies"
    # readiness on the gRPC health service Envoy's port serves
    assert server["readinessProbe"]["grpc"] == {"port": 9000}
    assert server["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    selector = deploy["spec"]["selector"]["matchLabels"]
    assert all(c["labelSelector"]["matchLabels"] == selector for c in pod["topologySpreadConstraints"])
    assert one(mode, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["name"] == deploy["metadata"]["name"]
    assert "replicas" not in deploy["spec"]  # the HPA owns it
    assert one(mode, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
    dr = one(mode, "DestinationRule")
    assert dr["spec"]["host"] == SERVICE_FQDN
    assert dr["spec"]["trafficPolicy"]["connectionPool"]["http"]["maxConcurrentStreams"] > 0


def test_sidecar_local_runs_the_server_next_to_the_app():
    assert objects("sidecar-local", "Service") == []  # no central server in this mode
    app = one("sidecar-local", "Deployment", "httpbin")
    template = app["spec"]["template"]
    containers = {c["name"]: c for c in template["spec"]["containers"]}
    assert set(containers) == {"httpbin", "ext-authz"}
    env = env_of(containers["ext-authz"])
    assert env["AUTHZ_WORKLOAD_KIND"]["value"] == "sidecar"
    assert env["AUTHZ_WORKLOAD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    pod_labels = template["metadata"]["labels"]
    assert env["AUTHZ_WORKLOAD_LABELS"]["value"] == ",".join(f"{k}={v}" for k, v in sorted(pod_labels.items()))
    se_port = one("sidecar-local", "ServiceEntry")["spec"]["ports"][0]["number"]
    assert env["AUTHZ_LISTEN"]["value"] == f"127.0.0.1:{se_port}"
    volumes = {v["name"] for v in template["spec"]["volumes"]}
    assert {m["name"] for m in containers["ext-authz"]["volumeMounts"]} <= volumes


@pytest.mark.parametrize("mode", MODES)
def test_pods_are_hardened(mode):
    for deploy in objects(mode, "Deployment"):
        pod = deploy["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert "limits" in c.get("resources", {}) or c["name"] == "httpbin"
        authz = [c for c in pod["containers"] if c["name"] in ("authz-server", "ext-authz")]
        for c in authz:  # /tmp is the only writable path
            assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])


def test_existing_configmap_replaces_the_inline_policies():
    objs, _ = render({**load_values(MODES["ingress"]), "policies": {"existingConfigMap": "my-policies"}})
    assert not [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-policies")]
    [deploy] = [o for o in objs if o["kind"] == "Deployment"]
    volumes = deploy["spec"]["template"]["spec"]["volumes"]
    assert {"name": "policies", "configMap": {"name": "my-policies"}} in volumes


def test_an_empty_policy_set_is_served_only_when_allowed():
    """The server refuses an empty set unless told; the chart passes that choice through."""
    for allow, expected in ((None, "false"), (True, "true")):
        values = {**load_values(MODES["ingress"]), "policies": {"files": {}}}
        if allow is not None:
            values["policies"]["allowEmpty"] = allow
        objs, _ = render(values)
        [deploy] = [o for o in objs if o["kind"] == "Deployment"]
        [server] = deploy["spec"]["template"]["spec"]["containers"]
        assert env_of(server)["AUTHZ_ALLOW_EMPTY_POLICIES"]["value"] == expected


def test_the_overload_bounds_reach_both_the_server_and_the_sidecar_local_container():
    """What the chart renders is what the server's own settings parser accepts."""
    values = {**load_values(MODES["sidecar-local"]), "server": {"enabled": True,
              "overload": {"maxPendingChecks": 64, "maxQueueDelay": 0.05}}}
    objs, _ = render(values)
    containers = [c for o in objs if o["kind"] == "Deployment"
                  for c in o["spec"]["template"]["spec"]["containers"] if "AUTHZ_POLICIES" in env_of(c)]
    assert len(containers) >= 2
    for container in containers:
        environ = {name: var["value"] for name, var in env_of(container).items() if "value" in var}
        parser = argparse.ArgumentParser(exit_on_error=False)
        add_options(parser, "serve", environ)
        settings = parser.parse_args([])
        assert (settings.max_pending_checks, settings.max_queue_delay) == (64, 0.05)


def test_service_monitor_scrapes_the_metrics_port():
    # ServiceMonitor's CRD (Prometheus Operator) is not vendored: check its wiring only.
    objs, _ = render({"serviceMonitor": {"enabled": True}})
    [sm] = [o for o in objs if o["kind"] == "ServiceMonitor"]
    [svc] = [o for o in objs if o["kind"] == "Service"]
    assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()


def test_timeout_must_be_a_duration_string():
    with pytest.raises(helm_python.HelmError, match="duration"):
        render({"istio": {"provider": {"timeout": "5"}}})


def test_validators_reject_broken_objects():
    """Guards against a vacuous validator: each check must catch a typical mistake."""
    ingress = one("ingress", "AuthorizationPolicy")
    both = {**ingress, "spec": {**ingress["spec"], "targetRefs": [{"kind": "Gateway", "name": "w"}]}}
    assert any("only one of targetRefs or selector" in e for e in validate(both))  # CEL rule
    typo = {**ingress, "spec": {**ingress["spec"], "actions": "CUSTOM"}}
    assert validate(typo)  # unknown field in a CRD kind
    deploy = one("ingress", "Deployment")
    assert validate({**deploy, "spec": {**deploy["spec"], "replica": 2}})  # unknown core field
    provider = {"name": PROVIDER, "envoyExtAuthzGrpc": {"service": SERVICE_FQDN, "port": 9000, "timeout": 5}}
    assert mesh_errors({"extensionProviders": [provider]})  # timeout must be a duration string


# --------------------------------------------------------------------------- per-request identity

IDENTITY = {
    # mode: {EnvoyFilter name: (namespace, context, selector, targetRefs, what the demo kit merges)}
    "ingress": {"authz-istio-ext-authz-identity-ingress": (
        "istio-system", "GATEWAY", {"istio": "ingressgateway"}, None, ec.IdentityMerge("istio-system", "gateway", 1))},
    "egress": {"authz-istio-ext-authz-identity-egress": (
        "istio-system", "GATEWAY", {"istio": "egressgateway"}, None, ec.IdentityMerge("istio-system", "gateway", 0))},
    "mesh": {"authz-istio-ext-authz-identity": (
        "shop", "SIDECAR_INBOUND", None, None, ec.IdentityMerge("shop", "sidecar"))},
    "ambient": {"authz-istio-ext-authz-identity-waypoint": (
        "shop", "WAYPOINT", None, [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "waypoint"}],
        ec.IdentityMerge("shop", "waypoint"))},
    "sidecar-local": {"authz-istio-ext-authz-identity-httpbin": (
        "istio-ext-authz", "SIDECAR_INBOUND", {"app": "httpbin", "version": "v1"}, None,
        ec.IdentityMerge("istio-ext-authz", "sidecar"))},
}


def envoy_filters(mode: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects(mode, "EnvoyFilter")}


@pytest.mark.parametrize("mode", IDENTITY)
def test_every_mode_tells_the_server_who_calls(mode):
    """Each kind of caller gets an EnvoyFilter that MERGEs exactly what the e2e tests' proxies
    carry (IdentityMerge) into Istio's own ext_authz filter."""
    filters = envoy_filters(mode)
    assert set(filters) == set(IDENTITY[mode])
    for name, (namespace, context, selector, target_refs, merge) in IDENTITY[mode].items():
        spec = filters[name]["spec"]
        assert filters[name]["metadata"]["namespace"] == namespace
        assert spec.get("workloadSelector", {}).get("labels") == selector
        assert spec.get("targetRefs") == target_refs
        [patch] = spec["configPatches"]
        assert patch["applyTo"] == "HTTP_FILTER" and patch["match"]["context"] == context
        where = patch["match"]["waypoint"] if context == "WAYPOINT" else patch["match"]["listener"]["filterChain"]
        assert where["filter"] == {"name": "envoy.filters.network.http_connection_manager",
                                   "subFilter": {"name": ec.EXT_AUTHZ_FILTER}}
        assert patch["patch"]["operation"] == "MERGE"
        value = patch["patch"]["value"]
        assert value["name"] == ec.EXT_AUTHZ_FILTER
        assert value["typed_config"]["@type"] == ec.EXT_AUTHZ_TYPE
        assert RenderedMerge(value).patch() == merge.patch()


def test_one_deployment_serves_every_enabled_mode():
    assert [d["metadata"]["name"] for d in objects("full", "Deployment")] == ["authz-istio-ext-authz", "httpbin"]
    env = env_of(one("full", "Deployment", "authz-istio-ext-authz")["spec"]["template"]["spec"]["containers"][0])
    assert not {"AUTHZ_WORKLOAD_NAMESPACE", "AUTHZ_WORKLOAD_LABELS"} & set(env)
    assert set(envoy_filters("full")) == {"authz-istio-ext-authz-identity-ingress", "authz-istio-ext-authz-identity",
                                          "authz-istio-ext-authz-identity-httpbin"}


def test_mesh_targets_share_one_envoyfilter_per_namespace():
    values = {"istio": {"mesh": {"enabled": True, "targets": [
        {"namespace": "a", "selector": {"app": "x"}}, {"namespace": "a", "name": "y", "selector": {"app": "y"}},
        {"namespace": "b"}]}}}
    objs, _ = render(values)
    assert sorted(o["metadata"]["namespace"] for o in objs if o["kind"] == "EnvoyFilter") == ["a", "b"]


def test_a_mesh_target_in_the_root_namespace_is_refused():
    """An EnvoyFilter there would reach every proxy of the mesh with the wrong namespace."""
    with pytest.raises(helm_python.HelmError, match="root namespace"):
        render({"istio": {"mesh": {"enabled": True, "targets": [{"namespace": "istio-system"}]}}})


def test_without_per_request_identity_one_release_serves_one_mode():
    both = {"istio": {"identity": {"enabled": False}, "ingressGateway": {"enabled": True},
                      "egressGateway": {"enabled": True}}}
    with pytest.raises(helm_python.HelmError, match="one static workload identity"):
        render(both)
    objs, _ = render({"istio": {"identity": {"enabled": False}, "ingressGateway": {"enabled": True}}})
    assert not [o for o in objs if o["kind"] == "EnvoyFilter"]
    [deploy] = [o for o in objs if o["kind"] == "Deployment"]
    env = env_of(deploy["spec"]["template"]["spec"]["containers"][0])
    assert (env["AUTHZ_WORKLOAD_KIND"]["value"], env["AUTHZ_WORKLOAD_NAMESPACE"]["value"],
            env["AUTHZ_WORKLOAD_LABELS"]["value"]) == ("gateway", "istio-system", "istio=ingressgateway")


@dataclass(frozen=True)
class RenderedMerge:
    """An EnvoyFilter's rendered MERGE value, applied by the kit as it applies an IdentityMerge."""

    value: dict

    def patch(self) -> ExtAuthz:
        """The typed ``typed_config``: an unknown or misspelt field fails here."""
        return HttpFilter.from_dict(self.value).typed_config.unpack()


@pytest.mark.parametrize("mode", ["ingress", "mesh", "ambient"])
def test_the_merged_filter_is_valid_envoy_configuration(mode, tmp_path):
    """istiod's ext_authz filter with the rendered EnvoyFilter's MERGE applied, in a bootstrap
    real Envoy 1.40 accepts (envoy --mode validate)."""
    [envoy_filter] = envoy_filters(mode).values()
    value = envoy_filter["spec"]["configPatches"][0]["patch"]["value"]
    authz = ec.AuthzSettings(port=9000)
    proxy = ec.Proxy(9901, ec.Workload("w", "shop", {"app": "w"}), authz, merge=RenderedMerge(value))
    [_, merged] = ec.custom_provider_filters(proxy)
    assert merged.typed_config.unpack().grpc_service.envoy_grpc.cluster_name == authz.cluster_name  # istiod's
    config = ec.front_proxy(proxy, listen_port=8080, upstream=ec.Upstream(8000))
    result = envoy_validate(write_config(config, tmp_path / "envoy.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    typo = {**value, "typed_config": {**value["typed_config"], "encode_raw_header": True}}
    with pytest.raises(KeyError, match="encode_raw_header"):
        RenderedMerge(typo).patch()  # the check can fail
