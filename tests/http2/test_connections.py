"""Connection limits on both layers: idle timeout, connections per worker, keepalive
enforcement, and the graceful drain on SIGTERM."""

from __future__ import annotations

import signal

import pytest

from loadtests import h2_attacks as a
from tests.http2.conftest import CHECK, LAYERS, StartServer


def request(peer: a.Peer, stream_id: int) -> bytes:
    return a.check_request(peer, stream_id, CHECK)


def answered(peer: a.Peer, stream_id: int) -> bool:
    return a.answered(peer, stream_id, CHECK)


@pytest.mark.parametrize("layer", LAYERS)
def test_an_idle_connection_is_closed_with_goaway(start_server: StartServer, layer: str) -> None:
    served = start_server(layer, "--connection-idle-timeout", "1")
    peer = a.Peer(served.port)
    try:
        assert answered(peer, 1)
        received = peer.read_until_closed(timeout=30)
    finally:
        peer.close()
    assert received.closed and received.goaway
    if layer == "fast":
        assert received.goaway[-1][1] == a.NO_ERROR


@pytest.mark.parametrize("layer", LAYERS)
def test_connections_over_the_cap_are_refused_and_the_others_served(start_server: StartServer, layer: str) -> None:
    served = start_server(layer, "--max-connections", "4")
    peers = [a.Peer(served.port) for _ in range(4)]
    try:
        assert all(answered(peer, 1) for peer in peers)
        extra = a.Peer(served.port)
        try:
            extra.send_all(request(extra, 1))
            received = extra.read_until_closed(timeout=30)
            assert received.closed and received.grpc_status(1) is None
        finally:
            extra.close()
        assert all(answered(peer, 3) for peer in peers)
    finally:
        for peer in peers:
            peer.close()
    if layer == "fast":
        assert received.goaway_code == a.ENHANCE_YOUR_CALM and served.limit_count("connections") == 1


@pytest.mark.parametrize("layer", LAYERS)
def test_pings_without_requests_are_limited_as_grpc_does(start_server: StartServer, layer: str) -> None:
    served = start_server(layer)
    peer = a.Peer(served.port)
    try:
        assert answered(peer, 1)
        for n in range(3):  # a request before each PING keeps it legitimate
            peer.send_all(request(peer, 3 + 2 * n) + a.frame(a.PING, 0, 0, b"keepaliv"))
        assert peer.read_until(lambda r: r.grpc_status(7) is not None).grpc_status(7) == "0"
        assert not peer.received.goaway
        for _ in range(4):  # then PINGs alone, back to back: two strikes allowed, the third closes
            peer.send_all(a.frame(a.PING, 0, 0, b"keepaliv"))
        received = peer.read_until_closed(timeout=30)
    finally:
        peer.close()
    assert received.goaway_code == a.ENHANCE_YOUR_CALM


@pytest.mark.parametrize("layer", LAYERS)
def test_sigterm_drains_in_two_phases_and_answers_what_was_sent_before_the_last_goaway(
        start_server: StartServer, layer: str) -> None:
    served = start_server(layer, "--grace-period", "10")
    peer = a.Peer(served.port)
    try:
        assert answered(peer, 1)
        served.process.popen.send_signal(signal.SIGTERM)
        first = peer.read_until(lambda r: bool(r.goaway))
        assert first.goaway[0] == (2**31 - 1, a.NO_ERROR)  # phase one: no new streams, please
        peer.send_all(request(peer, 3))  # crossed the GOAWAY on the wire
        ping = peer.read_until(lambda r: any(not flags for flags, _ in r.pings))
        opaque = next(data for flags, data in ping.pings if not flags)
        status = peer.read_until(lambda r: r.grpc_status(3) is not None).grpc_status(3)
        # The fast layer answers it; grpc C-core's server, once shutting down, cancels calls it
        # had not started (CANCELLED) even below the last stream id it then announces.
        assert status == ("0" if layer == "fast" else "1")
        peer.send_all(a.frame(a.PING, a.ACK, 0, opaque))
        final = peer.read_until(lambda r: len(r.goaway) > 1)
        assert final.goaway[-1] == (3, a.NO_ERROR)  # phase two: the last stream it took
        assert peer.read_until_closed(timeout=30).closed
    finally:
        peer.close()
    assert served.process.popen.wait(timeout=30) == 0
