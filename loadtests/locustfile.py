"""Locust load test of the authz server's hot path: gRPC ``Check`` directly, and HTTP via Envoy.

Both users run the same weighted mix, each task expecting Istio's answer:

* ``cached``  — one valid token over and over (the verified-token cache) → allow (200 / OK);
* ``fresh``   — the next token of a large pre-minted pool (verification, then cache) → allow;
* ``claim``   — a valid token whose ``group`` claim the policy rejects → 403;
* ``none``    — no Authorization header → no principal → 403;
* ``invalid`` — a token with a broken signature → 401.

With no target configured, the first Locust process starts a local one
(``python -m loadtests.target``: authz-server + Envoy + echo upstream, fresh keys and tokens) and
stops it on exit. Configuration (environment):

``AUTHZ_GRPC_TARGET``        host:port of the server's gRPC listener (GrpcCheckUser)
``AUTHZ_HTTP_TARGET``        base URL of an Envoy calling the server (EnvoyHttpUser; ``--host`` also works)
``AUTHZ_TOKEN_FILE``         allowed tokens, one per line (first = the cached one, rest = the pool)
``AUTHZ_DENIED_TOKEN_FILE``  a valid token the policy denies (403)
``AUTHZ_TOKEN_POOL``         how many pool tokens to use [all in the file]
``AUTHZ_WORKLOAD_LABELS``    destination labels a direct Check carries [app=bench]
``AUTHZ_HOST`` / ``AUTHZ_PATH``  Host and path of the checked request [bench.local, /]
``AUTHZ_MIX``                task weights [cached=10,fresh=3,claim=2,none=1,invalid=1]
``AUTHZ_LOCAL_WORKERS``      worker processes of the local target [1]
``AUTHZ_LOCAL_TOKENS``       allowed tokens the local target pre-mints [2000]
"""

from __future__ import annotations

import itertools
import os
import subprocess
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import grpc
import grpc.experimental.gevent as grpc_gevent
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2
from locust import FastHttpUser, User, between, events, task
from locust.env import Environment
from locust.runners import WorkerRunner

from loadtests.tokens import tampered

grpc_gevent.init_gevent()  # grpcio's own threads would block Locust's gevent loop otherwise

_ALLOW, _FORBIDDEN, _UNAUTHORIZED = 200, 403, 401
_EXPECTED = {"cached": _ALLOW, "fresh": _ALLOW, "claim": _FORBIDDEN, "none": _FORBIDDEN, "invalid": _UNAUTHORIZED}
_DEFAULT_MIX = "cached=10,fresh=3,claim=2,none=1,invalid=1"


def _mix() -> dict[str, int]:
    weights = dict(item.split("=") for item in os.environ.get("AUTHZ_MIX", _DEFAULT_MIX).split(","))
    unknown = set(weights) - set(_EXPECTED)
    if unknown:
        raise ValueError(f"AUTHZ_MIX: unknown tasks {sorted(unknown)}; use {sorted(_EXPECTED)}")
    return {name: int(weight) for name, weight in weights.items()}


class _Tokens:
    """The token files, read once per Locust process; the pool is shared by all its users."""

    def __init__(self) -> None:
        allowed = _lines(os.environ["AUTHZ_TOKEN_FILE"])
        pool_size = int(os.environ.get("AUTHZ_TOKEN_POOL", len(allowed) - 1))
        self.cached = allowed[0]
        self.pool = itertools.cycle(allowed[1 : 1 + pool_size] or allowed[:1])
        self.denied = _lines(os.environ["AUTHZ_DENIED_TOKEN_FILE"])[0]
        self.invalid = tampered(self.cached)

    def for_task(self, name: str) -> str | None:
        return {"cached": self.cached, "claim": self.denied, "invalid": self.invalid, "none": None}.get(
            name, next(self.pool) if name == "fresh" else None
        )


def _lines(path: str) -> list[str]:
    return [line for line in Path(path).read_text().splitlines() if line]


_local_target: subprocess.Popen[str] | None = None
#: the local target's logs and minted tokens; removed when Locust quits
_local_workdir: str | None = None
_tokens: _Tokens | None = None


def tokens() -> _Tokens:
    global _tokens
    if _tokens is None:
        _tokens = _Tokens()
    return _tokens


@events.init.add_listener
def _start_local_target(environment: Environment, **_: object) -> None:
    """No target configured: start ``python -m loadtests.target`` and adopt the env it prints."""
    global _local_target, _local_workdir
    if isinstance(environment.runner, WorkerRunner) or os.environ.get("AUTHZ_GRPC_TARGET"):
        return
    workdir = _local_workdir = tempfile.mkdtemp(prefix="authz-locust-")
    argv = [sys.executable, "-m", "loadtests.target", "--workdir", workdir,
            "--workers", os.environ.get("AUTHZ_LOCAL_WORKERS", "1"),
            "--tokens", os.environ.get("AUTHZ_LOCAL_TOKENS", "2000")]
    _local_target = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    deadline = time.monotonic() + 60
    for line in _local_target.stdout or ():
        if line.strip().startswith("export "):
            name, _, value = line.strip().removeprefix("export ").partition("=")
            os.environ.setdefault(name, value)
        if line.startswith("Ctrl-C") or time.monotonic() > deadline:
            break
    if "AUTHZ_GRPC_TARGET" not in os.environ:
        _local_workdir = None  # keep the logs for the reader
        raise RuntimeError(f"local target did not start; logs in {workdir}")
    if environment.host is None:
        environment.host = os.environ["AUTHZ_HTTP_TARGET"]


@events.quitting.add_listener
def _stop_local_target(**_: object) -> None:
    if _local_target is not None:
        _local_target.terminate()
        _local_target.wait(timeout=15)
    if _local_workdir is not None:
        shutil.rmtree(_local_workdir, ignore_errors=True)


def _weighted(name: str, run: Callable[[User, str], None]) -> Callable[[User], None]:
    def call(user: User) -> None:
        run(user, name)

    call.__name__ = name
    return task(_mix().get(name, 0))(call)


class GrpcCheckUser(User):
    """Calls ``Authorization/Check`` as Envoy would, and reports each call as request_type grpc."""

    wait_time = between(0, 0)

    def on_start(self) -> None:
        self.channel = grpc.insecure_channel(os.environ["AUTHZ_GRPC_TARGET"])
        self.check = external_auth_pb2_grpc.AuthorizationStub(self.channel).Check
        labels = os.environ.get("AUTHZ_WORKLOAD_LABELS", "app=bench")
        self.labels = dict(item.split("=", 1) for item in labels.split(",") if item)

    def on_stop(self) -> None:
        self.channel.close()

    def _request(self, token: str | None) -> external_auth_pb2.CheckRequest:
        headers = {":authority": os.environ.get("AUTHZ_HOST", "bench.local"), ":method": "GET",
                   ":path": os.environ.get("AUTHZ_PATH", "/"), "user-agent": "locust"}
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        http = attribute_context_pb2.AttributeContext.HttpRequest(
            method="GET", host=headers[":authority"], path=headers[":path"], scheme="http",
            protocol="HTTP/1.1", headers=headers,
        )
        return external_auth_pb2.CheckRequest(attributes=attribute_context_pb2.AttributeContext(
            request=attribute_context_pb2.AttributeContext.Request(http=http),
            destination=attribute_context_pb2.AttributeContext.Peer(labels=self.labels),
        ))

    def _run(self, name: str) -> None:
        request = self._request(tokens().for_task(name))
        started = time.perf_counter()
        exception: Exception | None = None
        length = 0
        try:
            response = self.check(request, timeout=5)
            length = response.ByteSize()
            status = _ALLOW if response.status.code == code_pb2.OK else response.denied_response.status.code
            if status != _EXPECTED[name]:
                exception = AssertionError(f"expected {_EXPECTED[name]}, got {status}")
        except grpc.RpcError as exc:
            exception = exc
        self.environment.events.request.fire(
            request_type="grpc", name=name, response_time=(time.perf_counter() - started) * 1000,
            response_length=length, exception=exception, context={},
        )

    cached = _weighted("cached", _run)
    fresh = _weighted("fresh", _run)
    claim = _weighted("claim", _run)
    none = _weighted("none", _run)
    invalid = _weighted("invalid", _run)


class EnvoyHttpUser(FastHttpUser):
    """The same mix through an Envoy front proxy; a deny counts as success when it is expected."""

    wait_time = between(0, 0)
    host = os.environ.get("AUTHZ_HTTP_TARGET")

    def _run(self, name: str) -> None:
        token = tokens().for_task(name)
        headers = {"authorization": f"Bearer {token}"} if token is not None else {}
        path = os.environ.get("AUTHZ_PATH", "/")
        with self.client.get(path, headers=headers, name=name, catch_response=True) as response:
            if response.status_code == _EXPECTED[name]:
                response.success()
            else:
                response.failure(f"expected {_EXPECTED[name]}, got {response.status_code}")

    cached = _weighted("cached", _run)
    fresh = _weighted("fresh", _run)
    claim = _weighted("claim", _run)
    none = _weighted("none", _run)
    invalid = _weighted("invalid", _run)
