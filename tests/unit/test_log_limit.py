"""Client-caused log lines are rate-limited: a flood of malformed Checks logs a bounded number."""

from __future__ import annotations

import asyncio
import logging

import pytest
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest

from authz_server.authorizer import Authorizer
from authz_server.grpc_api.check_request import RequestContextSettings
from authz_server.grpc_api.servicer import CheckHandler
from authz_server.observability.log_limit import RateLimitedLog


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_burst_per_window_then_a_count_of_what_was_suppressed(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    limited = RateLimitedLog(logging.getLogger("t"), burst=3, interval=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, "t"):
        for n in range(1000):
            limited("bad request %d", n)
        assert [r.getMessage() for r in caplog.records] == ["bad request 0", "bad request 1", "bad request 2"]
        clock.now = 10.0
        limited("bad request again")
    assert [r.getMessage() for r in caplog.records][3:] == [
        "997 similar lines suppressed in the last 10 s", "bad request again"]


def test_a_flood_of_malformed_checks_logs_a_bounded_number_of_lines(caplog: pytest.LogCaptureFixture) -> None:
    """Regression: every malformed or undecodable CheckRequest logged a line (1.4 MB/s)."""
    handler = CheckHandler(Authorizer(lambda: None), RequestContextSettings())  # never reaches the engine

    async def flood() -> None:
        for _ in range(2000):
            await handler.verdict(CheckRequest())  # no method, no path: malformed
            await handler.check_bytes(b"\xff\xff\xff")  # not a protobuf message

    with caplog.at_level(logging.WARNING, "authz_server.grpc_api.servicer"):
        asyncio.run(flood())
    lines = [r for r in caplog.records if r.name == "authz_server.grpc_api.servicer"]
    assert 0 < len(lines) <= 20
