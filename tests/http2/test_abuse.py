"""Each attack on one connection, on both layers, with a legitimate client on another.

What must hold (properties, not timings): every legitimate Check succeeds, and keeps being
answered while the attack runs; the server's memory stays bounded; on the fast layer the attack
is stopped by the limit named for it (GOAWAY ENHANCE_YOUR_CALM, counted in
``authz_http2_limit_exceeded_total``) or, where no limit applies, simply gets nowhere
(back-pressure, flow control). How fast the legitimate Checks are is the soak benchmark's job.
"""

from __future__ import annotations

import time

import pytest

from loadtests import h2_attacks as a
from tests.http2.conftest import CHECK, Served

ATTACKS = {attack.name: attack for attack in a.ATTACKS}
NAMES = [*ATTACKS, "body_parking"]
#: legitimate Checks that must succeed while the attack runs
DURING_ATTACK = 40
#: the fast layer's growth bound; grpcio's RSS only has to stay under the issue's per-worker cap
FAST_GROWTH = 48 << 20
WORKER_CAP = 256 << 20
#: grpc C-core has no limit for frames that do no work: its input buffers spike under these
#: floods and are not given back (measured in loadtests/soak.py); the fast layer closes such
#: connections
GRPCIO_UNBOUNDED = {"unknown_frames", "priority_flood"}


@pytest.mark.parametrize("name", NAMES)
def test_an_attack_leaves_other_connections_served_and_memory_bounded(
        served: Served, name: str, request: pytest.FixtureRequest) -> None:
    if served.layer == "grpcio" and name in GRPCIO_UNBOUNDED:
        # C-core keeps the memory these floods make it allocate: on the shared server it would be
        # charged to the attacks that follow, so these run against a server of their own
        served = request.getfixturevalue("start_server")("grpcio")
    attack = ATTACKS.get(name)
    limit = attack.limit if attack is not None and served.layer == "fast" else None
    before = served.limit_count(limit) if limit else 0.0
    with a.LegitimateClient(served.address, CHECK) as legit, a.PeakRss(served.pid) as rss, \
            a.Running(attack or name, served.port, CHECK) as run:
        legit.wait_for(len(legit.latencies) + DURING_ATTACK)
        answered_during_attack = len(legit.latencies)
        if limit:
            deadline = time.monotonic() + 30
            while not run.done and time.monotonic() < deadline:
                time.sleep(0.05)
    assert run.error is None, run.error
    assert legit.failures == []
    assert answered_during_attack > DURING_ATTACK
    if served.layer == "fast":
        assert rss.peak - rss.start < FAST_GROWTH, (rss.start >> 20, rss.peak >> 20)
    elif name not in GRPCIO_UNBOUNDED:
        assert rss.peak < WORKER_CAP, rss.peak >> 20
    if limit:
        assert run.done, "the abusive connection is still open"
        assert served.limit_count(limit) > before
        if attack is not None and attack.reads:  # a peer that reads sees why
            assert run.received.goaway_code == a.ENHANCE_YOUR_CALM, run.received.goaway
