"""The benchmark's scenarios (fan-out, saturation, capacity, durable writes,
cursors), each run against every server in turn; the machinery is harness.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from harness import (
    BENCH_CONFIG,
    DISTURBED_PCT,
    Load,
    PEER_SCENARIOS,
    peer_missing,
    VARIANTS,
    base_of,
    PROJECT,
    SERVER_CURSOR_RATE,
    Server,
    TARGETS,
    cpu_plan,
    disturbed_pct,
    errors_from_log,
    log,
    machine_busy_s,
    merge_counts,
    mover_user,
    ms_summary,
    pinned,
    proc_costs,
    proc_cpu_s,
    proc_fds,
    proc_rss_kb,
    raise_nofile,
    split,
)
from report import headline, per_delivery
from scale import OWN_SERVER, ScaleScenarios



def per_mutation(r: dict) -> None:
    """Where an acked create's server time went: kernel CPU (of the whole per-create
    CPU) and bytes written to storage, when the server is one process."""
    costs, acked = r.get("server_costs"), r["creates_acked"]
    r["server_kernel_us_per_mutation"] = costs["kernel_s"] * 1e6 / acked if costs and acked else None
    written = costs["storage_bytes"] if costs else None
    r["storage_kb_per_mutation"] = written / 1024 / acked if written is not None and acked else None


class Bench(ScaleScenarios):
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.nofile = raise_nofile()
        self.server_cpus, self.load_cpus, self.pinning = cpu_plan()
        self.load_cores = len(self.load_cpus) if self.load_cpus else 1
        self.profiler = shutil.which("py-spy") or (
            str(Path(sys.executable).with_name("py-spy")) if Path(sys.executable).with_name("py-spy").exists() else None)

    # -- shared driver ------------------------------------------------
    def base_cfg(self, srv: Server, proc: int = 0) -> dict:
        """A load process's config; on a cluster, process i talks to node i mod 2."""
        a = self.a
        ports = getattr(srv, "ports", [srv.port])
        return {"host": srv.host, "port": ports[proc % len(ports)], "connect_window": a.connect_window,
                "ping_interval": a.ping_interval, "drain_idle": a.drain_idle,
                "drain_max": a.drain_max, "setup_timeout": a.setup_timeout, "ack": not a.no_acks,
                # The peer speaks only plain JSON frames; the codec is barosync's.
                "codec": a.codec if srv.kind == "barosync" else "json"}

    def procs_for(self, n_conns: int, wanted: int) -> int:
        # each load process needs one fd per connection, plus some slack
        need = -(-n_conns // max(1, self.nofile - 256))
        return max(wanted, need, 1)

    def drive(self, srv: Server, label: str, configs: list[dict], duration: float,
              on_ready=None, profile_name: str | None = None, dones_out: dict | None = None) -> dict:
        """Set up all clients, run the measured phase, collect figures."""
        load = Load(label, configs, self.load_cpus)
        try:
            n = sum(sum(g["count"] for g in c["groups"]) for c in configs)
            t_setup = time.monotonic()
            readies = load.wait_all("ready", self.a.setup_timeout + 30)
            subscribed = sum(r["subscribed"] for r in readies)
            t_first = min(r["t_first_connect"] for r in readies if r["t_first_connect"]) / 1e9 \
                if any(r["t_first_connect"] for r in readies) else t_setup
            t_all = max(r["t_all_subscribed"] for r in readies) / 1e9
            info = {
                "connections": n,
                "subscribed": subscribed,
                "connect_failures": sum(r["connect_failures"] for r in readies),
                "connects_stalled": sum(r.get("stalled", 0) for r in readies),
                "http_errors": merge_counts(r["http_errors"] for r in readies),
                "connect_all_s": t_all - t_first,
            }
            log(f"[{label}] {subscribed}/{n} subscribed in {info['connect_all_s']:.2f} s")
            if not srv.alive():
                raise RuntimeError(f"{label}: server exited (code {srv.proc.returncode}) during setup: "
                                   f"{srv.last_error()}")
            if subscribed == 0:
                try:  # a crashing server may still be writing its traceback
                    srv.proc.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    pass
                raise RuntimeError(f"{label}: no client could subscribe: {info}; server log: {srv.last_error()}")
            time.sleep(self.a.settle)
            if on_ready:
                info.update(on_ready())
            prof = self.start_profile(srv, profile_name)
            cpu_samples: list[float] = []
            cluster_cpu = getattr(srv, "cpu_s", None)  # several processes (cluster.py)
            server_cpu = cluster_cpu or (lambda: proc_cpu_s(srv.pid))
            # One process: its user/kernel split and storage writes too.
            costs_go = proc_costs(srv.pid) if cluster_cpu is None else None
            state = {"t": time.monotonic(), "cpu": server_cpu()}
            t_go = state["t"]
            cpu_go = state["cpu"]
            busy_go = machine_busy_s()

            def tick() -> None:
                now = time.monotonic()
                if now - state["t"] >= 1.0 and srv.alive():
                    cpu = server_cpu()
                    cpu_samples.append(100.0 * (cpu - state["cpu"]) / (now - state["t"]))
                    state["t"], state["cpu"] = now, cpu

            load.command("go")
            if duration >= 2:
                log(f"[{label}] running for {duration:g} s ...")
            dones = load.wait_all("done", duration + self.a.drain_max + 60, tick=tick)
            cpu_end = server_cpu() if srv.alive() else cpu_go
            costs_end = proc_costs(srv.pid) if costs_go is not None and srv.alive() else None
            busy_end = machine_busy_s()
            t_end = time.monotonic()
            self.stop_profile(prof)
            t_last = max([d["t_last_rx"] for d in dones] + [d["t_write_end"] for d in dones]) / 1e9
            window = max(1e-6, t_last - t_go) if duration else max(1e-6, time.monotonic() - t_go)
            info.update(self.collect(dones, window))
            info["server_cpu_s"] = cpu_end - cpu_go
            info["server_cpu_pct"] = 100.0 * (cpu_end - cpu_go) / window
            info["server_cpu_pct_peak_1s"] = max(cpu_samples) if cpu_samples else info["server_cpu_pct"]
            info["window_s"] = window
            if costs_go is not None and costs_end is not None:
                info["server_costs"] = {k: None if costs_go[k] is None or costs_end[k] is None
                                        else costs_end[k] - costs_go[k] for k in costs_go}
            # whatever else ran on the machine meanwhile (other jobs disturb the figures)
            other = (busy_end - busy_go) - (cpu_end - cpu_go) - info["loadgen_cpu_s"]
            info["other_cpu_pct"] = max(0.0, 100.0 * other / max(1e-6, t_end - t_go))
            info["server_alive"] = srv.alive()
            if dones_out is not None:
                dones_out["dones"] = dones
            return info
        finally:
            load.close()

    def collect(self, dones: list[dict], window: float) -> dict:
        lat: list[int] = sorted(v for d in dones for v in d["latency_us"]["values"])
        alat: list[int] = sorted(v for d in dones for v in d["ack_latency_us"]["values"])
        rlat: list[int] = sorted(v for d in dones for v in d["latency_read_us"]["values"])
        load_cpu = sum(d["cpu_s"] for d in dones)
        load_pct = 100.0 * load_cpu / window
        cores_used = min(len(dones), self.load_cores)
        peak = max(d["cpu_pct_peak_1s"] for d in dones)
        r = {
            "open_after": sum(d["open"] for d in dones),
            "deliveries": sum(d["deliveries"] for d in dones),
            "out_of_order": sum(d["out_of_order"] for d in dones),
            "gaps": sum(d["gaps"] for d in dones),
            "creates_sent": sum(d["creates_sent"] for d in dones),
            "creates_acked": sum(d["creates_acked"] for d in dones),
            "creates_failed": sum(d["creates_failed"] for d in dones),
            "creates_unacked": sum(d["creates_unacked"] for d in dones),
            "errors": sum(d["errors"] for d in dones),
            "error_samples": [s for d in dones for s in d["error_samples"]][:5],
            "closed_unexpectedly": sum(d["closed_unexpectedly"] for d in dones),
            "close_codes": merge_counts(d["close_codes"] for d in dones),
            "other_message_types": merge_counts(d["other_types"] for d in dones),
            "msgs_in": sum(d["msgs_in"] for d in dones),
            "bytes_in": sum(d["bytes_in"] for d in dones),
            "acks_out": sum(d["acks_out"] for d in dones),
            "latency_ms": ms_summary(lat, max((d["latency_us"]["max"] for d in dones), default=0)),
            "latency_at_loadgen_read_ms": ms_summary(rlat, max((d["latency_read_us"]["max"] for d in dones), default=0)),
            "latency_from_server_receipt_ms": ms_summary(
                sorted(v for d in dones for v in d["latency_server_us"]["values"]),
                max((d["latency_server_us"]["max"] for d in dones), default=0)),
            "ack_latency_ms": ms_summary(alat, max((d["ack_latency_us"]["max"] for d in dones), default=0)),
            "loadgen_processes": len(dones),
            "loadgen_cpu_pct": load_pct,
            "loadgen_cpu_s": load_cpu,
            "loadgen_cpu_pct_peak_1s": peak,
        }
        r["loadgen_bound"] = (load_pct / cores_used >= 90.0) or peak >= 97.0
        return r

    def start_profile(self, srv: Server, name: str | None):
        if not (self.a.profile and name and srv.kind == "barosync"):
            return None
        if not self.profiler:
            log("py-spy not found (pip install py-spy into the venv); not profiling")
            return None
        Path(self.a.profile).mkdir(parents=True, exist_ok=True)
        out = Path(self.a.profile) / f"{name}.txt"
        log(f"profiling server pid {srv.pid} with py-spy -> {out}")
        return subprocess.Popen([self.profiler, "record", "--pid", str(srv.pid), "--rate", "250", *(["--gil"] if self.a.profile_gil else []),
                                 "--nonblocking", "--format", "raw", "-o", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=pinned(self.load_cpus))

    def stop_profile(self, prof) -> None:
        if prof is None:
            return
        prof.send_signal(signal.SIGINT)
        try:
            prof.wait(timeout=30)
        except subprocess.TimeoutExpired:
            prof.kill()

    # -- scenarios ----------------------------------------------------
    def fanout(self, srv: Server, label: str, *, ack_mode: str = "id", cluster: bool = False) -> dict:
        a = self.a
        n = a.fanout_clients
        procs = max(2 if cluster else 1, self.procs_for(n, a.load_procs))
        counts = split(n - 1, procs)
        configs = []
        for i, cnt in enumerate(counts):
            groups = [{"count": cnt, "project": PROJECT, "token": srv.tokens["reader"], "writer": False}]
            if i == 0:
                groups.insert(0, {"count": 1, "project": PROJECT, "token": srv.tokens["writer"],
                                  "writer": True, "mode": "rate", "rate": a.fanout_rate})
            configs.append(dict(self.base_cfg(srv, i), groups=groups, duration=a.fanout_duration, ack_mode=ack_mode))
        r = self.drive(srv, label, configs, a.fanout_duration, profile_name=label.split("/")[-1])
        r["expected_deliveries"] = (r["creates_sent"] - r["creates_failed"]) * (n - 1)
        r["complete"] = r["deliveries"] == r["expected_deliveries"] and r["deliveries"] > 0
        r["in_order"] = r["out_of_order"] == 0 and r["gaps"] == 0
        r["latency_p50_ms"] = r["latency_ms"]["p50"]
        r["latency_p99_ms"] = r["latency_ms"]["p99"]
        r["latency_max_ms"] = r["latency_ms"]["max"]
        r["server_cpu_us_per_delivery"] = per_delivery(r)
        r["bytes_per_delivery"] = r["bytes_in"] / r["deliveries"] if r["deliveries"] else None
        r["params"] = {"clients": n, "rate_per_s": a.fanout_rate, "duration_s": a.fanout_duration,
                       "acks": "none (--no-acks)" if a.no_acks else
                       "cumulative, at hello's ackIntervalMs" if ack_mode == "upto" else "one per message (seed client)"}
        if cluster:
            r["params"]["nodes"] = "2 (writer on the first, subscribers over both)"
        return r

    def saturation(self, srv: Server, label: str) -> dict:
        a = self.a
        n, w = a.sat_clients, min(a.sat_writers, a.sat_clients)
        procs = self.procs_for(n, a.load_procs)
        w_counts, r_counts = split(w, procs), split(n - w, procs)
        configs = []
        for i in range(len(w_counts)):
            groups = [
                {"count": w_counts[i], "project": PROJECT, "token": srv.tokens["writer"], "writer": True,
                 "mode": "window", "window": a.sat_window},
                {"count": r_counts[i] if i < len(r_counts) else 0, "project": PROJECT,
                 "token": srv.tokens["reader"], "writer": False},
            ]
            configs.append(dict(self.base_cfg(srv), groups=groups, duration=a.sat_duration))
        r = self.drive(srv, label, configs, a.sat_duration, profile_name="saturation")
        r["expected_deliveries"] = (r["creates_sent"] - r["creates_failed"]) * (n - 1)
        r["complete"] = r["deliveries"] == r["expected_deliveries"] and r["deliveries"] > 0
        r["in_order"] = r["out_of_order"] == 0 and r["gaps"] == 0
        r["deliveries_per_s"] = r["deliveries"] / r["window_s"]
        r["creates_per_s"] = r["creates_acked"] / r["window_s"]
        r["server_cpu_us_per_delivery"] = per_delivery(r)
        r["bytes_per_delivery"] = r["bytes_in"] / r["deliveries"] if r["deliveries"] else None
        r["params"] = {"clients": n, "writers": w, "window": a.sat_window, "duration_s": a.sat_duration}
        return r

    def capacity(self, srv: Server, label: str) -> dict:
        a = self.a
        n = a.cap_conns
        procs = self.procs_for(n, a.cap_procs)
        base_rss = proc_rss_kb(srv.pid)
        base_fds = proc_fds(srv.pid)
        hold = a.cap_hold
        configs = [dict(self.base_cfg(srv), duration=hold,
                        groups=[{"count": cnt, "project": PROJECT, "token": srv.tokens["reader"],
                                 "writer": False}]) for cnt in split(n, procs)]
        box: dict = {}

        def on_ready() -> dict:
            rss = proc_rss_kb(srv.pid)
            box["rss"] = rss
            return {"rss_before_kb": base_rss, "rss_after_kb": rss,
                    "fds_before": base_fds, "fds_after": proc_fds(srv.pid)}


        def driven() -> dict:
            return self.drive(srv, label, configs, hold, on_ready=on_ready, profile_name=None)

        log(f"[{label}] opening {n} connections with {procs} load process(es) ...")
        # Here the connects are what is measured: --profile records them.
        prof = self.start_profile(srv, "capacity_connect")
        try:
            r = driven()
        finally:
            self.stop_profile(prof)
        held = r["open_after"]
        r["held"] = held
        r["rss_kb_per_conn"] = (r["rss_after_kb"] - r["rss_before_kb"]) / max(1, r["subscribed"])
        r["connects_per_s"] = r["subscribed"] / max(1e-6, r["connect_all_s"])
        r["fds_per_conn"] = (r["fds_after"] - r["fds_before"]) / max(1, r["subscribed"])
        r["params"] = {"connections": n, "hold_s": hold}
        return r

    def durable(self, srv: Server, label: str, *, window: int, one_project: bool, subscribed: bool = True,
                cluster: bool = False) -> dict:
        a = self.a
        w = a.durable_writers
        window = a.durable_window or window
        procs = max(2 if cluster else 1, self.procs_for(w, a.load_procs))
        configs = []
        k = 0
        for i, cnt in enumerate(split(w, procs)):
            groups = []
            for _ in range(cnt):
                # each writer alone in its own project measures the durable write path
                # without fan-out; in one project, every writer also sees the others'
                groups.append({"count": 1, "project": PROJECT if one_project else f"{PROJECT}-d{k}",
                               "token": srv.tokens["writer"], "writer": True, "mode": "window", "window": window,
                               "subscribe": subscribed})
                k += 1
            configs.append(dict(self.base_cfg(srv, i), groups=groups, duration=a.durable_duration))
        r = self.drive(srv, label, configs, a.durable_duration, profile_name=label.split("/")[-1])
        r["acked_per_s"] = r["creates_acked"] / r["window_s"]
        r["ack_p50_ms"] = r["ack_latency_ms"]["p50"]
        r["ack_p99_ms"] = r["ack_latency_ms"]["p99"]
        r["ack_max_ms"] = r["ack_latency_ms"]["max"]
        r["deliveries_per_s"] = r["deliveries"] / r["window_s"] if one_project else None
        r["server_cpu_us_per_mutation"] = (r["server_cpu_s"] * 1e6 / r["creates_acked"]) if r["creates_acked"] else None
        per_mutation(r)
        r["params"] = {"writers": w, "window": window, "projects": 1 if one_project else w,
                       "subscribed": subscribed, "duration_s": a.durable_duration}
        if cluster:
            r["params"]["nodes"] = "2 (writers alternate)"
        return r

    def create_cost(self, srv: Server, label: str, *, rate: float) -> dict:
        """50 writers, each in its own project, creating at a steady rate (open loop):
        what a create costs the server when commits are small."""
        a = self.a
        w = 50
        procs = self.procs_for(w, a.load_procs)
        configs = []
        k = 0
        for i, cnt in enumerate(split(w, procs)):
            groups = []
            for _ in range(cnt):
                groups.append({"count": 1, "project": f"{PROJECT}-c{k}", "token": srv.tokens["writer"],
                               "writer": True, "mode": "rate", "rate": rate / w})
                k += 1
            configs.append(dict(self.base_cfg(srv, i), groups=groups, duration=a.durable_duration))
        r = self.drive(srv, label, configs, a.durable_duration, profile_name=label.split("/")[-1])
        r["acked_per_s"] = r["creates_acked"] / r["window_s"]
        r["ack_p50_ms"] = r["ack_latency_ms"]["p50"]
        r["ack_p99_ms"] = r["ack_latency_ms"]["p99"]
        r["server_cpu_us_per_mutation"] = (r["server_cpu_s"] * 1e6 / r["creates_acked"]) if r["creates_acked"] else None
        per_mutation(r)
        r["params"] = {"writers": w, "rate_per_s": rate, "duration_s": a.durable_duration}
        return r

    def cursors(self, srv: Server, label: str) -> dict:
        a = self.a
        n, m = a.cursor_clients, min(a.cursor_movers, a.cursor_clients)
        procs = self.procs_for(n, max(a.load_procs, a.cursor_procs))
        m_counts, r_counts = split(m, procs), split(n - m, procs)
        # Latency, order and the throttle are checked at a sample of listeners, which
        # parse every frame; every other client counts the cursors in the raw bytes
        # (100 movers x 999 receivers at 20/s is ~2 million cursors/s to receive).
        s_counts = split(min(a.cursor_sample, n - m), procs)
        configs = []
        k = 0
        for i in range(len(m_counts)):
            # each mover is its own user (cursors are throttled per user) with one
            # connection; the listeners share the `reader` user
            groups = []
            for _ in range(m_counts[i]):
                groups.append({"count": 1, "project": PROJECT, "token": srv.tokens[mover_user(k)],
                               "writer": True, "mode": "cursor", "rate": a.cursor_rate, "mover": k,
                               "count_only": True})
                k += 1
            listeners = r_counts[i] if i < len(r_counts) else 0
            sample = min(listeners, s_counts[i] if i < len(s_counts) else 0)
            groups.append({"count": sample, "project": PROJECT, "token": srv.tokens["reader"], "writer": False})
            groups.append({"count": listeners - sample, "project": PROJECT, "token": srv.tokens["reader"],
                           "writer": False, "count_only": True})
            configs.append(dict(self.base_cfg(srv), groups=groups, duration=a.cursor_duration,
                                movers_total=m))
        holder: dict = {}
        r = self.drive(srv, label, configs, a.cursor_duration, profile_name="cursors", dones_out=holder)
        dones = holder["dones"]
        sent_by: dict[int, int] = {}
        for d in dones:
            for mk, v in d.get("cursor_sent_by_mover", {}).items():
                sent_by[int(mk)] = sent_by.get(int(mk), 0) + v
        got = [sum(d["cursor_received_by_mover"][i] for d in dones) for i in range(m)]
        most = [max(d["cursor_max_pair_by_mover"][i] for d in dones) for i in range(m)]
        sent = sum(sent_by.values())
        receivers = n - 1
        dur = a.cursor_duration
        r["cursor_sent"] = sent
        r["cursor_deliveries"] = sum(d["cursor_deliveries"] for d in dones)
        r["cursor_out_of_order"] = sum(d["cursor_out_of_order"] for d in dones)
        r["cursor_with_id"] = sum(d["cursor_with_id"] for d in dones)
        r["cursor_unparsable"] = sum(d["cursor_unparsable"] for d in dones)
        # every cursor sent, to every other client: what no throttle and no loss gives
        r["uncoalesced_deliveries"] = sent * receivers
        r["coalesced"] = r["uncoalesced_deliveries"] - r["cursor_deliveries"]
        r["coalesced_pct"] = 100.0 * r["coalesced"] / r["uncoalesced_deliveries"] if sent else None
        r["cursor_deliveries_per_s"] = r["cursor_deliveries"] / r["window_s"]
        r["sent_per_mover_per_s"] = sent / max(1, m) / dur
        pairs = sum(d.get("cursor_sampled_pairs", 0) for d in dones)
        r["cursor_sampled_receivers"] = sum(d.get("cursor_sampled_receivers", 0) for d in dones)
        r["cursor_counted_raw"] = sum(d.get("cursor_counted", 0) for d in dones)
        r["received_per_pair_per_s"] = (sum(got) / pairs / dur) if pairs else None
        # the most cursors any one receiver got from any one mover, per second of sending
        max_pair = max(most) if most else 0
        r["max_received_per_pair_per_s"] = max_pair / dur
        # at SERVER_CURSOR_RATE/s a mover's cursors fill at most rate * duration + 1
        # intervals (+1 for the pending one at the end); the peer does not throttle
        bound = SERVER_CURSOR_RATE * dur + 2
        r["throttle_held"] = max_pair <= bound if srv.kind == "barosync" else None
        r["server_cpu_us_per_delivery"] = (r["server_cpu_s"] * 1e6 / r["cursor_deliveries"]
                                           if r["cursor_deliveries"] else None)
        r["latency_p50_ms"] = r["latency_ms"]["p50"]
        r["latency_p99_ms"] = r["latency_ms"]["p99"]
        r["latency_max_ms"] = r["latency_ms"]["max"]
        r["params"] = {"clients": n, "movers": m, "rate_per_s": a.cursor_rate, "duration_s": dur,
                       "sampled_receivers": r["cursor_sampled_receivers"], "load_procs": len(dones)}
        return r

    # -- top level ----------------------------------------------------
    def run(self) -> dict:
        a = self.a
        results: dict = {s: {} for s in a.servers}
        meta = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "python": sys.version.split()[0],
            "cpus": sorted(os.sched_getaffinity(0)),
            "pinning": self.pinning,
            "rlimit_nofile": self.nofile,
            "barosync_config": a.barosync_config or BENCH_CONFIG,
            "smoke": a.smoke,
            "args": {k: v for k, v in vars(a).items() if k not in ("json",)},
        }
        log(f"barosync bench: {self.pinning}; RLIMIT_NOFILE {self.nofile}")
        b0, t0 = machine_busy_s(), time.monotonic()
        time.sleep(0.5)
        background = 100.0 * (machine_busy_s() - b0) / (time.monotonic() - t0)
        meta["background_cpu_pct_at_start"] = background
        if background > 15.0:
            log(f"WARNING: other processes are using {background:.0f}% of a core right now; "
                f"the figures will be disturbed")
        if a.no_acks:
            log("--no-acks: clients do NOT ack server messages (diagnosis run, not comparable to the targets)")
        for kind in a.servers:
            for sc in a.scenarios:
                if kind != "barosync" and sc not in PEER_SCENARIOS:
                    continue
                missing = peer_missing(kind, base_of(sc) == "durable")
                if missing is not None:
                    log(f"[{kind}/{sc}] skipped: {missing}")
                    meta.setdefault("skipped", {})[f"{kind}/{sc}"] = missing
                    continue
                label = f"{kind}/{sc}"
                attempts = 1 + max(0, a.retry_disturbed)
                for attempt in range(1, attempts + 1):
                    wait = a.quiet_wait if attempt == 1 else max(a.quiet_wait, 20.0)
                    if wait > 0:
                        self.wait_quiet(label, wait)
                    res = self.run_one(kind, sc, label)
                    res["attempt"] = attempt
                    other = res.get("other_cpu_pct") or 0.0
                    if res["status"] != "ok" or other <= disturbed_pct(sc) or attempt == attempts:
                        break
                    log(f"[{label}] disturbed: other processes used {other:.0f}% of a core; running it again")
                results[kind][sc] = res
        meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        return {"meta": meta, "servers": results,
                "targets": {f"{s}.{f}": lbl for (s, f), (_, _, lbl) in TARGETS.items()}}

    def wait_quiet(self, label: str, max_s: float) -> float:
        """Wait (up to max_s) until other processes use < DISTURBED_PCT of a core."""
        deadline = time.monotonic() + max_s
        said = False
        while True:
            b0, t0 = machine_busy_s(), time.monotonic()
            time.sleep(0.5)
            bg = 100.0 * (machine_busy_s() - b0) / (time.monotonic() - t0)
            if bg <= DISTURBED_PCT or time.monotonic() >= deadline:
                if said or bg > DISTURBED_PCT:
                    log(f"[{label}] background CPU now {bg:.0f}% of a core")
                return bg
            if not said:
                log(f"[{label}] waiting up to {max_s:g} s for the machine to be quiet "
                    f"(other processes use {bg:.0f}% of a core)")
                said = True

    def run_one(self, kind: str, sc: str, label: str) -> dict:
        a = self.a
        users = ["writer", "reader"]
        if sc == "cursors":
            users += [mover_user(i) for i in range(min(a.cursor_movers, a.cursor_clients))]
        method, variant = VARIANTS[sc]
        # storm and hostile start, restart and kill their own server
        if variant.get("cluster"):
            from cluster import ClusterServer

            srv = ClusterServer(self.server_cpus, users)
        else:
            srv = None if method in OWN_SERVER else Server(kind, self.server_cpus, users, config=a.barosync_config,
                                                           durable=method == "durable")
        t0 = time.monotonic()
        keep = Path(a.json).parent / "logs" / f"{kind}-{sc}.log"
        try:
            if srv is None:
                res = getattr(self, method)(label, **variant)
            else:
                log(f"[{label}] starting {kind} ...")
                srv.start()
                log(f"[{label}] {kind} pid {srv.pid} listening on {srv.host}:{srv.port}")
                res = getattr(self, method)(srv, label, **variant)
            res["status"] = "ok"
        except Exception as e:  # report and go on with the next scenario
            res = {"status": "error", "error": f"{type(e).__name__}: {e}"}
            log(f"[{label}] ERROR {res['error']}")
        finally:
            if srv is not None:
                srv.stop(keep_log=keep)
        if srv is not None:
            res["server_log"] = str(keep)
            if srv.exit_code not in (0, None) or res["status"] != "ok":
                res["server_log_tail"] = errors_from_log(keep)
            res["server_exit_code"] = srv.exit_code
        res["elapsed_s"] = time.monotonic() - t0
        if res["status"] == "ok":
            log(f"[{label}] done in {res['elapsed_s']:.1f} s: {headline(sc, res)}")
        return res


