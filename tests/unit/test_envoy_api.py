"""The kit's typed Envoy configs: built from envoy-data-plane's classes, so a wrong field or value
fails when a config is built, and an EnvoyFilter MERGE applied with protobuf's merge semantics."""

from __future__ import annotations

from datetime import timedelta

import pytest
import yaml
from envoy_data_plane.envoy.config.bootstrap.v3 import Bootstrap
from envoy_data_plane.envoy.config.core.v3 import GrpcService, GrpcServiceEnvoyGrpc, GrpcServiceGoogleGrpc, HeaderValue
from envoy_data_plane.envoy.extensions.filters.http.ext_authz.v3 import ExtAuthz
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import HttpConnectionManager, HttpFilter
from pydantic import ValidationError

from authz_server.demo import envoy_config as ec
from authz_server.demo.envoy_api import merge_patch, to_dict, write_config

FRONT = ec.Workload("front", "foo", {"app": "front"})


def _front(authz: ec.AuthzSettings | None, merge: ec.IdentityMerge | None = None) -> Bootstrap:
    return ec.front_proxy(ec.Proxy(9901, FRONT, authz, merge=merge), listen_port=8080, upstream=ec.Upstream(8000))


def _http_filters(config: Bootstrap) -> list[HttpFilter]:
    [listener] = config.static_resources.listeners
    hcm = listener.filter_chains[0].filters[0].typed_config.unpack()
    assert isinstance(hcm, HttpConnectionManager)
    return hcm.http_filters


def test_a_wrong_value_fails_when_the_config_is_built() -> None:
    with pytest.raises(ValidationError, match="port_value"):
        _front(ec.AuthzSettings(port=-1))
    with pytest.raises(ValidationError, match="port_value"):
        _front(ec.AuthzSettings(port="nine thousand"))  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="address"):
        _front(ec.AuthzSettings(port=9000, host=127001))  # type: ignore[arg-type]


def test_a_misspelt_field_fails_when_read() -> None:
    with pytest.raises(KeyError, match="encode_raw_header"):
        ExtAuthz.from_dict({"encode_raw_header": True})
    with pytest.raises(ValidationError, match="encode_raw_header"):
        ExtAuthz(encode_raw_header=True)  # type: ignore[call-arg]


def test_the_identity_merge_lands_on_istiods_filter() -> None:
    authz = ec.AuthzSettings(port=9000)
    rbac, ext_authz = _http_filters(_front(authz, ec.IdentityMerge("foo", "gateway", 2)))[:2]
    assert rbac.name == "envoy.filters.http.rbac" and ext_authz.name == ec.EXT_AUTHZ_FILTER
    config = ext_authz.typed_config.unpack()
    assert ext_authz.typed_config.type_url == ec.EXT_AUTHZ_TYPE
    assert config.grpc_service.envoy_grpc.cluster_name == authz.cluster_name  # istiod's, kept
    assert config.grpc_service.timeout == timedelta(seconds=2)
    assert config.filter_enabled_metadata.filter == "envoy.filters.http.rbac"
    assert (config.encode_raw_headers, config.include_tls_session, config.bootstrap_metadata_labels_key) == (
        True, True, ec.LABELS_KEY)
    assert [(h.key, h.value) for h in config.grpc_service.initial_metadata] == [
        ("x-authz-workload-namespace", "foo"), ("x-authz-workload-kind", "gateway"),
        ("x-authz-num-trusted-proxies", "2")]


def test_without_authz_the_only_filter_is_the_router() -> None:
    [router] = _http_filters(_front(None))
    assert router.name == "envoy.filters.http.router" and isinstance(router.typed_config.unpack(), Router)
    assert [c.name for c in _front(None).static_resources.clusters] == ["app"]


def test_merge_follows_protobuf_semantics() -> None:
    base = ExtAuthz(
        failure_mode_allow=True,
        stat_prefix="base",
        grpc_service=GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name="c"), timeout=timedelta(seconds=2),
                                 initial_metadata=[HeaderValue(key="a", value="1")]),
    )
    patch = ExtAuthz(
        stat_prefix="patched",
        grpc_service=GrpcService(initial_metadata=[HeaderValue(key="b", value="2")]),
    )
    merged = merge_patch(base, patch)
    assert merged.stat_prefix == "patched"  # scalar set in the patch: replaced
    assert merged.failure_mode_allow is True  # not set in the patch (proto3 default): kept
    assert merged.grpc_service.envoy_grpc.cluster_name == "c"  # message: merged field by field
    assert merged.grpc_service.timeout == timedelta(seconds=2)
    assert [h.key for h in merged.grpc_service.initial_metadata] == ["a", "b"]  # repeated: appended


def test_merge_replaces_a_oneof_member_and_map_entries() -> None:
    base = GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name="c"))
    merged = merge_patch(base, GrpcService(google_grpc=GrpcServiceGoogleGrpc(target_uri="t", stat_prefix="s")))
    assert merged.envoy_grpc is None and merged.google_grpc.target_uri == "t"
    config = _front(ec.AuthzSettings(port=9000))
    [cluster] = [c for c in config.static_resources.clusters if c.name.startswith("outbound|")]
    options = cluster.typed_extension_protocol_options
    patched = merge_patch(cluster, type(cluster)(typed_extension_protocol_options={"x": options[next(iter(options))]}))
    assert set(patched.typed_extension_protocol_options) == {*options, "x"}


def test_merge_of_an_any_merges_its_contents_and_refuses_another_type() -> None:
    filters = _http_filters(_front(ec.AuthzSettings(port=9000)))
    ext_authz = filters[1]
    merged = merge_patch(ext_authz, ec.http_filter(ec.EXT_AUTHZ_FILTER, ExtAuthz(encode_raw_headers=True)))
    config = merged.typed_config.unpack()
    assert config.encode_raw_headers and config.grpc_service.envoy_grpc.cluster_name.startswith("outbound|")
    with pytest.raises(ValueError, match="cannot merge .*Router into .*ExtAuthz"):
        merge_patch(ext_authz, ec.http_filter(ec.EXT_AUTHZ_FILTER, Router()))
    with pytest.raises(TypeError):
        merge_patch(ext_authz.typed_config, ext_authz)


def test_written_yaml_is_envoys_snake_case_json_with_typed_configs(tmp_path) -> None:
    config = _front(ec.AuthzSettings(port=9000), ec.IdentityMerge("foo", "sidecar"))
    path = write_config(config, tmp_path / "e.yaml")
    written = yaml.safe_load(path.read_text())
    assert written == to_dict(config)
    assert written["node"]["metadata"] == {"NAMESPACE": "foo", "WORKLOAD_NAME": "front", "LABELS": {"app": "front"}}
    hcm = written["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["@type"].endswith("http_connection_manager.v3.HttpConnectionManager")
    ext_authz = hcm["http_filters"][1]["typed_config"]
    assert ext_authz["encode_raw_headers"] is True and ext_authz["grpc_service"]["timeout"] == "2s"
    assert "&id" not in path.read_text()  # no YAML anchors: every repeated part spelled out
