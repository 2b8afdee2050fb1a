"""Several nodes keep every single-node promise: bench/storm.py's clients spread over
three nodes sharing PostgreSQL and Redis, through everything that can go wrong there.

    python bench/cluster_storm.py [--clients 450] [--nodes 3] [--procs 3] [--json PATH]

Real `barosync serve` nodes on one PostgreSQL log and one Redis bus (Debian's packages,
started in temp dirs as the tests do). Every client starts on one node and moves to
the next at each reconnect; writers on every node keep each mutation until it is acked
and resend it, same envelope id, through whichever node they reach next. A presence
probe holds a few users on the node that will be killed and watches them from another.
The timeline, with steady writing around each step:

1. every connection dropped at once (everyone moves to another node);
2. a node killed with kill -9 and restarted;
3. Redis killed and started again;
4. PostgreSQL stopped immediately (as a crash) and started again;
5. writes stop; everyone catches up.

Then, per client: 0 gaps, 0 duplicates, 0 own changes echoed before their ack; per
project: 0 acked writes lost, 0 applied twice, every node's REST view and a fresh
snapshot from every node equal, every client's copy equal to them; and the killed
node's users gone from the others' presence within its liveness window.

Run by `bench/run.py --scenarios cluster_storm` and tests/test_cluster_storm.py; prints
one JSON line at the end with --json -.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import secrets
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(HERE))

from storm import CONFIG, PROJECTS, Server, load_process, sound, summarize  # noqa: E402

GHOSTS = 3  # users the presence probe holds on the node that is killed
# A node's users leave the others' presence once its liveness key expires (bus.py's
# NODE_TTL) and a presence check notices (CHECK_INTERVAL): docs/cluster.md's promise.
LIVENESS_WINDOW_S = 10 + 1.0
# The share of mutations after which the writer hangs up at once, as if the answer
# were lost, and resends through the next node (storm.load_process's ``lose``).
LOSE = 0.03


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} [cluster-storm] {msg}", file=sys.stderr, flush=True)


def presence_probe(victim: int, observer: int, secret: str, commands: "mp.Queue[str]",
                   results: "mp.Queue[dict[str, Any]]") -> None:
    """GHOSTS users subscribed on the ``victim`` node (never reconnecting) and one
    observer on another node, which notes when each ghost joins and leaves."""
    import trio
    from trio_websocket import ConnectionClosed, open_websocket_url

    from barosync.hooks.auth import create_token

    project = "p0"
    ghosts = [f"ghost{i}" for i in range(GHOSTS)]
    joined: dict[str, float] = {}
    left: dict[str, float] = {}

    def url(port: int, user: str) -> str:
        return f"ws://127.0.0.1:{port}/ws?token={create_token(secret, user_id=user, projects=[project], ttl=86400)}"

    async def subscribe(ws: Any) -> None:
        await ws.send_message(json.dumps({"type": "subscribe", "id": "sub", "payload": {"projectId": project}}))

    async def ghost(user: str) -> None:
        try:
            async with open_websocket_url(url(victim, user)) as ws:
                await subscribe(ws)
                while True:
                    msg = json.loads(await ws.get_message())
                    if msg.get("id") and msg["type"].startswith("event:"):
                        await ws.send_message(json.dumps({"type": "ack", "id": msg["id"]}))
        except (ConnectionClosed, OSError, trio.BrokenResourceError):
            pass  # its node was killed: it stays away

    async def watch() -> None:
        while True:  # reconnects to the same node if that connection ends (PostgreSQL away)
            try:
                async with open_websocket_url(url(observer, "observer"), max_message_size=64 << 20) as ws:
                    await subscribe(ws)
                    while True:
                        msg = json.loads(await ws.get_message())
                        who = (msg.get("payload") or {}).get("id")
                        if msg["type"] == "user:joined" and who in ghosts:
                            joined.setdefault(who, time.time())
                        elif msg["type"] == "user:left" and who in ghosts and who in joined:
                            left.setdefault(who, time.time())
                        elif msg.get("id") and msg["type"].startswith("event:"):
                            await ws.send_message(json.dumps({"type": "ack", "id": msg["id"]}))
            except (ConnectionClosed, OSError, trio.BrokenResourceError):
                await trio.sleep(0.2)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            for user in ghosts:
                nursery.start_soon(ghost, user)
            while True:
                try:
                    command = commands.get_nowait()
                except Exception:
                    await trio.sleep(0.05)
                    continue
                results.put({"joined": dict(joined), "left": dict(left)})
                if command == "report":
                    nursery.cancel_scope.cancel()
                    return

    trio.run(main)


def fresh_snapshot(port: int, token: str, project: str) -> dict[str, int]:
    """A subscribe from nothing on one node: the project as a newcomer gets it."""
    from websockets.sync.client import connect

    with connect(f"ws://127.0.0.1:{port}/ws?token={token}", max_size=None, open_timeout=30) as ws:
        ws.recv(timeout=30)  # hello
        ws.send(json.dumps({"type": "subscribe", "id": "snap", "payload": {"projectId": project}}))
        while True:
            msg = json.loads(ws.recv(timeout=30))
            if msg["type"] == "sync:snapshot":
                return {e["id"]: e["version"] for e in msg["payload"]["events"]}


class Cluster:
    """PostgreSQL, Redis and the nodes, in one temp dir; ``close`` leaves nothing."""

    def __init__(self, tmp: Path, nodes: int) -> None:
        from pg_helpers import Postgres
        from redis_helpers import Redis

        self.postgres = Postgres()
        self.redis = Redis()
        self.secret = secrets.token_urlsafe(32)
        config = tmp / "node.toml"
        config.write_text(CONFIG + f'\n[auth]\nsecret = "{self.secret}"\n\n[cluster]\n'
                          f'postgres = "{self.postgres.new_database()}"\nredis = "{self.redis.url}"\n')
        self.nodes = [Server(tmp / f"node{i}", config) for i in range(nodes)]

    def start(self) -> None:
        for node in self.nodes:
            node.start()

    def close(self) -> None:
        for node in self.nodes:
            node.kill()
        self.redis.close()
        self.postgres.close()


def run(clients: int, nodes: int, procs: int, rate: float, steady: float = 3.0, lose: float = LOSE) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="barosync-cluster-storm-"))
    cluster = None
    try:
        cluster = Cluster(tmp, nodes)
        return _run(cluster, clients, procs, rate, steady, lose)
    finally:
        if cluster is not None:
            cluster.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _run(cluster: Cluster, clients: int, procs: int, rate: float, steady: float, lose: float) -> dict[str, Any]:
    from barosync.hooks.auth import create_token

    cluster.start()
    nodes = cluster.nodes
    ports = [node.port for node in nodes]
    victim, watcher = nodes[1], nodes[0]
    log(f"{len(nodes)} nodes on ports {ports}, PostgreSQL on {cluster.postgres.port}, Redis on {cluster.redis.port}")
    commands = [mp.Queue() for _ in range(procs)]
    results: mp.Queue = mp.Queue()
    workers = [mp.Process(target=load_process, args=(n, procs, ports, cluster.secret,
                                                     clients // procs + (n < clients % procs), rate / procs,
                                                     commands[n], results, lose), daemon=True)
               for n in range(procs)]
    probe_commands: mp.Queue = mp.Queue()
    probe_results: mp.Queue = mp.Queue()
    probe = mp.Process(target=presence_probe, args=(victim.port, watcher.port, cluster.secret,
                                                    probe_commands, probe_results), daemon=True)
    for w in [*workers, probe]:
        w.start()
    out: dict[str, Any] = {"clients": clients, "nodes": len(nodes), "load_procs": procs, "rate_per_s": rate,
                           "lose": lose, "recover_s": {}}

    def status() -> list[dict[str, Any]]:
        for q in commands:
            q.put("status")
        return [results.get(timeout=60) for _ in commands]

    def presence() -> dict[str, Any]:
        probe_commands.put("status")
        return probe_results.get(timeout=30)

    def wait_live(what: str, timeout: float = 120) -> float:
        t0 = time.monotonic()
        live = 0
        while time.monotonic() - t0 < timeout:
            st = status()
            live = sum(s["live"] for s in st)
            if live == clients:
                took = time.monotonic() - t0
                log(f"{what}: all {clients} clients live in {took:.1f} s ({sum(s['pending'] for s in st)} "
                    f"mutations waiting for an ack)")
                out["recover_s"][what] = took
                return took
            time.sleep(0.25)
        log(f"{what}: only {live}/{clients} clients live after {timeout:.0f} s")
        out["recover_s"][what] = None
        return float("inf")

    wait_live("start")
    t0 = time.monotonic()
    while len(presence()["joined"]) < GHOSTS and time.monotonic() - t0 < 30:
        time.sleep(0.2)
    time.sleep(steady)

    log("every connection dropped at once: each client moves to the next node")
    for q in commands:
        q.put("drop")
    time.sleep(0.5)
    wait_live("disconnect storm")
    time.sleep(steady)

    log(f"kill -9 of node {nodes.index(victim)} (port {victim.port}), then restarted")
    killed_at = time.time()
    victim.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    out["killed_exit_code"] = victim.proc.wait(timeout=30)  # type: ignore[union-attr]
    time.sleep(0.5)
    victim.start()  # same port, same data directory
    wait_live("kill -9 of a node")
    deadline = time.monotonic() + LIVENESS_WINDOW_S + 20
    seen = presence()
    while len(seen["left"]) < GHOSTS and time.monotonic() < deadline:
        time.sleep(0.2)
        seen = presence()
    gone = [seen["left"][g] - killed_at for g in sorted(seen["left"])]
    out["presence_gone_s"] = max(gone) if len(gone) == GHOSTS else None
    out["presence_gone_each_s"] = gone
    log(f"the killed node's {GHOSTS} users left everyone's presence after "
        f"{', '.join(f'{g:.1f}' for g in gone) or 'never'} s (window {LIVENESS_WINDOW_S:g} s)")
    time.sleep(steady)

    log("Redis killed and started again")
    cluster.redis.kill()
    time.sleep(0.5)
    cluster.redis.start()
    wait_live("Redis restart")
    time.sleep(steady)

    log("PostgreSQL stopped immediately (as a crash) and started again")
    cluster.postgres.stop(immediate=True)
    time.sleep(0.5)
    cluster.postgres.start()
    wait_live("PostgreSQL restart")
    time.sleep(steady)

    for q in commands:
        q.put("stop-writing")
    log("writes stopped; waiting for every client to catch up")
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120:
        st = status()
        if sum(s["pending"] for s in st) == 0 and sum(s["live"] for s in st) == clients:
            break
        time.sleep(0.5)
    out["quiet_s"] = time.monotonic() - t0
    time.sleep(min(2.0, max(steady, 1.0)))  # the last changes' fan-out, across the bus
    for q in commands:
        q.put("report")
    reports = [results.get(timeout=60) for _ in commands]
    probe_commands.put("report")
    probe_results.get(timeout=30)

    checker = create_token(cluster.secret, user_id="checker", projects="*", ttl=3600)
    projects = [f"p{p}" for p in range(PROJECTS)]
    views = {node.port: {p: node.events(p, checker) for p in projects} for node in nodes}
    snapshots = {node.port: {p: fresh_snapshot(node.port, checker, p) for p in projects} for node in nodes}
    reference = views[ports[0]]
    out["nodes_agree"] = all(view == reference for view in views.values())
    out["snapshots_agree"] = all(snap == reference for snap in snapshots.values())
    out.update(summarize(reports, reference))
    for node in nodes:
        node.stop()
    for w in [*workers, probe]:
        w.join(timeout=10)
        if w.is_alive():
            w.kill()
    out["nothing_lost"] = sound(out) and out["nodes_agree"] and out["snapshots_agree"]
    out["presence_in_window"] = out["presence_gone_s"] is not None and out["presence_gone_s"] <= LIVENESS_WINDOW_S
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=450)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--procs", type=int, default=3, help="load processes")
    ap.add_argument("--rate", type=float, default=150.0, help="mutations/s in all")
    ap.add_argument("--steady", type=float, default=3.0, help="seconds of steady writing around each disruption")
    ap.add_argument("--lose", type=float, default=LOSE, help="share of mutations whose answer is lost (hang up, resend)")
    ap.add_argument("--json", help="write the result here (- for stdout)")
    a = ap.parse_args(argv)
    out = run(a.clients, a.nodes, a.procs, a.rate, a.steady, a.lose)
    text = json.dumps(out)
    if a.json == "-":
        print(text)
    elif a.json:
        Path(a.json).write_text(text)
    ok = out["nothing_lost"] and out["presence_in_window"]
    log(f"{'ok' if ok else 'FAILED'}: {out['converged']}/{out['clients']} converged, {out['gaps']} gaps, "
        f"{out['duplicates']} duplicates, {out['own_echoes']} own changes echoed, {out['lost']} lost, "
        f"{out['applied_twice']} applied twice, nodes agree {out['nodes_agree']}, snapshots agree "
        f"{out['snapshots_agree']}, presence gone after {out['presence_gone_s']} s; "
        f"{out['acked_mutations']} mutations acked, {out['reconnects']} reconnects, {out['resent']} resent, "
        f"{out['refused']} refused and resent, {out['answers_lost']} answers lost")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
