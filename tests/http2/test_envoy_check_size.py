"""How big a CheckRequest does a real Envoy send? The default --max-message-bytes must hold it.

Measured with Envoy 1.40 at its default header limits (``max_request_headers_kb`` 60 KiB) and with
the request body included as Istio's ``includeRequestBodyInCheck`` does (``with_request_body``,
here 64 KiB, as a string or packed as bytes): ≈124 KB. The default (256 KiB) holds it with a body
of up to 128 KiB; such a Check passes through Envoy to both serving layers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from envoy_data_plane.envoy.extensions.filters.http.ext_authz.v3 import BufferSettings

from authz_server.demo import envoy_config as ec
from authz_server.demo.client import request
from authz_server.demo.processes import ProcessGroup, free_port
from authz_server.demo.upstream import EchoUpstream
from authz_server.grpc_api.h2_limits import Http2Limits
from tests.e2e.conftest import TEST_ID_HEADER, RecordingAuthz
from tests.http2.conftest import ALLOW_ALL, LAYERS

BODY_LIMIT = 64 << 10
#: just under Envoy's 60 KiB default for the whole request header map
HEADERS = {f"x-filler-{n:02d}": "h" * 1000 for n in range(57)}
FRONT = ec.Workload("front", "foo", {"app": "front"})


def front_proxy(group: ProcessGroup, authz_port: int, upstream: int, pack_as_bytes: bool) -> int:
    port = free_port()
    body = BufferSettings(max_request_bytes=BODY_LIMIT, allow_partial_message=True, pack_as_bytes=pack_as_bytes)
    authz = ec.AuthzSettings(authz_port, include_request_body_in_check=body)
    config = ec.front_proxy(ec.Proxy(free_port(), FRONT, authz), listen_port=port, upstream=ec.Upstream(upstream))
    group.start_envoy(f"front-{port}", config)
    return port


@pytest.mark.parametrize("pack_as_bytes", [False, True], ids=["body as string", "body as bytes"])
def test_envoys_largest_default_check_request_fits_the_default_limit(tmp_path: Path, pack_as_bytes: bool) -> None:
    with RecordingAuthz() as recorder, EchoUpstream("app") as app, ProcessGroup(tmp_path / "logs") as group:
        front = front_proxy(group, recorder.port, app.port, pack_as_bytes)
        test_id = f"size-{pack_as_bytes}"
        reply = request(front, "/upload", method="POST", headers={TEST_ID_HEADER: test_id, **HEADERS},
                        body=b"b" * (2 * BODY_LIMIT))
        assert reply.status == 200
        (check,) = recorder.checks_for(test_id)
    http = check.attributes.request.http
    assert len(http.body or http.raw_body) == BODY_LIMIT  # the body, cut at maxRequestBytes
    size = check.ByteSize()
    print(f"largest CheckRequest from Envoy (pack_as_bytes={pack_as_bytes}): {size} bytes")
    limit = Http2Limits().max_message_bytes
    assert size < limit
    assert size - BODY_LIMIT + (128 << 10) < limit  # bodies up to 128 KiB fit too


@pytest.mark.parametrize("layer", LAYERS)
def test_such_a_check_passes_through_envoy_to_the_server(tmp_path: Path, layer: str) -> None:
    (tmp_path / "policies.yaml").write_text(ALLOW_ALL)
    port = free_port()
    with EchoUpstream("app") as app, ProcessGroup(tmp_path / "logs") as group:
        group.start_authz_server(tmp_path / "policies.yaml", port, ["--serving", layer, "--workload-namespace", "foo"])
        front = front_proxy(group, port, app.port, pack_as_bytes=False)
        reply = request(front, "/upload", method="POST", headers=HEADERS, body=b"b" * (2 * BODY_LIMIT))
    assert reply.status == 200
