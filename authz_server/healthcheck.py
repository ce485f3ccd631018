"""``authz-server health``: is the local server alive? For container health checks.

The Docker ``HEALTHCHECK`` must follow the server's own settings (``AUTHZ_METRICS_LISTEN``,
``AUTHZ_LISTEN``) rather than a port written into the image: it asks ``/healthz`` on the
metrics address, or — with metrics off — the gRPC health service on the listen address.
"""

from __future__ import annotations

import urllib.error
import urllib.request

TIMEOUT_SECONDS = 2.0


def _loopback(listen: str) -> tuple[str, str]:
    """The address to dial for a listen address: a wildcard host means this machine."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return (f"[{host}]" if ":" in host else host), port


def check(metrics_listen: str, listen: str) -> tuple[bool, str]:
    """(healthy, one line saying what was asked and what came back)."""
    if metrics_listen:
        host, port = _loopback(metrics_listen)
        url = f"http://{host}:{port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as reply:
                return reply.status == 200, f"{url}: HTTP {reply.status}"
        except urllib.error.HTTPError as exc:
            return False, f"{url}: HTTP {exc.code}"
        except OSError as exc:
            return False, f"{url}: {getattr(exc, 'reason', exc)}"
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    host, port = _loopback(listen)
    address = f"{host}:{port}"
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=TIMEOUT_SECONDS)
        except grpc.RpcError as exc:
            return False, f"gRPC health at {address}: {exc.code().name}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"gRPC health at {address}: {status}"
