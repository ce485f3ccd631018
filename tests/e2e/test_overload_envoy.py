"""What a real Envoy 1.40 does when the server sheds load or a Check expires.

The server refuses Checks beyond its admission limit with RESOURCE_EXHAUSTED and answers an
expired one DEADLINE_EXCEEDED (authz_server/grpc_api/admission.py). Envoy's ext_authz filter
treats any gRPC status other than OK as a failed Check — as it treats its own timeout — and applies
``failure_mode_allow`` (Istio's ``failOpen``) or ``status_on_error`` (``statusOnError``, 403 when
unset), without retrying. First with a server that answers one fixed status (so each status is
seen on its own), then with the real server shedding behind Envoy.
"""

from __future__ import annotations

import threading
from concurrent import futures
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from authz_server.demo import envoy_config as ec
from authz_server.demo.client import Reply, request
from authz_server.demo.processes import ProcessGroup, free_port
from authz_server.demo.upstream import EchoUpstream
from tests.http2.test_deadlines import policies_with_jwks, unknown_kid_token
from tests.integration.test_operations import metric, wait_for
from tests.jwt.jwt_helpers import IdP, Keys, _idp_server, idp, keys  # noqa: F401 - fixtures

FRONT = ec.Workload("front", "foo", {"app": "front"})
STATUSES = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class FixedStatusAuthz(external_auth_pb2_grpc.AuthorizationServicer):
    """An Authorization server that fails every Check with one gRPC status, and counts them."""

    def __init__(self) -> None:
        self.status = grpc.StatusCode.RESOURCE_EXHAUSTED
        self.checks = 0
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    def Check(self, request: external_auth_pb2.CheckRequest,  # noqa: N802 - gRPC naming
              context: grpc.ServicerContext) -> external_auth_pb2.CheckResponse:
        with self._lock:
            self.checks += 1
        context.abort(self.status, "shedding")

    def __enter__(self) -> "FixedStatusAuthz":
        self._server.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.stop(grace=None)


def front(group: ProcessGroup, upstream: int, authz: ec.AuthzSettings) -> int:
    port = free_port()
    group.start_envoy(f"front-{port}", ec.front_proxy(ec.Proxy(free_port(), FRONT, authz), listen_port=port,
                                                     upstream=ec.Upstream(upstream)))
    return port


@pytest.fixture(scope="module")
def fixed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FixedStatusAuthz, dict[str, int]]]:
    """The fixed-status server behind three Envoys: fail closed, fail open, statusOnError 503."""
    work = tmp_path_factory.mktemp("overload-envoy")
    with FixedStatusAuthz() as authz, EchoUpstream("app") as app, ProcessGroup(work) as group:
        fronts = {
            "closed": front(group, app.port, ec.AuthzSettings(authz.port)),
            "open": front(group, app.port, ec.AuthzSettings(authz.port, fail_open=True)),
            "503": front(group, app.port, ec.AuthzSettings(authz.port, status_on_error=503)),
        }
        yield authz, fronts


@pytest.mark.parametrize("status", STATUSES, ids=[s.name for s in STATUSES])
def test_envoy_applies_fail_open_or_status_on_error_to_each_shedding_status_and_does_not_retry(
    fixed: tuple[FixedStatusAuthz, dict[str, int]], status: grpc.StatusCode
) -> None:
    authz, fronts = fixed
    authz.status = status
    before = authz.checks
    closed = request(fronts["closed"], "/get")
    assert closed.status == 403 and closed.body == b""  # status_on_error's default: Forbidden
    opened = request(fronts["open"], "/get")
    assert opened.status == 200 and opened.json()["name"] == "app"  # failOpen: let through
    assert request(fronts["503"], "/get").status == 503  # statusOnError
    assert authz.checks - before == 3  # one Check per request: Envoy retries none of them


def test_envoy_behind_the_real_server_when_it_sheds_and_when_a_check_expires(
    tmp_path: Path, idp: IdP, keys: Keys, _idp_server: tuple  # noqa: F811
) -> None:
    """The server takes one Check at a time; one waits (a JWKS refresh that stalls) until Envoy's
    timeout. Meanwhile every other request is refused at once: Envoy answers 403 fail-closed, 200
    fail-open, long before the waiting one's timeout. That one is Envoy's timeout (403), and the
    server stops it (counted as expired)."""
    idp.serve_json("/jwks", keys.jwks("key-1"))
    (tmp_path / "policies.yaml").write_text(policies_with_jwks(idp.url("/jwks")))
    port, metrics_port = free_port(), free_port()
    with EchoUpstream("app") as app, ProcessGroup(tmp_path / "logs") as group:
        group.start_authz_server(tmp_path / "policies.yaml", port, [
            "--workload-namespace", "foo", "--max-pending-checks", "1", "--jwks-ca-bundle", _idp_server[1],
            "--jwks-refresh-min-interval", "0.001", "--metrics-listen", f"127.0.0.1:{metrics_port}"])
        closed = front(group, app.port, ec.AuthzSettings(port, timeout_s=3.0))
        opened = front(group, app.port, ec.AuthzSettings(port, timeout_s=3.0, fail_open=True))
        assert request(closed, "/get").status == 200  # the policy allows, the server is not busy
        idp.routes["/jwks"].delay = 60.0  # the next fetch stalls
        unknown_kid = unknown_kid_token(keys)
        waiting: list[Reply] = []
        waiter = threading.Thread(target=lambda: waiting.append(
            request(closed, "/get", headers={"authorization": f"Bearer {unknown_kid}"}, timeout_s=30)))
        waiter.start()
        wait_for(lambda: idp.count("/jwks") == 2)  # the server waits on the refresh: its one slot taken
        refused = request(closed, "/get")
        let_through = request(opened, "/get")
        assert waiter.is_alive()  # both answered while the waiting Check still waits
        assert refused.status == 403 and let_through.status == 200
        scrape = lambda: request(metrics_port, "/metrics").body.decode()  # noqa: E731
        assert metric(scrape(), "authz_checks_refused_total", reason="pending_limit") == 2
        waiter.join(timeout=30)
        assert [reply.status for reply in waiting] == [403]  # Envoy's own timeout, fail closed
        wait_for(lambda: metric(scrape(), "authz_checks_expired_total", stage="waiting") == 1)
        assert request(closed, "/get").status == 200  # its slot is free again
