"""Every Envoy config the project generates — each role of the demo mesh, each benchmark variant,
the e2e kit's front proxies — is built from envoy-data-plane's typed Envoy API, and real Envoy 1.40
accepts it (``envoy --mode validate``: the whole bootstrap parsed, every filter, transport socket
and protocol option unpacked from its ``Any`` and built). The package's classes of every message
those configs use agree field by field with the descriptors compiled into that Envoy binary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import betterproto2
import pytest
from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap
from envoy_data_plane.envoy.extensions.filters.http.ext_authz.v3 import BufferSettings
from envoy_data_plane.google.protobuf import Any
from envoy_data_plane.message_pool import default_message_pool
from google.protobuf import descriptor_pb2

from authz_server.demo import envoy_config as ec
from authz_server.demo.envoy_api import to_dict, write_config
from authz_server.demo.pki import issue_workload_cert
from authz_server.demo.processes import envoy_validate
from authz_server.demo.topology import SERVER_SIDECARS, mesh_configs
from loadtests import tokens, variants

from .envoy_descriptors import envoy_executable, envoy_messages
from .jwt_parity import native_jwt_filter, native_proxy
from .test_jwt_parity_envoy import RULES

ADMIN, LISTEN, AUTHZ, APP = 9901, 8080, 9000, 8000  # validation binds nothing
FRONT = ec.Workload("front", "foo", {"app": "front"})

#: fields of Envoy 1.40 that envoy-data-plane 2.2.0 lacks, on the messages the configs use; none is
#: used, and none can be until the package catches up (then this list shrinks and the test says so)
MISSING_IN_PACKAGE = {
    "envoy.config.cluster.v3.Cluster": {"stats_matcher", "queuing_policies"},
    "envoy.config.listener.v3.Listener": {"stats_matcher"},
    "envoy.config.route.v3.Route": {"route_specifiers"},
    "envoy.config.route.v3.RouteConfiguration": {"route_specifiers"},
    "envoy.config.route.v3.VirtualHost": {"route_specifiers"},
    "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz": {"clear_route_cache_headers", "emit_client_span"},
    "envoy.extensions.filters.http.jwt_authn.v3.JwtClaimToHeader": {"claim_path"},
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager": {
        "record_route_resolution_stats"},
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager.SetCurrentClientCertDetails": {
        "issuer"},
    "envoy.extensions.transport_sockets.tls.v3.TlsCertificate": {"tls_params"},
}


def generated_configs(workdir: Path) -> dict[str, Bootstrap]:
    """One config per role and variant, as the demo, the e2e tests and the benchmark build them."""
    mesh, by_process = mesh_configs(
        workdir / "pki", ec.AuthzSettings(port=AUTHZ), apps={name: APP for name in SERVER_SIDECARS},
        external_hosts={"api.external.example": APP},
    )
    configs = {f"mesh/{name}": config for name, config in by_process.items()}
    key = tokens.SigningKey.generate()
    for variant in variants.standard_variants(workers=2):
        configs[f"bench/{variant.name}"] = variants.envoy_config(
            variant, listen_port=LISTEN, admin_port=ADMIN, authz_port=AUTHZ, jwks=key.jwks)
    [server_w1] = [v for v in variants.standard_variants(workers=1) if v.name == "server-w1"]
    configs["bench/server-w1 with upstream"] = variants.envoy_config(
        server_w1, listen_port=LISTEN, admin_port=ADMIN, authz_port=AUTHZ, upstream=ec.Upstream(APP))
    configs["parity/native jwt_authn"] = native_proxy(ADMIN, LISTEN, APP, native_jwt_filter(RULES, json.loads(key.jwks)))
    tls = ec.UpstreamTls(mesh.ca.cert_path, "authz.local", issue_workload_cert(mesh.ca, "spiffe://cluster.local/ns/foo/sa/front"))
    fronts = {
        "no authz": ec.Proxy(ADMIN, FRONT, None),
        "authz over TLS, no pool caps": ec.Proxy(ADMIN, FRONT, ec.AuthzSettings(
            AUTHZ, tls=tls, max_concurrent_streams=None, max_requests_per_connection=None),
            merge=ec.IdentityMerge("foo", "sidecar")),
        "request body in Check": ec.Proxy(ADMIN, FRONT, ec.AuthzSettings(AUTHZ, include_request_body_in_check=BufferSettings(
            max_request_bytes=65536, allow_partial_message=True, pack_as_bytes=True))),
        "fail open": ec.Proxy(ADMIN, FRONT, ec.AuthzSettings(AUTHZ, fail_open=True)),
        "status on error 503": ec.Proxy(ADMIN, FRONT, ec.AuthzSettings(AUTHZ, status_on_error=503)),
        "waypoint merge": ec.Proxy(ADMIN, FRONT, ec.AuthzSettings(AUTHZ), merge=ec.IdentityMerge("foo", "waypoint")),
    }
    for name, proxy in fronts.items():
        configs[f"front/{name}"] = ec.front_proxy(proxy, listen_port=LISTEN, upstream=ec.Upstream(APP))
    return configs


@pytest.fixture(scope="module")
def configs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Bootstrap]:
    return generated_configs(tmp_path_factory.mktemp("envoy-configs"))


def test_the_configs_cover_every_role_and_variant(configs: dict[str, Bootstrap]) -> None:
    mesh = {name for name in configs if name.startswith("mesh/")}
    assert mesh == {"mesh/httpbin-sidecar", "mesh/admin-api-sidecar", "mesh/legacy-sidecar", "mesh/egress-gateway",
                    "mesh/sleep-sidecar", "mesh/ingress-gateway", "mesh/load-balancer"}
    assert {f"bench/{v.name}" for v in variants.standard_variants(workers=2)} < set(configs)


def test_real_envoy_accepts_every_generated_config(configs: dict[str, Bootstrap], tmp_path: Path) -> None:
    refused = {}
    for index, (name, config) in enumerate(configs.items()):
        result = envoy_validate(write_config(config, tmp_path / f"{index}.yaml"))
        if result.returncode != 0:
            refused[name] = (result.stdout + result.stderr)[-1000:]
    assert not refused


def test_envoy_refuses_a_field_it_does_not_know(configs: dict[str, Bootstrap], tmp_path: Path) -> None:
    """The validation can fail: a misspelt ext_authz field, slipped into the YAML past the typed
    builders (which would refuse it), inside the HCM's packed ``typed_config``."""
    config = to_dict(configs["mesh/httpbin-sidecar"])
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    [ext_authz] = [f for f in hcm["http_filters"] if f["name"] == ec.EXT_AUTHZ_FILTER]
    ext_authz["typed_config"]["encode_raw_header"] = True
    path = tmp_path / "typo.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    result = envoy_validate(path)
    assert result.returncode != 0 and "encode_raw_header" in result.stdout + result.stderr


def test_the_packages_classes_agree_with_envoy_1_40(configs: dict[str, Bootstrap]) -> None:
    """For every message the configs use: each field the package declares has Envoy 1.40's name,
    number, type, cardinality and oneof, and the 1.40 fields it lacks are the known ones."""
    envoy = envoy_messages(envoy_executable())
    used = {type(message) for config in configs.values() for message in _messages(config)}
    disagreements, missing = [], {}
    for cls in used:
        name = default_message_pool.type_to_url[cls].rpartition("/")[2]
        if not name.startswith("envoy."):
            continue
        assert name in envoy, f"{name} is not a message of this Envoy"
        declared = {f.number: f for f in envoy[name].field}
        for field_name, meta in cls._betterproto.meta_by_field_name.items():
            field = declared.get(meta.number)
            if field is None or _shape(field, envoy) != (field_name, meta.proto_type, meta.repeated, bool(meta.group)):
                disagreements.append(f"{name}.{field_name} = {meta.number}: Envoy has {field}")
        known = {meta.number for meta in cls._betterproto.meta_by_field_name.values()}
        if lacking := {f.name for f in envoy[name].field if f.number not in known}:
            missing[name] = lacking
    assert not disagreements
    assert missing == MISSING_IN_PACKAGE


def _shape(field: descriptor_pb2.FieldDescriptorProto, envoy: dict) -> tuple[str, str, bool, bool]:
    """A 1.40 field as betterproto2 describes one: name, proto type (maps apart), repeated, in a oneof."""
    kind = descriptor_pb2.FieldDescriptorProto.Type.Name(field.type).removeprefix("TYPE_").lower()
    entry = envoy.get(field.type_name.lstrip("."))
    is_map = entry is not None and entry.options.map_entry
    repeated = field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED and not is_map
    in_oneof = field.HasField("oneof_index") and not field.proto3_optional
    return field.name, "map" if is_map else kind, repeated, in_oneof


def _messages(message: betterproto2.Message) -> Iterator[betterproto2.Message]:
    """*message* and every message set inside it, packed ``Any`` contents included."""
    if isinstance(message, Any):
        message = message.unpack()
    yield message
    for name in message._betterproto.sorted_field_names:
        value = getattr(message, name)
        values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
        for item in values:
            if isinstance(item, betterproto2.Message):
                yield from _messages(item)
