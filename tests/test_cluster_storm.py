"""A storm across three nodes (bench/cluster_storm.py, at a small size): clients that
move to another node at every reconnect, writers on every node resending what was not
acked through whichever node they reach, a node killed with kill -9, Redis and
PostgreSQL restarted. Every single-node promise must hold, per client and per project.

Real `barosync serve` subprocesses, a real PostgreSQL and Redis, real WebSocket
clients in their own processes; the figures are printed, never asserted on speed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pg_helpers import bindir
from redis_helpers import installed as redis_installed

BENCH = Path(__file__).resolve().parent.parent / "bench"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.cluster,
    pytest.mark.skipif(bindir() is None, reason="PostgreSQL is not installed (as root: apt-get install postgresql)"),
    pytest.mark.skipif(not redis_installed(), reason="redis-server is not installed (as root: apt-get install redis-server)"),
]


def test_a_storm_over_three_nodes_keeps_every_single_node_promise() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import cluster_storm
    finally:
        sys.path.remove(str(BENCH))
    out = cluster_storm.run(clients=60, nodes=3, procs=2, rate=60.0, steady=0.5)
    print("\n[cluster storm] " + json.dumps({k: v for k, v in out.items() if k != "presence_gone_each_s"}))
    # It was a storm: writes on every node, resends through other nodes, refusals
    # while PostgreSQL was away, everyone back after every disruption.
    assert out["acked_mutations"] > 100 and out["answers_lost"] > 0 and out["resent"] > out["refused"]
    assert out["reconnects"] >= out["clients"]
    assert out["killed_exit_code"] == -9
    assert None not in out["recover_s"].values(), out["recover_s"]
    # Per client: every seq once, in order, and its own changes only as acks.
    assert (out["gaps"], out["duplicates"], out["own_echoes"], out["errors"]) == (0, 0, 0, 0)
    # Per project: nothing acked lost, nothing applied twice, nothing left unanswered.
    assert (out["lost"], out["applied_twice"], out["stale_versions"], out["still_pending"]) == (0, 0, 0, 0)
    # Every node serves the same state, to REST and to a fresh subscriber, and every
    # client's copy is that state.
    assert out["nodes_agree"] and out["snapshots_agree"]
    assert out["converged"] == out["clients"]
    # The killed node's users left the others' presence (within the window: the bench).
    assert out["presence_gone_s"] is not None, out["presence_gone_each_s"]
