"""The benchmark's machinery: the servers under test (barosync and the websockets
peer) as subprocesses, the load generator processes, CPU pinning and /proc readings,
and the constants every scenario shares. Scenarios are scenarios.py, the table is
report.py, the command line is run.py.
"""

from __future__ import annotations

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
NODE_PEER = BENCH / "peers" / "ws_peer.cjs"
# `make bench` installs ws and better-sqlite3 here (`make test` only ws: building
# better-sqlite3 takes a minute of compiling)
NODE_MODULES = ROOT / ".venv" / "node" / "node_modules"
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Every scenario: the measurement it runs (a method of scenarios.Bench) and what it
# changes in it. Variants share their base's rows in the table.
VARIANTS: dict[str, tuple[str, dict]] = {
    "fanout": ("fanout", {}),
    # our own clients' cumulative acks, one {"projectId","seq"} per ~100 ms
    "fanout_upto": ("fanout", {"ack_mode": "upto"}),
    "saturation": ("saturation", {}),
    "capacity": ("capacity", {}),
    "durable": ("durable", {"window": 1, "one_project": False}),
    "durable_w4": ("durable", {"window": 4, "one_project": False}),
    # a team's shared calendar: the 100 writers in one project, each subscribed to it
    "durable_one": ("durable", {"window": 1, "one_project": True}),
    "durable_one_w4": ("durable", {"window": 4, "one_project": True}),
    # the same project, writers that do not subscribe: the storage path alone
    "durable_one_nosub": ("durable", {"window": 1, "one_project": True, "subscribed": False}),
    # the cost of a create at moderate, steady load (open loop)
    "create_1k": ("create_cost", {"rate": 1000.0}),
    "create_5k": ("create_cost", {"rate": 5000.0}),
    "cursors": ("cursors", {}),
    "snapshot": ("snapshot", {}),
    # load held, nothing lost (each starts, restarts and kills its own server)
    "storm": ("storm", {}),
    # the same clients over three nodes on PostgreSQL + Redis, moving between them,
    # through a node's kill -9, a Redis restart and a PostgreSQL crash
    "cluster_storm": ("cluster_storm", {}),
    "hostile": ("hostile", {}),
    # CalDAV sync beside Radicale (bench/caldav_sync.py runs both servers)
    "caldav": ("caldav", {}),
    # two nodes on PostgreSQL + Redis (bench/cluster.py): the writer on one node and
    # the subscribers over both; 100 writers over both
    "cluster_fanout": ("fanout", {"cluster": True}),
    "cluster_durable": ("durable", {"window": 1, "one_project": False, "cluster": True}),
}
SCENARIOS = tuple(VARIANTS)
# The peers: asyncio + websockets (bench/peers/websockets_peer.py) and Node's ws
# (bench/peers/ws_peer.cjs); in the durable scenarios both store each create in
# SQLite before its ack.
SERVERS = ("barosync", "websockets", "ws")
PEERS = ("websockets", "ws")
PEER_SCENARIOS = ("fanout", "saturation", "capacity", "cursors", "durable", "durable_w4")


def peer_missing(kind: str, durable: bool) -> str | None:
    """Why this peer cannot run here (and what to do), or None."""
    if kind != "ws":
        return None
    if shutil.which("node") is None:
        return "node is not installed (apt-get install nodejs npm; then make bench)"
    for module in ("ws", *(("better-sqlite3",) if durable else ())):
        if not (NODE_MODULES / module).is_dir():
            return f"{module} is not in {NODE_MODULES} (make bench installs it)"
    return None


def base_of(scenario: str) -> str:
    return VARIANTS[scenario][0]
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
    ("fanout_upto", "latency_p99_ms"): ("<=", 30.0, "<= 30 ms"),
    ("fanout_upto", "in_order"): ("==", True, "all, in order"),
    ("fanout_upto", "complete"): ("==", True, "all, in order"),
    ("fanout_upto", "server_cpu_us_per_delivery"): ("<=", 10.0, "<= 10 us"),
    ("saturation", "server_cpu_us_per_delivery"): ("<=", 5.0, "<= 5 us"),
    ("capacity", "rss_kb_per_conn"): ("<=", 16.0, "<= 16 KB"),
    ("capacity", "held"): (">=", 10000, ">= 10,000"),
    ("durable", "acked_per_s"): (">=", 15000.0, ">= 15,000/s"),
    ("durable_one", "acked_per_s"): (">=", 15000.0, ">= 15,000/s"),
    ("cursors", "latency_p99_ms"): ("<=", 50.0, "<= 50 ms"),
    # a single-threaded server at >= 95 % of its core is saturated: that is no "< 100 %"
    ("cursors", "server_cpu_pct"): ("<", 95.0, "< 100 % (>= 95 saturated)"),
    ("cursors", "throttle_held"): ("==", True, "<= 20/s per mover"),
    ("storm", "nothing_lost"): ("==", True, "0 gaps/dups/lost, all converged"),
    ("cluster_storm", "nothing_lost"): ("==", True, "0 gaps/dups/lost, all converged, nodes agree"),
    ("cluster_storm", "presence_in_window"): ("==", True, "<= 11 s (docs/cluster.md)"),
    ("hostile", "crashes"): ("==", 0, "0"),
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


def _proc_times(pid: int) -> tuple[float, float]:
    """User and kernel CPU seconds of a process, all threads (utime, stime)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def proc_cpu_s(pid: int) -> float:
    return sum(_proc_times(pid))


def proc_costs(pid: int) -> dict[str, float | None]:
    """What a process has spent so far: user and kernel CPU seconds (all threads) and
    the bytes it caused to be written to storage (/proc/PID/io ``write_bytes``: page
    cache pages it dirtied, so socket writes do not count)."""
    user, kernel = _proc_times(pid)
    costs: dict[str, float | None] = {"user_s": user, "kernel_s": kernel, "storage_bytes": None}
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("write_bytes:"):
                    costs["storage_bytes"] = float(line.split()[1])
    except OSError:
        pass  # a kernel without task I/O accounting: no storage figure
    return costs


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
                 config: str | None = None, durable: bool = False) -> None:
        self.kind = kind
        self.durable = durable  # a peer stores each create (SQLite) before its ack
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
            if self.kind == "ws":
                cmd = ["node", str(NODE_PEER), "--port", "0", "--host", self.host]
            else:
                cmd = [sys.executable, str(PEER), "--port", "0", "--host", self.host]
            if self.durable:
                cmd += ["--durable", str(self.data / "peer.sqlite")]
            self.tokens = {u: f"peer-{u}" for u in self.users}
        logf = open(self.log_path, "wb")
        env = self.env()
        if self.kind == "ws":
            env["NODE_PATH"] = str(NODE_MODULES)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
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


