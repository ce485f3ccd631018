"""The async gRPC server: Authorization, Diagnostics, health and reflection on one port.

Health turns SERVING only once a policy set is loaded. SIGTERM: health goes NOT_SERVING, the
port stops accepting, in-flight Checks get ``grace_period`` seconds, exit 0. SIGHUP reloads
the policies (a bad set is rejected and the last good one keeps serving).
"""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from authz_server._proto import diagnostics_pb2, diagnostics_pb2_grpc
from authz_server.app import App
from authz_server.grpc_api.diagnostics import DiagnosticsService
from authz_server.grpc_api.servicer import AuthorizationService
from authz_server.grpc_api.tls import RotatingCertificates

log = logging.getLogger(__name__)

AUTHORIZATION_SERVICE = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name
DIAGNOSTICS_SERVICE = diagnostics_pb2.DESCRIPTOR.services_by_name["Diagnostics"].full_name


class AuthzGrpcServer:
    def __init__(self, app: App, listen: str, grace_period: float, tls: RotatingCertificates | None = None) -> None:
        self.app = app
        self.listen = listen
        self.grace_period = grace_period
        # SO_REUSEPORT lets several worker processes share the port; the kernel balances connections.
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
        self.health = health.aio.HealthServicer()
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
            AuthorizationService(app.authorizer, app.context, app.observe), self.server
        )
        diagnostics_pb2_grpc.add_DiagnosticsServicer_to_server(
            DiagnosticsService(app.store, app.authorizer, app.context), self.server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (AUTHORIZATION_SERVICE, DIAGNOSTICS_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        if tls is None:
            self.port = self.server.add_insecure_port(listen)
        else:
            self.port = self.server.add_secure_port(listen, tls.credentials())
        self._stopping = asyncio.Event()

    async def _set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", AUTHORIZATION_SERVICE):
            await self.health.set(service, status)

    async def run(self) -> int:
        await self._set_serving(False)
        await self.server.start()
        log.info("gRPC listening on %s", self.listen)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stopping.set)
        loop.add_signal_handler(signal.SIGINT, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self._reload()))
        await self.app.start(on_change=self._reload)
        self.app.sync_metrics()
        await self._set_serving(self.app.store.loaded)
        if not self.app.store.loaded:
            log.error("no valid policy set: every Check is denied until one loads (fix it and send SIGHUP)")
        await self._stopping.wait()
        log.info("shutting down: draining in-flight Checks for up to %.1fs", self.grace_period)
        await self._set_serving(False)
        await self.server.stop(self.grace_period)
        await self.app.stop()
        log.info("stopped")
        return 0

    async def _reload(self) -> None:
        result = await self.app.reload_async()
        if result.ok:
            await self._set_serving(True)
