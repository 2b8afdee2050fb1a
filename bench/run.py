#!/usr/bin/env python3
"""barosync benchmark harness: barosync and a websockets peer, side by side.

Starts a real ``barosync serve`` (fresh temp data dir, port 0, tokens minted with the
CLI) and the peer ``bench/peers/websockets_peer.py`` in turn, drives each with the
load generator ``bench/loadgen.py`` in separate processes (server and load pinned to
different cores when there are two or more), and prints a table plus a JSON file of
every figure (default ``bench/results/latest.json``).

    .venv/bin/python bench/run.py                 # full run (< 5 min on 2 cores)
    .venv/bin/python bench/run.py --smoke         # a few clients, ~1 s per scenario
    .venv/bin/python bench/run.py --scenarios fanout --fanout-clients 200
    .venv/bin/python bench/run.py --servers barosync --profile /tmp/prof

See bench/README.md for what each scenario measures and the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
LOADGEN = BENCH / "loadgen.py"
PEER = BENCH / "peers" / "websockets_peer.py"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SCENARIOS = ("fanout", "saturation", "capacity", "durable", "cursors")
SERVERS = ("barosync", "websockets")
PEER_SCENARIOS = ("fanout", "saturation", "capacity", "cursors")
PROJECT = "bench"
# barosync's default `[presence] cursor_rate` (BENCH_CONFIG keeps it): cursors fanned
# out per user per second
SERVER_CURSOR_RATE = 20.0
DISTURBED_PCT = 15.0  # other processes' CPU (% of a core) above which a figure is suspect
# barosync's defaults refuse a load test by design (at most 50 connections per user,
# 200 messages/s per connection): the bench lifts just those two guards. Its clients
# share a few users on purpose — presence is per user, so 10,000 distinct users would
# turn every subscribe into a 10,000-way user:joined broadcast.
BENCH_CONFIG = """\
# written by bench/run.py: lift the per-user connection cap and the per-connection
# rate limit, which would otherwise refuse the benchmark's load
[server]
max_connections_per_user = 1000000
rate_limit = 1000000.0
rate_burst = 10000000
"""

TARGETS = {
    # (scenario, figure): (op, value, label)
    ("fanout", "latency_p99_ms"): ("<=", 30.0, "<= 30 ms"),
    ("fanout", "in_order"): ("==", True, "all, in order"),
    ("fanout", "complete"): ("==", True, "all, in order"),
    ("fanout", "server_cpu_us_per_delivery"): ("<=", 10.0, "<= 10 us"),
    ("saturation", "server_cpu_us_per_delivery"): ("<=", 5.0, "<= 5 us"),
    ("capacity", "rss_kb_per_conn"): ("<=", 16.0, "<= 16 KB"),
    ("capacity", "held"): (">=", 10000, ">= 10,000"),
    ("durable", "acked_per_s"): (">=", 10000.0, ">= 10,000/s"),
    ("cursors", "latency_p99_ms"): ("<=", 50.0, "<= 50 ms"),
    # a single-threaded server at >= 95 % of its core is saturated: that is no "< 100 %"
    ("cursors", "server_cpu_pct"): ("<", 95.0, "< 100 % (>= 95 saturated)"),
    ("cursors", "throttle_held"): ("==", True, "<= 20/s per mover"),
}


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


# ------------------------------------------------------------------ machine
def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (max(hard, 65536), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_plan() -> tuple[set[int] | None, set[int] | None, str]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        server, load = {cpus[0]}, set(cpus[1:])
        return server, load, (f"server pinned to CPU {cpus[0]}, load generator to CPU "
                              f"{','.join(map(str, cpus[1:]))} (sched_setaffinity, as taskset -c)")
    return None, None, f"only {len(cpus)} CPU available: server and load generator share it (not pinned)"


def pinned(cpus: set[int] | None):
    if not cpus:
        return None

    def fn() -> None:
        os.sched_setaffinity(0, cpus)
    return fn


def proc_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime, all threads


def machine_busy_s() -> float:
    """CPU seconds all processes on the machine have used so far (/proc/stat)."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return (sum(vals[:8]) - idle) / CLK_TCK


def proc_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def proc_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def pct(values: list[int], p: float) -> float | None:
    if not values:
        return None
    k = min(len(values) - 1, max(0, int(round(p / 100.0 * (len(values) - 1)))))
    return values[k]


# ------------------------------------------------------------------ servers
class Server:
    """One server subprocess (barosync or the peer) with a fresh data dir."""

    def __init__(self, kind: str, cpus: set[int] | None, users: list[str],
                 config: str | None = None) -> None:
        self.kind = kind
        self.config_path = config
        self.cpus = cpus
        self.users = users
        self.tmp = Path(tempfile.mkdtemp(prefix=f"barosync-bench-{kind}-"))
        self.data = self.tmp / "data"
        self.data.mkdir()
        self.tokens: dict[str, str] = {}
        self.proc: subprocess.Popen | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self.exit_code: int | None = None
        self.log_path = self.tmp / "server.log"

    def barosync_cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "barosync", *args]

    def env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def mint(self, user: str) -> subprocess.Popen:
        return subprocess.Popen(
            self.barosync_cmd("token", "create", "--data", str(self.data), "--user", user,
                              "--all-projects", "--ttl", "86400"),
            cwd=ROOT, env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def mint_all(self) -> None:
        # The first mint creates the data dir's secret; the rest can run in parallel.
        # Beyond the first two users (the cursor scenario's 100 movers) tokens are
        # minted in-process with PyJWT and the data dir's secret, the same claims
        # as `barosync token create --all-projects` (a CLI start per user is ~0.5 s).
        procs = [(self.users[0], self.mint(self.users[0]))]
        out, err = procs[0][1].communicate(timeout=60)
        self._take_token(self.users[0], procs[0][1], out, err)
        cli, rest = self.users[1:2], self.users[2:]
        try:
            import jwt  # PyJWT, a barosync dependency, so it is in the venv
        except ImportError:
            jwt = None
            cli = self.users[1:]
        procs = [(u, self.mint(u)) for u in cli]
        for u, p in procs:
            out, err = p.communicate(timeout=60)
            self._take_token(u, p, out, err)
        if jwt is not None and rest:
            secret = (self.data / "secret").read_text().strip()
            now = int(time.time())
            for u in rest:
                self.tokens[u] = jwt.encode({"sub": u, "name": u, "projects": "*", "iat": now,
                                             "exp": now + 86400}, secret, algorithm="HS256")

    def _take_token(self, user: str, p: subprocess.Popen, out: str, err: str) -> None:
        tok = out.strip().splitlines()[-1].strip() if out.strip() else ""
        if p.returncode != 0 or not tok:
            raise RuntimeError(f"barosync token create --user {user} failed (exit {p.returncode}): "
                               f"{(err or out).strip()[-500:]}")
        self.tokens[user] = tok

    def start(self, timeout: float = 30.0) -> None:
        if self.kind == "barosync":
            self.mint_all()
            if self.config_path is None:
                self.config_path = str(self.tmp / "bench.toml")
                Path(self.config_path).write_text(BENCH_CONFIG)
            cmd = self.barosync_cmd("serve", "--config", self.config_path, "--data", str(self.data),
                                    "--port", "0", "--host", self.host)
        else:
            cmd = [sys.executable, str(PEER), "--port", "0", "--host", self.host]
            self.tokens = {u: f"peer-{u}" for u in self.users}
        logf = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env(), stdout=subprocess.PIPE,
                                     stderr=logf, preexec_fn=pinned(self.cpus))
        logf.close()
        lines: queue.Queue = queue.Queue()

        def pump() -> None:
            first = True
            with open(self.log_path, "ab") as out:
                for line in self.proc.stdout:
                    if first:
                        lines.put(line.decode("utf-8", "replace"))
                        first = False
                    else:
                        out.write(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            line = None
        if not line or not line.startswith("listening on http://"):
            self.stop()
            raise RuntimeError(f"{self.kind} did not report 'listening on' (got {line!r}); "
                               f"log tail: {self.log_tail()}")
        hostport = line.strip().split("http://", 1)[1].rstrip("/")
        host, port = hostport.rsplit(":", 1)
        self.host = host.strip("[]") if host not in ("0.0.0.0", "") else "127.0.0.1"
        self.port = int(port)

    def log_tail(self, n: int = 1500) -> str:
        try:
            return self.log_path.read_bytes()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def last_error(self) -> str:
        """The last error-looking line of the server log (for one-line reports)."""
        lines = self.log_tail(20000).splitlines()
        for line in reversed(lines):  # the exception line that ends a traceback
            if re.match(r"^[\s|+]*[\w.]*(Error|Exception|Group)\b.*:", line) and "Traceback" not in line:
                return line.strip(" |+")[:300]
        for line in reversed(lines):
            if "rror" in line or "Errno" in line:
                return line.strip(" |+")[:300]
        return f"(no error in {self.log_path.name})"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, keep_log: Path | None = None) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.exit_code = self.proc.returncode
        if keep_log is not None:
            try:
                keep_log.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.log_path, keep_log)
            except OSError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


# ------------------------------------------------------------------ load generators
class Load:
    """One or more loadgen.py processes, talked to with JSON lines."""

    def __init__(self, label: str, configs: list[dict], cpus: set[int] | None) -> None:
        self.label = label
        self.q: queue.Queue = queue.Queue()
        self.procs: list[subprocess.Popen] = []
        for i, cfg in enumerate(configs):
            cfg = dict(cfg, proc_id=i)
            p = subprocess.Popen([sys.executable, str(LOADGEN), json.dumps(cfg)], cwd=ROOT,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 preexec_fn=pinned(cpus))
            self.procs.append(p)
            threading.Thread(target=self._pump, args=(i, p), daemon=True).start()

    def _pump(self, i: int, p: subprocess.Popen) -> None:
        for line in p.stdout:
            try:
                self.q.put((i, json.loads(line)))
            except ValueError:
                self.q.put((i, {"event": "progress", "msg": line.decode("utf-8", "replace").strip()}))
        self.q.put((i, {"event": "exit", "code": p.wait()}))

    def wait_all(self, event: str, timeout: float, tick=None) -> list[dict]:
        got: dict[int, dict] = {}
        deadline = time.monotonic() + timeout
        last_progress = 0.0
        while len(got) < len(self.procs):
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{self.label}: timed out waiting for '{event}' "
                                   f"({len(got)}/{len(self.procs)} load processes)")
            try:
                i, obj = self.q.get(timeout=min(left, 0.5))
            except queue.Empty:
                if tick:
                    tick()
                continue
            ev = obj.get("event")
            if ev == event:
                got[i] = obj
            elif ev == "progress":
                if time.monotonic() - last_progress > 1.0 or len(self.procs) == 1:
                    log(f"[{self.label}] load#{i}: {obj.get('msg')}")
                    last_progress = time.monotonic()
            elif ev == "exit":
                raise RuntimeError(f"{self.label}: load process {i} exited (code {obj.get('code')}) "
                                   f"while waiting for '{event}'")
            if tick:
                tick()
        return [got[i] for i in range(len(self.procs))]

    def command(self, cmd: str) -> None:
        for p in self.procs:
            try:
                p.stdin.write(cmd.encode() + b"\n")
                p.stdin.flush()
            except (BrokenPipeError, OSError):
                pass

    def close(self) -> None:
        self.command("quit")
        for p in self.procs:
            try:
                p.stdin.close()
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def split(n: int, parts: int) -> list[int]:
    parts = max(1, min(parts, n)) if n else 1
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


# ------------------------------------------------------------------ the run
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.nofile = raise_nofile()
        self.server_cpus, self.load_cpus, self.pinning = cpu_plan()
        self.load_cores = len(self.load_cpus) if self.load_cpus else 1
        self.profiler = shutil.which("py-spy") or (
            str(Path(sys.executable).with_name("py-spy")) if Path(sys.executable).with_name("py-spy").exists() else None)

    # -- shared driver ------------------------------------------------
    def base_cfg(self, srv: Server) -> dict:
        a = self.a
        return {"host": srv.host, "port": srv.port, "connect_window": a.connect_window,
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
            state = {"t": time.monotonic(), "cpu": proc_cpu_s(srv.pid)}
            t_go = state["t"]
            cpu_go = state["cpu"]
            busy_go = machine_busy_s()

            def tick() -> None:
                now = time.monotonic()
                if now - state["t"] >= 1.0 and srv.alive():
                    cpu = proc_cpu_s(srv.pid)
                    cpu_samples.append(100.0 * (cpu - state["cpu"]) / (now - state["t"]))
                    state["t"], state["cpu"] = now, cpu

            load.command("go")
            if duration >= 2:
                log(f"[{label}] running for {duration:g} s ...")
            dones = load.wait_all("done", duration + self.a.drain_max + 60, tick=tick)
            cpu_end = proc_cpu_s(srv.pid) if srv.alive() else cpu_go
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
        return subprocess.Popen([self.profiler, "record", "--pid", str(srv.pid), "--rate", "250",
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
    def fanout(self, srv: Server, label: str) -> dict:
        a = self.a
        n = a.fanout_clients
        procs = self.procs_for(n, a.load_procs)
        counts = split(n - 1, procs)
        configs = []
        for i, cnt in enumerate(counts):
            groups = [{"count": cnt, "project": PROJECT, "token": srv.tokens["reader"], "writer": False}]
            if i == 0:
                groups.insert(0, {"count": 1, "project": PROJECT, "token": srv.tokens["writer"],
                                  "writer": True, "mode": "rate", "rate": a.fanout_rate})
            configs.append(dict(self.base_cfg(srv), groups=groups, duration=a.fanout_duration))
        r = self.drive(srv, label, configs, a.fanout_duration, profile_name="fanout")
        r["expected_deliveries"] = (r["creates_sent"] - r["creates_failed"]) * (n - 1)
        r["complete"] = r["deliveries"] == r["expected_deliveries"] and r["deliveries"] > 0
        r["in_order"] = r["out_of_order"] == 0 and r["gaps"] == 0
        r["latency_p50_ms"] = r["latency_ms"]["p50"]
        r["latency_p99_ms"] = r["latency_ms"]["p99"]
        r["latency_max_ms"] = r["latency_ms"]["max"]
        r["server_cpu_us_per_delivery"] = per_delivery(r)
        r["bytes_per_delivery"] = r["bytes_in"] / r["deliveries"] if r["deliveries"] else None
        r["params"] = {"clients": n, "rate_per_s": a.fanout_rate, "duration_s": a.fanout_duration}
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
        r = driven()
        held = r["open_after"]
        r["held"] = held
        r["rss_kb_per_conn"] = (r["rss_after_kb"] - r["rss_before_kb"]) / max(1, r["subscribed"])
        r["connects_per_s"] = r["subscribed"] / max(1e-6, r["connect_all_s"])
        r["fds_per_conn"] = (r["fds_after"] - r["fds_before"]) / max(1, r["subscribed"])
        r["params"] = {"connections": n, "hold_s": hold}
        return r

    def durable(self, srv: Server, label: str) -> dict:
        a = self.a
        w = a.durable_writers
        procs = self.procs_for(w, a.load_procs)
        configs = []
        k = 0
        for cnt in split(w, procs):
            groups = []
            for _ in range(cnt):
                # each writer alone in its own project: measures the durable write path,
                # not fan-out
                groups.append({"count": 1, "project": f"{PROJECT}-d{k}", "token": srv.tokens["writer"],
                               "writer": True, "mode": "window", "window": a.durable_window})
                k += 1
            configs.append(dict(self.base_cfg(srv), groups=groups, duration=a.durable_duration))
        r = self.drive(srv, label, configs, a.durable_duration, profile_name="durable")
        r["acked_per_s"] = r["creates_acked"] / r["window_s"]
        r["ack_p50_ms"] = r["ack_latency_ms"]["p50"]
        r["ack_p99_ms"] = r["ack_latency_ms"]["p99"]
        r["ack_max_ms"] = r["ack_latency_ms"]["max"]
        r["server_cpu_us_per_mutation"] = (r["server_cpu_s"] * 1e6 / r["creates_acked"]) if r["creates_acked"] else None
        r["params"] = {"writers": w, "window": a.durable_window, "duration_s": a.durable_duration}
        return r

    def cursors(self, srv: Server, label: str) -> dict:
        a = self.a
        n, m = a.cursor_clients, min(a.cursor_movers, a.cursor_clients)
        procs = self.procs_for(n, a.load_procs)
        m_counts, r_counts = split(m, procs), split(n - m, procs)
        configs = []
        k = 0
        for i in range(len(m_counts)):
            # each mover is its own user (cursors are throttled per user) with one
            # connection; the listeners share the `reader` user
            groups = []
            for _ in range(m_counts[i]):
                groups.append({"count": 1, "project": PROJECT, "token": srv.tokens[mover_user(k)],
                               "writer": True, "mode": "cursor", "rate": a.cursor_rate, "mover": k})
                k += 1
            groups.append({"count": r_counts[i] if i < len(r_counts) else 0, "project": PROJECT,
                           "token": srv.tokens["reader"], "writer": False})
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
        r["received_per_pair_per_s"] = (sum(got) / (max(1, m) * receivers) / dur) if receivers else None
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
        r["params"] = {"clients": n, "movers": m, "rate_per_s": a.cursor_rate, "duration_s": dur}
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
                if kind == "websockets" and sc not in PEER_SCENARIOS:
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
        srv = Server(kind, self.server_cpus, users, config=a.barosync_config)
        t0 = time.monotonic()
        keep = Path(a.json).parent / "logs" / f"{kind}-{sc}.log"
        try:
            log(f"[{label}] starting {kind} ...")
            srv.start()
            log(f"[{label}] {kind} pid {srv.pid} listening on {srv.host}:{srv.port}")
            res = getattr(self, sc)(srv, label)
            res["status"] = "ok"
        except Exception as e:  # report and go on with the next scenario
            res = {"status": "error", "error": f"{type(e).__name__}: {e}"}
            log(f"[{label}] ERROR {res['error']}")
        finally:
            srv.stop(keep_log=keep)
        res["server_log"] = str(keep)
        if srv.exit_code not in (0, None) or res["status"] != "ok":
            res["server_log_tail"] = errors_from_log(keep)
        res["server_exit_code"] = srv.exit_code
        res["elapsed_s"] = time.monotonic() - t0
        if res["status"] == "ok":
            log(f"[{label}] done in {res['elapsed_s']:.1f} s: {headline(sc, res)}")
        return res


def mover_user(i: int) -> str:
    return f"mover-{i:04d}"


def errors_from_log(path: Path, limit: int = 2000) -> str:
    """The non-INFO lines of a server log (tracebacks, errors), last ``limit`` chars."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    lines = [ln for ln in text.splitlines() if " INFO " not in ln and " DEBUG " not in ln]
    return "\n".join(lines)[-limit:]


def disturbed_pct(scenario: str) -> float:
    # capacity measures memory and connect time; 10,000 sockets cost the kernel some
    # CPU that no process is charged for, so allow more there
    return 50.0 if scenario == "capacity" else DISTURBED_PCT


def merge_counts(dicts) -> dict:
    out: dict = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def ms_summary(sorted_us: list[int], max_us: int) -> dict:
    return {
        "samples": len(sorted_us),
        "p50": None if not sorted_us else pct(sorted_us, 50) / 1000.0,
        "p90": None if not sorted_us else pct(sorted_us, 90) / 1000.0,
        "p99": None if not sorted_us else pct(sorted_us, 99) / 1000.0,
        "max": None if not sorted_us else max_us / 1000.0,
    }


def per_delivery(r: dict) -> float | None:
    return r["server_cpu_s"] * 1e6 / r["deliveries"] if r["deliveries"] else None


def headline(sc: str, r: dict) -> str:
    if sc == "fanout":
        return (f"p50 {fmt(r['latency_p50_ms'])} ms, p99 {fmt(r['latency_p99_ms'])} ms, "
                f"{r['deliveries']}/{r['expected_deliveries']} deliveries, in order: {r['in_order']}, "
                f"{fmt(r['server_cpu_us_per_delivery'])} us/delivery")
    if sc == "saturation":
        return (f"{fmt(r['deliveries_per_s'])} deliveries/s, {fmt(r['server_cpu_us_per_delivery'])} us/delivery, "
                f"server CPU {fmt(r['server_cpu_pct'])}%, load CPU {fmt(r['loadgen_cpu_pct'])}%")
    if sc == "capacity":
        return (f"{r['held']} held, {fmt(r['rss_kb_per_conn'])} KB/conn, "
                f"connect all {fmt(r['connect_all_s'])} s")
    if sc == "durable":
        return (f"{fmt(r['acked_per_s'])} acked/s, ack p50 {fmt(r['ack_p50_ms'])} ms, "
                f"p99 {fmt(r['ack_p99_ms'])} ms")
    if sc == "cursors":
        return (f"{fmt(r['cursor_deliveries_per_s'])} cursor deliveries/s, p50 {fmt(r['latency_p50_ms'])} ms, "
                f"p99 {fmt(r['latency_p99_ms'])} ms, server CPU {fmt(r['server_cpu_pct'])}%, "
                f"{fmt(r['server_cpu_us_per_delivery'])} us/delivery, coalesced {fmt(r['coalesced_pct'])}%, "
                f"load CPU {fmt(r['loadgen_cpu_pct'])}%")
    return ""


# ------------------------------------------------------------------ table
def fmt(v, nd: int | None = None) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if nd is not None:
            return f"{v:,.{nd}f}"
        a = abs(v)
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.0f}"
        if a >= 10:
            return f"{v:.1f}"
        return f"{v:.2f}"
    return str(v)


ROWS = [
    # scenario, key (dotted path), label
    ("fanout", "latency_p50_ms", "latency p50 (ms)"),
    ("fanout", "latency_p99_ms", "latency p99 (ms)"),
    ("fanout", "latency_max_ms", "latency max (ms)"),
    ("fanout", "deliveries", "deliveries"),
    ("fanout", "expected_deliveries", "expected deliveries"),
    ("fanout", "complete", "all delivered"),
    ("fanout", "in_order", "in seq order"),
    ("fanout", "server_cpu_pct", "server CPU (%)"),
    ("fanout", "server_cpu_us_per_delivery", "server CPU us/delivery"),
    ("fanout", "bytes_per_delivery", "bytes on the wire/delivery"),
    ("fanout", "loadgen_cpu_pct", "load gen CPU (%)"),
    ("saturation", "deliveries_per_s", "deliveries/s"),
    ("saturation", "creates_per_s", "creates acked/s"),
    ("saturation", "server_cpu_us_per_delivery", "server CPU us/delivery"),
    ("saturation", "bytes_per_delivery", "bytes on the wire/delivery"),
    ("saturation", "server_cpu_pct", "server CPU (%)"),
    ("saturation", "latency_ms.p50", "latency p50 (ms)"),
    ("saturation", "latency_ms.p99", "latency p99 (ms)"),
    ("saturation", "complete", "all delivered"),
    ("saturation", "in_order", "in seq order"),
    ("saturation", "loadgen_cpu_pct", "load gen CPU (%)"),
    ("capacity", "held", "connections held"),
    ("capacity", "rss_kb_per_conn", "server RSS per conn (KB)"),
    ("capacity", "rss_after_kb", "server RSS total (KB)"),
    ("capacity", "connect_all_s", "time to connect all (s)"),
    ("capacity", "connects_per_s", "connects/s"),
    ("capacity", "fds_per_conn", "server fds per conn"),
    ("durable", "acked_per_s", "acked mutations/s"),
    ("durable", "ack_p50_ms", "ack latency p50 (ms)"),
    ("durable", "ack_p99_ms", "ack latency p99 (ms)"),
    ("durable", "server_cpu_pct", "server CPU (%)"),
    ("durable", "server_cpu_us_per_mutation", "server CPU us/mutation"),
    ("durable", "creates_failed", "failed (error answers)"),
    ("cursors", "cursor_deliveries_per_s", "cursor deliveries/s"),
    ("cursors", "server_cpu_pct", "server CPU (%)"),
    ("cursors", "server_cpu_us_per_delivery", "server CPU us/delivery"),
    ("cursors", "latency_p50_ms", "cursor latency p50 (ms)"),
    ("cursors", "latency_p99_ms", "cursor latency p99 (ms)"),
    ("cursors", "latency_max_ms", "cursor latency max (ms)"),
    ("cursors", "latency_from_server_receipt_ms.p50", "  from server receipt p50 (ms)"),
    ("cursors", "latency_from_server_receipt_ms.p99", "  from server receipt p99 (ms)"),
    ("cursors", "cursor_sent", "cursors sent"),
    ("cursors", "sent_per_mover_per_s", "sent per mover (/s)"),
    ("cursors", "uncoalesced_deliveries", "sent x other clients"),
    ("cursors", "cursor_deliveries", "cursor deliveries"),
    ("cursors", "coalesced_pct", "coalesced or not delivered (%)"),
    ("cursors", "received_per_pair_per_s", "per receiver per mover (/s)"),
    ("cursors", "max_received_per_pair_per_s", "  max over pairs (/s)"),
    ("cursors", "throttle_held", "throttle held"),
    ("cursors", "loadgen_cpu_pct", "load gen CPU (%)"),
]


def first_error(r: dict) -> str:
    for line in reversed((r.get("server_log_tail") or "").splitlines()):
        if "rror" in line or "Errno" in line or "Traceback" in line:
            return line.strip()[:240]
    return "see " + str(r.get("server_log") or "the server log")


def getpath(d: dict, path: str):
    for part in path.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d


def check(sc: str, key: str, v) -> str:
    t = TARGETS.get((sc, key))
    if t is None or v is None:
        return ""
    op, want, label = t
    ok = {"<=": lambda: v <= want, ">=": lambda: v >= want, "==": lambda: v == want,
          "<": lambda: v < want}[op]()
    return f"{label} {'ok' if ok else 'MISS'}"


def table(report: dict) -> str:
    smoke = report["meta"].get("smoke")
    servers = report["servers"]
    b = servers.get("barosync", {})
    p = servers.get("websockets", {})
    head = ["figure", "barosync", "websockets peer", "ratio b/p", "target"]
    lines = []
    widths = [34, 16, 16, 10, 22]

    def row(cells) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) if i < 4 else str(c)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    lines.append(row(head))
    lines.append("-" * (sum(widths) + 8))
    for sc in SCENARIOS:
        rb, rp = b.get(sc), p.get(sc)
        if rb is None and rp is None:
            continue
        params = (rb or {}).get("params") or (rp or {}).get("params") or {}
        ptxt = ", ".join(f"{k}={v}" for k, v in params.items())
        lines.append(f"[{sc}] {ptxt}")
        for s, r in (("barosync", rb), ("peer", rp)):
            if r is not None and r.get("status") != "ok":
                lines.append(f"  {s}: ERROR {r.get('error')}")
        for rsc, key, label in ROWS:
            if rsc != sc:
                continue
            vb = getpath(rb, key) if rb and rb.get("status") == "ok" else None
            vp = getpath(rp, key) if rp and rp.get("status") == "ok" else None
            if vb is None and vp is None:
                continue
            ratio = ""
            if isinstance(vb, (int, float)) and isinstance(vp, (int, float)) \
                    and not isinstance(vb, bool) and vp:
                ratio = f"{vb / vp:.2f}x"
            lines.append(row(["  " + label, fmt(vb), fmt(vp) if rp is not None else "n/a",
                              ratio, "(full run only)" if smoke and (sc, key) in TARGETS
                              else check(sc, key, vb)]))
        for s, r in (("barosync", rb), ("peer", rp)):
            if r and r.get("status") == "ok":
                notes = []
                if r.get("loadgen_bound"):
                    notes.append(f"LOAD GENERATOR WAS THE BOTTLENECK (its CPU {fmt(r['loadgen_cpu_pct'])}%, "
                                 f"peak {fmt(r['loadgen_cpu_pct_peak_1s'])}%)")
                if (r.get("other_cpu_pct") or 0) > disturbed_pct(sc):
                    notes.append(f"other processes used {fmt(r['other_cpu_pct'])}% of a core meanwhile: "
                                 f"figures disturbed, rerun on a quiet machine")
                if r.get("errors"):
                    notes.append(f"{r['errors']} error messages, e.g. {r.get('error_samples', [])[:1]}")
                if r.get("closed_unexpectedly"):
                    notes.append(f"{r['closed_unexpectedly']} connections closed {r.get('close_codes')}")
                if r.get("connect_failures"):
                    notes.append(f"{r['connect_failures']} connects failed {r.get('http_errors')}")
                if r.get("connects_stalled"):
                    notes.append(f"{r['connects_stalled']} connections never completed (gave up after "
                                 f"no progress for 15 s; time to connect counts up to the last success)")
                if not r.get("server_alive", True) or r.get("server_exit_code") not in (0, None):
                    notes.append(f"server exit code {r.get('server_exit_code')} "
                                 f"(alive at end of run: {r.get('server_alive')}): {first_error(r)}")
                if r.get("out_of_order") or r.get("gaps"):
                    notes.append(f"{r.get('out_of_order')} out of order, {r.get('gaps')} gaps")
                if r.get("cursor_out_of_order"):
                    notes.append(f"{r['cursor_out_of_order']} cursors arrived older than one already "
                                 f"received from the same mover")
                if r.get("cursor_with_id"):
                    notes.append(f"{r['cursor_with_id']} user:cursor messages carried an id (they must not)")
                if r.get("cursor_unparsable"):
                    notes.append(f"{r['cursor_unparsable']} user:cursor messages without the mover's x/y/elementId")
                for n_ in notes:
                    lines.append(f"  ! {s}: {n_}")
    return "\n".join(lines)


# ------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="barosync benchmark: barosync vs an asyncio+websockets peer")
    ap.add_argument("--smoke", action="store_true", help="tiny run: a few clients, ~1 s per scenario")
    ap.add_argument("--json", default=str(BENCH / "results" / "latest.json"), help="where to write all figures")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma list of " + ",".join(SCENARIOS))
    ap.add_argument("--servers", default="barosync,websockets", help="comma list of barosync,websockets")
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
    ap.add_argument("--durable-window", type=int, default=1, help="creates in flight per writer")
    ap.add_argument("--durable-duration", type=float, default=10.0)
    ap.add_argument("--cursor-clients", type=int, default=1000)
    ap.add_argument("--cursor-movers", type=int, default=100, help="clients moving cursors, one user each")
    ap.add_argument("--cursor-rate", type=float, default=20.0, help="cursor moves/s per mover")
    ap.add_argument("--cursor-duration", type=float, default=10.0)
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
    a = ap.parse_args(argv)
    if a.smoke:
        d = ap.parse_args([])  # defaults, to tell which flags were given explicitly

        def small(name: str, value) -> None:
            if getattr(a, name) == getattr(d, name):
                setattr(a, name, value)
        small("fanout_clients", 10)
        small("fanout_rate", 20.0)
        small("fanout_duration", 1.0)
        small("sat_clients", 8)
        small("sat_writers", 2)
        small("sat_window", 8)
        small("sat_duration", 1.0)
        small("cap_conns", 50)
        small("cap_hold", 0.2)
        small("durable_writers", 4)
        small("durable_duration", 1.0)
        small("cursor_clients", 10)
        small("cursor_movers", 3)
        small("cursor_duration", 1.0)
        small("drain_idle", 0.3)
        small("settle", 0.1)
        small("setup_timeout", 30.0)
        small("quiet_wait", 0.0)
        small("retry_disturbed", 0)
    a.scenarios = [s.strip() for s in a.scenarios.split(",") if s.strip()]
    a.servers = [("websockets" if s.strip() in ("peer", "websockets") else s.strip())
                 for s in a.servers.split(",") if s.strip()]
    for s in a.scenarios:
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
