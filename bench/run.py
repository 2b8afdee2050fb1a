#!/usr/bin/env python3
"""barosync benchmark harness: barosync and two peers, side by side.

Starts a real ``barosync serve`` (fresh temp data dir, port 0, tokens minted with the
CLI) and the peers ``bench/peers/websockets_peer.py`` (asyncio + websockets) and
``bench/peers/ws_peer.cjs`` (Node + ws) in turn, drives each with the
load generator ``bench/loadgen.py`` in separate processes (server and load pinned to
different cores when there are two or more), and prints a table plus a JSON file of
every figure (default ``bench/results/latest.json``).

    .venv/bin/python bench/run.py                 # full run (< 5 min on 2 cores)
    .venv/bin/python bench/run.py --smoke         # a few clients, ~1 s per scenario
    .venv/bin/python bench/run.py --scenarios fanout --fanout-clients 200
    .venv/bin/python bench/run.py --servers barosync --profile /tmp/prof

See bench/README.md for what each scenario measures and the targets. The machinery
is harness.py, the scenarios scenarios.py, the table report.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from harness import BENCH, SCENARIOS, SERVERS
from report import table
from scenarios import Bench


# ------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="barosync benchmark: barosync vs asyncio+websockets and Node+ws peers")
    ap.add_argument("--smoke", action="store_true", help="tiny run: a few clients, ~0.5 s of load per scenario")
    ap.add_argument("--json", default=str(BENCH / "results" / "latest.json"), help="where to write all figures")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma list of " + ",".join(SCENARIOS))
    ap.add_argument("--skip", default="", help="comma list of scenarios not to run")
    ap.add_argument("--servers", default="barosync,websockets,ws", help="comma list of barosync,websockets,ws")
    ap.add_argument("--fanout-clients", type=int, default=1000)
    ap.add_argument("--fanout-rate", type=float, default=20.0, help="events/s from the one writer")
    ap.add_argument("--fanout-duration", type=float, default=10.0)
    ap.add_argument("--sat-clients", type=int, default=100)
    ap.add_argument("--sat-writers", type=int, default=10)
    ap.add_argument("--sat-window", type=int, default=32, help="creates in flight per writer")
    ap.add_argument("--sat-duration", type=float, default=10.0)
    ap.add_argument("--cap-conns", type=int, default=10000)
    ap.add_argument("--cap-hold", type=float, default=2.0, help="seconds to hold the idle connections")
    ap.add_argument("--cap-procs", type=int, default=1, help="load processes for capacity")
    ap.add_argument("--durable-writers", type=int, default=100)
    ap.add_argument("--durable-window", type=int, default=0,
                    help="creates in flight per writer (default: 1, and 4 in the *_w4 scenarios)")
    ap.add_argument("--durable-duration", type=float, default=10.0)
    ap.add_argument("--cursor-clients", type=int, default=1000)
    ap.add_argument("--cursor-movers", type=int, default=100, help="clients moving cursors, one user each")
    ap.add_argument("--cursor-rate", type=float, default=20.0, help="cursor moves/s per mover")
    ap.add_argument("--cursor-duration", type=float, default=10.0)
    ap.add_argument("--cursor-sample", type=int, default=20,
                    help="listeners that parse every cursor (latency, order, throttle); the rest count them")
    ap.add_argument("--cursor-procs", type=int, default=2, help="load processes for the cursor scenario")
    ap.add_argument("--snap-events", type=int, default=100_000, help="events in the snapshot scenario's project")
    ap.add_argument("--snap-joiners", type=int, default=100, help="subscribers joining at once")
    ap.add_argument("--snap-resume", type=int, default=10_000, help="missed changes to resume")
    ap.add_argument("--storm-clients", type=int, default=1000)
    ap.add_argument("--storm-procs", type=int, default=4, help="load processes for the storm")
    ap.add_argument("--storm-steady", type=float, default=3.0, help="seconds of steady writing around each disruption")
    ap.add_argument("--cluster-storm-clients", type=int, default=450, help="clients of the storm over three nodes")
    ap.add_argument("--cluster-storm-procs", type=int, default=3, help="load processes for the cluster storm")
    ap.add_argument("--hostile-frames", type=int, default=100_000)
    ap.add_argument("--hostile-conns", type=int, default=20)
    ap.add_argument("--caldav-events", type=int, default=10_000, help="events in the CalDAV calendar")
    ap.add_argument("--caldav-changes", type=int, default=100, help="changes between two syncs")
    ap.add_argument("--load-procs", type=int, default=1, help="load processes for the other scenarios")
    ap.add_argument("--connect-window", type=int, default=200, help="handshakes in flight per load process")
    ap.add_argument("--ping-interval", type=float, default=15.0, help="client JSON ping interval (s)")
    ap.add_argument("--drain-idle", type=float, default=0.5)
    ap.add_argument("--drain-max", type=float, default=10.0)
    ap.add_argument("--settle", type=float, default=0.5, help="pause between setup and measurement")
    ap.add_argument("--setup-timeout", type=float, default=120.0)
    ap.add_argument("--quiet-wait", type=float, default=10.0,
                    help="before a scenario, wait up to this long for other processes to go idle")
    ap.add_argument("--retry-disturbed", type=int, default=1,
                    help="run a scenario again (this many times) when other processes disturbed it")
    ap.add_argument("--barosync-config", metavar="TOML",
                    help="config file for barosync serve (default: one that only lifts the "
                         "per-user connection cap and the rate limit, see BENCH_CONFIG)")
    ap.add_argument("--codec", default="json", choices=["json", "batch", "deflate"],
                    help="wire codec barosync's clients ask for (?codec=); the peer always speaks json")
    ap.add_argument("--no-acks", action="store_true",
                    help="diagnosis only: clients do not ack server messages (the seed client does), "
                         "to tell the cost of a delivery from the cost of its ack")
    ap.add_argument("--profile", metavar="DIR", help="py-spy record barosync during each measured phase")
    ap.add_argument("--profile-gil", action="store_true",
                    help="with --profile: sample only the thread holding the GIL (Python's own CPU, "
                         "without time spent waiting in system calls)")
    a = ap.parse_args(argv)
    if a.smoke:
        d = ap.parse_args([])  # defaults, to tell which flags were given explicitly

        def small(name: str, value) -> None:
            if getattr(a, name) == getattr(d, name):
                setattr(a, name, value)
        small("fanout_clients", 10)
        small("fanout_rate", 20.0)
        small("fanout_duration", 0.5)
        small("sat_clients", 8)
        small("sat_writers", 2)
        small("sat_window", 8)
        small("sat_duration", 0.5)
        small("cap_conns", 50)
        small("cap_hold", 0.2)
        small("durable_writers", 4)
        small("durable_duration", 0.5)
        small("cursor_clients", 10)
        small("cursor_movers", 3)
        small("cursor_duration", 0.5)
        small("snap_events", 300)
        small("snap_joiners", 5)
        small("snap_resume", 50)
        small("storm_clients", 40)
        small("storm_procs", 2)
        small("storm_steady", 0.3)
        small("cluster_storm_clients", 30)
        small("cluster_storm_procs", 1)
        small("hostile_frames", 2000)
        small("hostile_conns", 4)
        small("caldav_events", 200)
        small("caldav_changes", 20)
        small("drain_idle", 0.3)
        small("settle", 0.1)
        small("setup_timeout", 30.0)
        small("quiet_wait", 0.0)
        small("retry_disturbed", 0)
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    a.scenarios = [s.strip() for s in a.scenarios.split(",") if s.strip() and s.strip() not in skip]
    a.servers = [("websockets" if s.strip() in ("peer", "websockets") else s.strip())
                 for s in a.servers.split(",") if s.strip()]
    for s in [*a.scenarios, *skip]:
        if s not in SCENARIOS:
            ap.error(f"unknown scenario {s!r}")
    for s in a.servers:
        if s not in SERVERS:
            ap.error(f"unknown server {s!r}")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    t0 = time.monotonic()
    report = Bench(a).run()
    report["meta"]["elapsed_s"] = time.monotonic() - t0
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print()
    print(f"barosync bench ({'smoke' if a.smoke else 'full'} run, {report['meta']['elapsed_s']:.0f} s) — "
          f"{report['meta']['pinning']}")
    print(table(report))
    print(f"\nall figures: {out}")
    failed = [f"{s}/{sc}" for s, scs in report["servers"].items() for sc, r in scs.items()
              if r.get("status") != "ok"]
    if failed:
        print(f"scenarios that failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
