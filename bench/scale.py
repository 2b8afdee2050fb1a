"""Scenarios at scale, as a mixin of scenarios.Bench: a 100,000-event project's
snapshot (one subscriber, 100 at once, a resume of 10,000 missed changes), and "load
held, nothing lost": 1,000 clients through a disconnect storm and two restarts
(bench/storm.py), 100,000 hostile frames (bench/hostile.py); CalDAV sync of a
10,000-event calendar beside Radicale (bench/caldav_sync.py). Those three start their
own servers (OWN_SERVER)."""

from __future__ import annotations

import json
import subprocess
import sys

from harness import BENCH, Server, log, pinned
from storm import sound

# Scenarios that run their own server (they restart or kill it).
OWN_SERVER = ("storm", "cluster_storm", "hostile", "caldav")


def _script(name: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, str(BENCH / name), "--json", "-", *args],
                          stdout=subprocess.PIPE, stderr=None, text=True, timeout=1800)
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"{name} printed no result (exit {done.returncode})")
    return json.loads(lines[-1])


class ScaleScenarios:
    def snapshot(self, srv: Server, label: str) -> dict:
        a = self.a  # type: ignore[attr-defined]
        log(f"[{label}] {a.snap_events:,} events, {a.snap_joiners} joiners, resume of {a.snap_resume:,}")
        done = subprocess.run(
            [sys.executable, str(BENCH / "snapshot_client.py"), f"ws://{srv.host}:{srv.port}", srv.tokens["writer"],
             str(srv.pid), str(a.snap_events), str(a.snap_joiners), str(a.snap_resume)],
            stdout=subprocess.PIPE, stderr=None, text=True, timeout=1800,
            preexec_fn=pinned(self.load_cpus))  # type: ignore[attr-defined]
        if done.returncode != 0:
            raise RuntimeError(f"snapshot clients failed (exit {done.returncode})")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        one, many, res = r["one"], r["joiners_result"], r["resume"]
        r.update({
            "one_seconds": one["seconds"], "one_events": one["events"], "one_parts": one["parts"],
            "one_mb": one["bytes"] / 1e6, "one_peak_rss_delta_mb": (one["peak_rss_kb"] - one["rss_before_kb"]) / 1024,
            "whole_seconds": r["whole"]["seconds"],
            "whole_peak_rss_delta_mb": (r["whole"]["peak_rss_kb"] - r["whole"]["rss_before_kb"]) / 1024,
            "many_wall_seconds": many["wall_seconds"], "many_p50_seconds": many["p50_seconds"],
            "many_complete": many["complete"], "many_mb": many["bytes"] / 1e6,
            "many_peak_rss_delta_mb": (many["peak_rss_kb"] - many["rss_before_kb"]) / 1024,
            "rss_after_mb": many["rss_after_kb"] / 1024,
            "resume_seconds": res["seconds"], "resume_changes": res["changes"], "resume_gaps": res["gaps"],
            "resume_per_s": res["changes"] / res["seconds"] if res["seconds"] else None,
            "status": "ok",
        })
        r["params"] = {"events": a.snap_events, "joiners": a.snap_joiners, "resume": a.snap_resume}
        return r

    def storm(self, label: str) -> dict:
        a = self.a  # type: ignore[attr-defined]
        log(f"[{label}] {a.storm_clients:,} clients, a disconnect storm, a SIGTERM and a kill -9 restart")
        r = _script("storm.py", "--clients", str(a.storm_clients), "--procs", str(a.storm_procs),
                    "--steady", str(a.storm_steady))
        r["restart_recover_s"] = max(x["recover_s"] for x in r["restarts"])
        r["nothing_lost"] = sound(r)
        r["rss_growth_mb"] = (r["rss_end_kb"] - r["rss_start_kb"]) / 1024
        r["params"] = {"clients": a.storm_clients, "load_procs": a.storm_procs}
        return r

    def cluster_storm(self, label: str) -> dict:
        a = self.a  # type: ignore[attr-defined]
        log(f"[{label}] {a.cluster_storm_clients:,} clients over 3 nodes: a disconnect storm, a node's kill -9, "
            f"Redis and PostgreSQL restarted")
        r = _script("cluster_storm.py", "--clients", str(a.cluster_storm_clients), "--procs",
                    str(a.cluster_storm_procs), "--steady", str(a.storm_steady))
        recovered = [s for s in r["recover_s"].values() if s is not None]
        r["recover_worst_s"] = max(recovered) if len(recovered) == len(r["recover_s"]) else None
        r["params"] = {"clients": a.cluster_storm_clients, "load_procs": a.cluster_storm_procs, "nodes": r["nodes"]}
        return r

    def caldav(self, label: str) -> dict:
        a = self.a  # type: ignore[attr-defined]
        log(f"[{label}] {a.caldav_events:,} events, {a.caldav_changes} changes, barosync and Radicale")
        r = _script("caldav_sync.py", "--events", str(a.caldav_events), "--changes", str(a.caldav_changes))
        r["params"] = {"events": a.caldav_events, "changes": a.caldav_changes}
        return r

    def hostile(self, label: str) -> dict:
        a = self.a  # type: ignore[attr-defined]
        r = _script("hostile.py", "--frames", str(a.hostile_frames), "--conns", str(a.hostile_conns))
        r["crashes"] = 0 if r["server_alive"] and r["exit_code"] == 0 else 1
        r["rss_max_growth_mb"] = (r["rss_max_kb"] - r["rss_start_kb"]) / 1024 if r["rss_max_kb"] else None
        r["closing_frames"] = sum(r["fatal_sent"].values())
        r["params"] = {"frames": a.hostile_frames, "connections": a.hostile_conns}
        return r
