"""Deadlines and admission in the fast layer, driven turn by turn in-process with a fake clock.

Each rule of issue 15 as a property that does not depend on the machine's speed: the server's
clock is a variable the test moves, and a handler "costs" time by moving it, so which Checks are
evaluated, answered DEADLINE_EXCEEDED or refused RESOURCE_EXHAUSTED is exact.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from authz_server.grpc_api import admission as adm
from authz_server.grpc_api.fast_server import QUEUE_SLICE, FastGrpcServer, Headers
from loadtests import h2_attacks as a
from tests.http2.test_fast_layer_mechanics import ECHO, block, connect, turns

CHECK = a.CHECK_PATH
DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, INTERNAL = "4", "8", "13"


class Clock:
    """The server's clock: moves only when the test (or a handler's simulated cost) moves it."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Harness:
    """A fast server (not listening) whose Check handler records what it evaluated."""

    def __init__(self, clock: Clock, cost: float = 0.0, max_pending: int = 1000, max_queue_delay: float = 0.05) -> None:
        self.clock = clock
        self.cost = cost
        self.evaluated: list[bytes] = []
        self.refused: list[str] = []
        self.expired: list[str] = []
        self.gate: asyncio.Future[None] | None = None
        self.admission = adm.Admission(adm.OverloadLimits(max_pending, max_queue_delay),
                                       on_refused=self.refused.append, on_expired=self.expired.append)

    async def check(self, data: bytes, headers: Headers) -> bytes:
        if self.gate is not None:  # waits, as a Check does on a JWKS fetch
            await self.gate
        self.evaluated.append(data)
        self.clock.now += self.cost  # what evaluating it took
        return data

    def server(self) -> FastGrpcServer:
        return FastGrpcServer({CHECK: self.check, ECHO: self.check}, queued=frozenset({CHECK}),
                              admission=self.admission, clock=self.clock)


def request(stream_id: int, message: bytes, timeout: str | None = None, path: str = CHECK, end: bool = True) -> bytes:
    extra = (("grpc-timeout", timeout),) if timeout is not None else ()
    headers = a.frame(a.HEADERS, a.END_HEADERS, stream_id, block(a.request_headers(path, *extra)))
    return headers + (a.frame(a.DATA, a.END_STREAM if end else 0, stream_id, a.grpc_message(message)) if end else b"")


def run(scenario: Callable[[Harness], Awaitable[None]], **settings: Any) -> None:
    async def main() -> None:
        await scenario(Harness(Clock(), **settings))
    asyncio.run(main())


def test_a_check_whose_deadline_passed_before_its_evaluation_is_answered_deadline_exceeded_unevaluated() -> None:
    async def scenario(h: Harness) -> None:
        connection, transport = connect(h.server())
        connection.data_received(request(1, b"on time", "1S"))
        connection.data_received(request(3, b"zero", "0m"))  # grpc-go accepts 0: already past
        connection.data_received(request(5, b"", "10m", end=False))  # headers now, the body late
        h.clock.now += 0.011
        connection.data_received(a.frame(a.DATA, a.END_STREAM, 5, a.grpc_message(b"late body")))
        connection.data_received(request(7, b"no deadline"))
        got = transport.received
        assert [got.grpc_status(s) for s in (1, 3, 5, 7)] == ["0", DEADLINE_EXCEEDED, DEADLINE_EXCEEDED, "0"]
        assert h.evaluated == [b"on time", b"no deadline"]
        assert h.expired == [adm.BEFORE_EVALUATION] * 2 and h.admission.pending == 0
    run(scenario)


def test_a_deadline_applies_to_methods_outside_the_queue_too() -> None:
    async def scenario(h: Harness) -> None:
        connection, transport = connect(h.server())
        connection.data_received(request(1, b"x", "0n", path=ECHO))
        assert transport.received.grpc_status(1) == DEADLINE_EXCEEDED and h.evaluated == []
    run(scenario)


def test_a_malformed_grpc_timeout_is_a_protocol_error_as_grpc_answers_it() -> None:
    """grpc-go: HTTP 400, status INTERNAL; the spec allows 1-8 digits and one of H M S m u n."""
    async def scenario(h: Harness) -> None:
        connection, transport = connect(h.server())
        bad = ["", "S", "1", "1s", "1.5S", "-1S", "+1S", "123456789m", "1 S", "١S", "0x1S"]
        for n, value in enumerate(bad):
            connection.data_received(request(2 * n + 1, b"x", value))
        for n, value in enumerate(bad):
            stream = 2 * n + 1
            assert transport.received.grpc_status(stream) == INTERNAL, value
            assert transport.received.http_status(stream) == "400", value
            assert "grpc-timeout" in (transport.received.header(stream, "grpc-message") or ""), value
        assert h.evaluated == []
        good = ["12345678n", "1H", "1M", "5S", "250m", "999u"]
        for n, value in enumerate(good, start=len(bad)):
            connection.data_received(request(2 * n + 1, b"ok", value))
            assert transport.received.grpc_status(2 * n + 1) == "0", value
    run(scenario)


def test_fresh_checks_are_evaluated_and_expired_ones_cost_nothing_in_the_same_read() -> None:
    """One read brings 20 Checks; each evaluation takes 10 ms. Those whose 25 ms deadline passes
    while the earlier ones are evaluated are answered at once, unevaluated, and the fresh ones
    behind them (1 s) are all evaluated: expired work never delays them."""
    async def scenario(h: Harness) -> None:
        connection, transport = connect(h.server())
        short = [request(2 * n + 1, b"short-%d" % n, "25m") for n in range(10)]
        fresh = [request(2 * n + 21, b"fresh-%d" % n, "1S") for n in range(10)]
        connection.data_received(b"".join(short + fresh))
        await turns(40)
        got = transport.received
        assert h.evaluated == [b"short-0", b"short-1", b"short-2", *(b"fresh-%d" % n for n in range(10))]
        assert [got.grpc_status(2 * n + 1) for n in range(10)] == ["0"] * 3 + [DEADLINE_EXCEEDED] * 7
        assert all(got.grpc_status(2 * n + 21) == "0" for n in range(10))
        assert h.expired == [adm.BEFORE_EVALUATION] * 7 and h.admission.pending == 0
    run(scenario, cost=0.010)


def test_queued_work_is_evaluated_in_slices_with_reads_in_between() -> None:
    """A queue longer than a slice is not evaluated within one read: the next read is handled
    (and the Check it brings taken on) before the rest of the queue."""
    async def scenario(h: Harness) -> None:
        server = h.server()
        first, _ = connect(server)
        per_slice = round(QUEUE_SLICE / h.cost)
        first.data_received(b"".join(request(2 * n + 1, b"a%d" % n, "1S") for n in range(5 * per_slice)))
        assert len(h.evaluated) == per_slice and len(server.queue) == 4 * per_slice
        second, transport = connect(server)
        second.data_received(request(1, b"b", "1S"))
        assert transport.received.grpc_status(1) is None and server.queue[-1][1] is second  # taken, queued
        await turns(10)
        assert transport.received.grpc_status(1) == "0" and len(h.evaluated) == 5 * per_slice + 1
    run(scenario, cost=0.001)


def test_beyond_the_pending_limit_checks_are_refused_at_once_with_resource_exhausted() -> None:
    async def scenario(h: Harness) -> None:
        h.gate = asyncio.get_running_loop().create_future()
        connection, transport = connect(h.server())
        connection.data_received(b"".join(request(2 * n + 1, b"%d" % n, "5S") for n in range(3)))
        got = transport.received
        assert got.grpc_status(5) == RESOURCE_EXHAUSTED and got.grpc_status(1) is got.grpc_status(3) is None
        assert "2 Checks already in progress or queued (limit 2)" in (got.header(5, "grpc-message") or "")
        assert h.refused == [adm.PENDING_LIMIT] and h.admission.pending == 2
        connection.data_received(request(7, b"health is not limited", path=ECHO))  # outside the queue
        h.gate.set_result(None)
        await turns(5)
        assert [got.grpc_status(s) for s in (1, 3, 7)] == ["0", "0", "0"] and h.admission.pending == 0
        connection.data_received(request(9, b"again", "5S"))  # the limit freed up
        await turns(2)
        assert got.grpc_status(9) == "0" and h.refused == [adm.PENDING_LIMIT]
    run(scenario, max_pending=2)


def test_a_burst_is_taken_on_up_to_the_work_the_delay_bound_allows_and_the_rest_refused() -> None:
    """The wait ahead of a new Check is the queue times the recent cost per Check: of a burst of
    20 Checks of 10 ms, those that would wait up to 50 ms are taken on, the rest refused at once."""
    async def scenario(h: Harness) -> None:
        connection, transport = connect(h.server())
        for n in range(30):  # one at a time: the moving average learns the cost, 10 ms
            connection.data_received(request(2 * n + 1, b"warm", "5S"))
        cost = 0.010 * (1 - 0.9 ** 30)
        assert max(k for k in range(20) if k * cost <= 0.050) == 5
        burst = range(61, 101, 2)
        connection.data_received(b"".join(request(stream, b"burst", "5S") for stream in burst))
        await turns(20)
        statuses = [transport.received.grpc_status(stream) for stream in burst]
        assert statuses == ["0"] * 6 + [RESOURCE_EXHAUSTED] * 14
        assert h.refused == [adm.QUEUE_DELAY] * 14
    run(scenario, cost=0.010)


def test_while_the_queue_is_behind_by_more_than_the_delay_bound_new_checks_are_refused() -> None:
    async def scenario(h: Harness) -> None:
        server = h.server()
        busy, busy_transport = connect(server)
        busy.data_received(b"".join(request(2 * n + 1, b"q%d" % n, "5S") for n in range(20)))  # 200 ms of work
        assert len(server.queue) == 19
        h.clock.now += 0.060  # the oldest queued Check has now waited 70 ms > 50 ms
        other, transport = connect(server)
        other.data_received(request(1, b"late", "5S"))
        assert transport.received.grpc_status(1) == RESOURCE_EXHAUSTED and h.refused == [adm.QUEUE_DELAY]
        assert "wait about 70 ms in the queue (limit 50 ms)" in (transport.received.header(1, "grpc-message") or "")
        await turns(40)
        assert all(busy_transport.received.grpc_status(2 * n + 1) == "0" for n in range(20))  # taken: served
        other.data_received(request(3, b"caught up", "5S"))
        await turns(2)
        assert transport.received.grpc_status(3) == "0"
    run(scenario, cost=0.010)


def test_a_waiting_check_past_its_deadline_is_not_resumed_and_fresh_waiters_are() -> None:
    """Checks waiting on one JWKS fetch are woken together; those whose deadline passed meanwhile
    are answered DEADLINE_EXCEEDED without going on, the fresh ones go on."""
    async def scenario(h: Harness) -> None:
        h.gate = asyncio.get_running_loop().create_future()
        connection, transport = connect(h.server())
        connection.data_received(request(1, b"short", "20S") + request(3, b"long", "60S"))
        assert h.admission.pending == 2
        h.clock.now += 30  # past the first one's deadline; its timer (real time) has not fired yet
        h.gate.set_result(None)
        await turns(5)
        got = transport.received
        assert got.grpc_status(1) == DEADLINE_EXCEEDED and got.grpc_status(3) == "0"
        assert h.evaluated == [b"long"] and h.expired == [adm.WHILE_WAITING] and h.admission.pending == 0
    run(scenario)


def test_a_waiting_check_is_stopped_at_its_deadline_and_its_slot_freed() -> None:
    async def scenario(h: Harness) -> None:
        h.gate = asyncio.get_running_loop().create_future()  # never resolved: an IdP that stalls
        connection, transport = connect(h.server())
        connection.data_received(request(1, b"stalled", "50m"))
        assert h.admission.pending == 1
        for _ in range(200):  # its timer is real time: 50 ms
            await asyncio.sleep(0.01)
            if transport.received.grpc_status(1):
                break
        assert transport.received.grpc_status(1) == DEADLINE_EXCEEDED
        assert h.evaluated == [] and h.expired == [adm.WHILE_WAITING] and h.admission.pending == 0
    run(scenario)


def test_a_check_reset_by_the_client_is_dropped_queued_or_waiting() -> None:
    """Envoy resets a Check at its timeout: a queued one is never evaluated, a waiting one stops."""
    async def scenario(h: Harness) -> None:
        server = h.server()
        busy, _ = connect(server)
        busy.data_received(b"".join(request(2 * n + 1, b"w%d" % n, "5S") for n in range(2)))  # one slice each
        connection, transport = connect(server)
        connection.data_received(request(1, b"queued", "5S") + a.frame(a.RST_STREAM, 0, 1, b"\0\0\0\x08"))
        await turns(10)
        assert b"queued" not in h.evaluated and transport.received.grpc_status(1) is None
        h.gate = asyncio.get_running_loop().create_future()
        connection.data_received(request(3, b"waiting", "5S"))
        await turns(2)
        connection.data_received(a.frame(a.RST_STREAM, 0, 3, b"\0\0\0\x08"))
        await turns(2)
        assert h.admission.pending == 0 and h.expired == [adm.BEFORE_EVALUATION, adm.WHILE_WAITING]
        assert b"waiting" not in h.evaluated and transport.received.grpc_status(3) is None
    run(scenario, cost=0.010)
