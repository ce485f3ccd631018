"""The gRPC server process: a serving layer around the App, health, signals, graceful stop.

Two serving layers speak standard gRPC on the listen address:

* ``fast`` (default): :mod:`authz_server.grpc_api.fast_server` — Authorization/Check,
  grpc.health.v1.Health/Check, Diagnostics and server reflection — at a fraction of the CPU;
* ``grpcio``: the grpcio asyncio server, adding Health/Watch.

Both layers hold the same limits (:class:`~authz_server.grpc_api.h2_limits.Http2Limits`, from
the settings): the fast layer enforces them itself, grpcio through its channel options. Both
honour each Check's deadline and shed load beyond the worker's admission limits
(:mod:`~authz_server.grpc_api.admission`). Health
turns SERVING only once a policy set is loaded. SIGTERM: health goes NOT_SERVING, the
port stops accepting, in-flight Checks get ``grace_period`` seconds, exit 0. SIGHUP reloads
the policies (a bad set is rejected and the last good one keeps serving).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
from typing import Any, Awaitable, Callable, Protocol

import grpc
from envoy.service.auth.v3 import external_auth_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from authz_server._proto import diagnostics_pb2, diagnostics_pb2_grpc
from authz_server.app import App
from authz_server.grpc_api import admission as adm
from authz_server.grpc_api import h2_frames
from authz_server.grpc_api.diagnostics import Diagnostics, DiagnosticsService, InvalidRequest
from authz_server.grpc_api.fast_server import FastGrpcServer, GrpcError, unary
from authz_server.grpc_api.h2_limits import Http2Limits
from authz_server.grpc_api.servicer import CheckHandler
from authz_server.grpc_api.tls import RotatingCertificates
from authz_server.observability import metrics
from authz_server.startup import StartupError

log = logging.getLogger(__name__)

AUTHORIZATION_SERVICE = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name
DIAGNOSTICS_SERVICE = diagnostics_pb2.DESCRIPTOR.services_by_name["Diagnostics"].full_name
CHECK_PATH = f"/{AUTHORIZATION_SERVICE}/Check"
SERVINGS = ("fast", "grpcio")
TLS_REFRESH_SECONDS = 2.0


class Serving(Protocol):
    async def start(self) -> None: ...
    async def set_serving(self, serving: bool) -> None: ...
    async def stop(self, grace: float) -> None: ...


def limits_from_settings(args: Any) -> Http2Limits:
    """The serving limits from the ``serve`` settings (defaults for any a caller leaves out)."""
    names = {"max_message_bytes": "max_message_bytes", "max_concurrent_streams": "max_concurrent_streams",
             "max_header_list_bytes": "max_header_list_bytes", "max_connections": "max_connections",
             "idle_timeout": "connection_idle_timeout", "min_ping_interval": "min_ping_interval",
             "connection_buffer_bytes": "connection_buffer_bytes", "process_buffer_bytes": "process_buffer_bytes",
             "max_control_frames": "http2_max_control_frames", "max_resets_per_second": "http2_max_resets_per_second",
             "max_continuations": "http2_max_continuations",
             "max_glitches_per_second": "http2_max_glitches_per_second"}
    return Http2Limits(**{field: getattr(args, name) for field, name in names.items() if hasattr(args, name)})


def admission_from_settings(args: Any) -> adm.Admission:
    """The worker's admission control from the ``serve`` settings, counted in the metrics."""
    defaults = adm.OverloadLimits()
    limits = adm.OverloadLimits(getattr(args, "max_pending_checks", defaults.max_pending),
                                getattr(args, "max_queue_delay", defaults.max_queue_delay))
    return adm.Admission(limits, on_refused=lambda reason: metrics.CHECKS_REFUSED.labels(reason).inc(),
                         on_expired=lambda stage: metrics.CHECKS_EXPIRED.labels(stage).inc())


def grpcio_options(limits: Http2Limits) -> list[tuple[str, int]]:
    """The limits as grpc C-core channel arguments (what grpcio can express of them).

    BDP probing is off so windows are not grown to megabytes per stream (C-core still grants a
    stream the rest of the message it announced, so a connection can buffer up to
    ``max_concurrent_streams`` × ``max_message_bytes``); reads are taken in chunks of at most
    64 KiB (C-core's default grows them to megabytes under a flood). PINGs are allowed on idle
    connections at the same interval as on busy ones (grpcio would otherwise allow one per 2 h
    there, too strict for Envoy's ``connection_keepalive``). grpcio has no equivalent of the
    fast layer's per-process buffer cap or its limits on frames that do no work.
    """
    millis = lambda seconds: int(seconds * 1000)  # noqa: E731
    options = [
        ("grpc.so_reuseport", 1),  # several worker processes share the port; the kernel balances
        ("grpc.max_concurrent_streams", limits.max_concurrent_streams),
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.max_metadata_size", limits.max_header_list_bytes),
        ("grpc.absolute_max_metadata_size", limits.max_header_list_bytes),
        ("grpc.max_allowed_incoming_connections", limits.max_connections),
        ("grpc.http2.bdp_probe", 0),
        ("grpc.experimental.tcp_max_read_chunk_size", 64 << 10),
        ("grpc.http2.max_ping_strikes", limits.max_ping_strikes if limits.min_ping_interval else 0),
        ("grpc.http2.min_ping_interval_without_data_ms", millis(limits.min_ping_interval)),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    if limits.idle_timeout > 0:
        options.append(("grpc.max_connection_idle_ms", millis(limits.idle_timeout)))
    return options


class GrpcioServing:
    def __init__(self, app: App, handler: CheckHandler, listen: str, tls: RotatingCertificates | None,
                 limits: Http2Limits, admission: adm.Admission) -> None:
        self.server = grpc.aio.server(options=grpcio_options(limits))
        self.health = health.aio.HealthServicer()
        self.server.add_generic_rpc_handlers((_raw_check(handler, admission),))
        diagnostics_pb2_grpc.add_DiagnosticsServicer_to_server(
            DiagnosticsService(Diagnostics(app.store, app.authorizer, app.context)), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (AUTHORIZATION_SERVICE, DIAGNOSTICS_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        if tls is None:
            self.server.add_insecure_port(listen)
        else:
            self.server.add_secure_port(listen, tls.credentials())

    async def start(self) -> None:
        await self.server.start()

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", AUTHORIZATION_SERVICE):
            await self.health.set(service, status)

    async def stop(self, grace: float) -> None:
        await self.server.stop(grace)


def _raw_check(handler: CheckHandler, admission: adm.Admission) -> grpc.GenericRpcHandler:
    """Check on grpcio with bytes in and out, as the fast layer: grpcio never parses the request,
    so an undecodable CheckRequest reaches the handler and is denied (fail closed), never a gRPC
    error (which Envoy's ``failure_mode_allow`` would turn into an allow).

    Overload: a Check whose deadline (``context.time_remaining()``) has passed when its handler
    starts is not evaluated; beyond the admission limit it is refused at once. grpcio queues
    calls out of sight (its completion queue), so only the count applies here, not the queue
    delay; grpcio cancels a Check that waits past its deadline (counted as expired).
    """
    async def check(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                admission.expired(adm.BEFORE_EVALUATION, context.peer()))
        reason = admission.refusal(0.0)
        if reason is not None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, admission.refused(reason, context.peer()))
        admission.pending += 1
        try:
            # The call's metadata carries the proxy's x-authz-* identity (workload_identity).
            return await handler.check_bytes(request, context.invocation_metadata() or ())
        except asyncio.CancelledError:  # the deadline passed, or the client gave up, while it waited
            admission.expired(adm.WHILE_WAITING, context.peer())
            raise
        finally:
            admission.pending -= 1
    return grpc.method_handlers_generic_handler(AUTHORIZATION_SERVICE, {
        "Check": grpc.unary_unary_rpc_method_handler(check),
    })


class FastServing:
    def __init__(self, app: App, handler: CheckHandler, listen: str, tls: RotatingCertificates | None,
                 limits: Http2Limits, admission: adm.Admission) -> None:
        self.listen = listen
        self.tls = tls
        self.serving = False
        diagnostics = Diagnostics(app.store, app.authorizer, app.context)
        self.ssl_context = tls.ssl_context() if tls else None
        self.server = FastGrpcServer({
            CHECK_PATH: handler.check_bytes,
            f"/{health.SERVICE_NAME}/Check": unary(health_pb2.HealthCheckRequest.FromString, self._health),
            f"/{DIAGNOSTICS_SERVICE}/Explain": unary(diagnostics_pb2.ExplainRequest.FromString,
                                                    _invalid_argument(diagnostics.explain)),
            f"/{DIAGNOSTICS_SERVICE}/PolicyStatus": unary(diagnostics_pb2.PolicyStatusRequest.FromString,
                                                         diagnostics.policy_status),
        }, self.ssl_context, streaming={
            f"/{reflection.SERVICE_NAME}/ServerReflectionInfo": _reflection(
                (AUTHORIZATION_SERVICE, DIAGNOSTICS_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)),
        }, limits=limits, on_limit=lambda limit: metrics.HTTP2_LIMITS.labels(limit).inc(),
            queued=frozenset({CHECK_PATH}), admission=admission)
        self._tls_task: asyncio.Task[None] | None = None

    async def _health(self, request: health_pb2.HealthCheckRequest) -> health_pb2.HealthCheckResponse:
        if request.service not in ("", AUTHORIZATION_SERVICE):
            raise GrpcError(h2_frames.GRPC_NOT_FOUND, f"unknown service {request.service!r}")
        status = health_pb2.HealthCheckResponse.SERVING if self.serving else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)

    async def start(self) -> None:
        await self.server.start(self.listen)
        if self.tls is not None and self.ssl_context is not None:
            self._tls_task = asyncio.create_task(self._refresh_tls(self.tls, self.ssl_context))

    async def _refresh_tls(self, tls: RotatingCertificates, context: ssl.SSLContext) -> None:
        while True:
            await asyncio.sleep(TLS_REFRESH_SECONDS)
            await asyncio.to_thread(tls.refresh, context)

    async def set_serving(self, serving: bool) -> None:
        self.serving = serving

    async def stop(self, grace: float) -> None:
        if self._tls_task is not None:
            self._tls_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tls_task
        await self.server.stop(grace)


def _reflection(services: tuple[str, ...]) -> Callable[[bytes], bytes]:
    """Server reflection for the fast layer: grpcio-reflection's servicer, one message at a time."""
    servicer = reflection.ReflectionServicer(services)

    def answer(data: bytes) -> bytes:
        request = reflection_pb2.ServerReflectionRequest.FromString(data)
        return next(iter(servicer.ServerReflectionInfo(iter([request]), None))).SerializeToString()
    return answer


def _invalid_argument(call: Callable[[Any], Awaitable[Any]]) -> Callable[[Any], Awaitable[Any]]:
    """Map a bad request description to INVALID_ARGUMENT for the fast layer."""
    async def wrapped(request: Any) -> Any:
        try:
            return await call(request)
        except InvalidRequest as exc:
            raise GrpcError(h2_frames.GRPC_INVALID_ARGUMENT, str(exc)) from None
    return wrapped


class AuthzGrpcServer:
    def __init__(self, app: App, listen: str, grace_period: float, tls: RotatingCertificates | None = None,
                 serving: str = "fast") -> None:
        self.app = app
        self.listen = listen
        self.grace_period = grace_period
        handler = CheckHandler(app.authorizer, app.context, app.observe)
        layer = FastServing if serving == "fast" else GrpcioServing
        self.serving: Serving = layer(app, handler, listen, tls, limits_from_settings(app.args),
                                      admission_from_settings(app.args))
        self.serving_name = serving
        self._stopping = asyncio.Event()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stopping.set)
        loop.add_signal_handler(signal.SIGINT, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self._reload()))
        # Policies (and JWKS, within its budget) first, then the port: with SO_REUSEPORT a worker
        # that listened before loading would take connections from its ready siblings and deny
        # their Checks until its policies were in.
        await self.app.start(on_change=self._reload)
        self.app.sync_metrics()
        await self.serving.set_serving(self.app.store.loaded)
        try:
            await self.serving.start()
        except OSError as exc:  # taken since the start-up check (which runs before the workers)
            await self.app.stop()
            raise StartupError(f"--listen {self.listen}: cannot bind: {exc.strerror or exc}") from None
        log.info("gRPC listening on %s (%s serving layer)", self.listen, self.serving_name)
        if not self.app.store.loaded:
            interval = getattr(self.app.args, "reload_interval", 0.0)
            how = f"it is re-read every {interval:g}s" if interval > 0 else "send SIGHUP to reload it"
            log.error("no valid policy set: every Check is denied until one loads (fix %s; %s)",
                      self.app.store.path, how)
        await self._stopping.wait()
        log.info("shutting down: draining in-flight Checks for up to %.1fs", self.grace_period)
        await self.serving.set_serving(False)
        await self.serving.stop(self.grace_period)
        await self.app.stop()
        log.info("stopped")
        return 0

    async def _reload(self) -> None:
        result = await self.app.reload_async()
        if result.ok:
            await self.serving.set_serving(True)
