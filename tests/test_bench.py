"""The benchmark harness runs end to end (bench/run.py --smoke) against both servers.

It checks that the harness works and produced figures — never how fast anything was:
timings depend on the machine, the targets are for full runs (see bench/README.md).
"""

from __future__ import annotations
import pytest

import json
import subprocess
import sys
from pathlib import Path

pytestmark = pytest.mark.slow  # every bench scenario, smoke-sized, in subprocesses

ROOT = Path(__file__).resolve().parent.parent


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--smoke", "--json", str(out),
         "--skip", "cluster_storm"],  # tests/test_cluster_storm.py runs it, with its checks
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, f"bench/run.py --smoke failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "barosync bench" in proc.stdout  # the table was printed
    report = json.loads(out.read_text())
    servers = report["servers"]
    assert set(servers) == {"barosync", "websockets", "ws"}
    # A peer's scenario is left out only with a reason (the Node peer's durable mode
    # needs better-sqlite3, which `make bench` builds and `make test` does not).
    skipped = report["meta"].get("skipped", {})
    assert all(label.startswith("ws/durable") and "better-sqlite3" in why for label, why in skipped.items()), skipped

    peers = ("fanout", "saturation", "capacity", "cursors", "durable", "durable_w4")
    own = ("fanout_upto", "durable_one", "durable_one_w4", "durable_one_nosub",
           "create_1k", "create_5k",
           "snapshot", "storm", "hostile", "caldav", "cluster_fanout", "cluster_durable")
    for name, scenarios in servers.items():
        expected = set(peers) | (set(own) if name == "barosync" else set())
        assert set(scenarios) == expected - {label.split("/")[1] for label in skipped if label.startswith(name + "/")}, name
        for scenario, r in scenarios.items():
            if scenario in ("snapshot", "storm", "hostile", "caldav"):
                assert r["status"] == "ok", (name, scenario, r.get("error"))
                continue
            assert r["status"] == "ok", (name, scenario, r.get("error"))
            assert r["subscribed"] == r["connections"], (name, scenario)
            assert r["errors"] == 0, (name, scenario, r["error_samples"])
            assert _number(r["server_cpu_s"]) and _number(r["loadgen_cpu_pct"]), (name, scenario)

        for scenario in ("fanout", "saturation"):
            r = scenarios[scenario]
            assert r["deliveries"] > 0, (name, scenario)
            assert r["deliveries"] == r["expected_deliveries"], (name, scenario)
            assert r["in_order"] is True and r["complete"] is True, (name, scenario)
            assert _number(r["server_cpu_us_per_delivery"]), (name, scenario)
            for p in ("p50", "p99", "max"):
                assert _number(r["latency_ms"][p]), (name, scenario, p)
        assert _number(scenarios["saturation"]["deliveries_per_s"])

        cap = scenarios["capacity"]
        assert cap["held"] == cap["connections"] > 0, name
        assert _number(cap["rss_kb_per_conn"]) and _number(cap["connect_all_s"]), name

    b = servers["barosync"]
    for scenario in ("durable", "durable_w4", "durable_one", "durable_one_w4", "durable_one_nosub", "create_1k",
                     "create_5k"):
        assert b[scenario]["creates_acked"] > 0, scenario
        assert b[scenario]["creates_failed"] == 0, scenario
        assert _number(b[scenario]["acked_per_s"]) and _number(b[scenario]["ack_p99_ms"]), scenario
        # Where a create's time went: the kernel's share of the server's CPU (counted
        # in 10 ms ticks, so a smoke run's may round to 0), and the storage it wrote
        # (an fsynced commit writes at least a page).
        r = b[scenario]
        assert 0 <= r["server_kernel_us_per_mutation"] <= r["server_cpu_us_per_mutation"], scenario
        if Path("/proc/self/io").exists():  # the kernel accounts each task's I/O
            assert r["storage_kb_per_mutation"] > 0, scenario
    for name in ("websockets", "ws"):  # the durable peers: SQLite, acked after COMMIT
        for scenario, r in servers[name].items():
            if scenario.startswith("durable"):
                assert r["creates_acked"] > 0 and r["creates_failed"] == 0, (name, scenario)
                if Path("/proc/self/io").exists():
                    assert r["storage_kb_per_mutation"] > 0, (name, scenario)
    assert b["durable_one"]["deliveries"] > 0  # the writers of one project see each other's
    assert b["durable_one_nosub"]["deliveries"] == 0  # ... unless they do not subscribe
    for scenario in ("cluster_fanout", "cluster_durable"):  # two nodes on PostgreSQL and Redis
        assert b[scenario]["params"]["nodes"].startswith("2"), scenario
    assert b["cluster_fanout"]["complete"] and b["cluster_fanout"]["in_order"]
    assert b["cluster_durable"]["creates_acked"] > 0 and b["cluster_durable"]["creates_failed"] == 0
    upto = b["fanout_upto"]
    assert upto["complete"] and upto["in_order"] and upto["acks_out"] < upto["deliveries"]
    snap = b["snapshot"]
    assert snap["one_events"] == snap["events"] and snap["one_parts"] > 1
    assert snap["many_complete"] == snap["joiners"] and snap["resume_changes"] == snap["params"]["resume"] > 0
    assert snap["resume_gaps"] == 0
    storm = b["storm"]
    assert storm["nothing_lost"] is True and storm["converged"] == storm["clients"] > 0
    assert [x["exit_code"] for x in storm["restarts"]] == [0, -9]
    caldav = b["caldav"]
    for server in ("barosync", "radicale"):
        assert caldav[server]["incremental_items"] == caldav["changes"] > 0, server
        assert _number(caldav[server]["full_seconds"]) and _number(caldav[server]["incremental_seconds"]), server
    hostile = b["hostile"]
    assert hostile["crashes"] == 0 and hostile["serves_afterwards"] is True
    assert hostile["frames"] >= 2000 and hostile["error_answers"] > 0 and hostile["closing_frames"] > 0

    for name, scenarios in servers.items():
        cur = scenarios["cursors"]
        assert cur["cursor_sent"] > 0, name
        assert cur["cursor_deliveries"] > 0, name
        assert cur["cursor_with_id"] == 0, name  # cursors carry no id (never acked)
        assert cur["cursor_unparsable"] == 0, name
        assert cur["cursor_deliveries"] <= cur["uncoalesced_deliveries"], name
        for key in ("cursor_deliveries_per_s", "server_cpu_pct", "server_cpu_us_per_delivery",
                    "coalesced_pct", "received_per_pair_per_s", "max_received_per_pair_per_s"):
            assert _number(cur[key]), (name, key)
        for p in ("p50", "p99", "max"):
            assert _number(cur["latency_ms"][p]), (name, "cursors", p)
    assert servers["barosync"]["cursors"]["throttle_held"] is True
