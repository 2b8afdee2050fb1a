"""Two barosync nodes on one PostgreSQL log and one Redis bus, as one "server" for the
benchmark's scenarios (``cluster_fanout``, ``cluster_durable``): the load processes
alternate between the nodes, the server CPU is both nodes', and PostgreSQL and Redis
are started (unpinned) from Debian's packages in temp dirs the way the tests do
(tests/pg_helpers.py, tests/redis_helpers.py)."""

from __future__ import annotations

import secrets
import sys
import time
from pathlib import Path

from harness import BENCH_CONFIG, ROOT, Server, proc_cpu_s

sys.path.insert(0, str(ROOT / "tests"))


class ClusterServer:
    kind = "barosync"

    def __init__(self, cpus: set[int] | None, users: list[str]) -> None:
        from pg_helpers import Postgres
        from redis_helpers import Redis

        self.users = users
        self.postgres = Postgres()
        self.redis = Redis()
        secret = secrets.token_urlsafe(32)
        self.nodes = [Server("barosync", cpus, users), Server("barosync", cpus, users)]
        config = self.nodes[0].tmp / "cluster.toml"
        config.write_text(BENCH_CONFIG + f'\n[auth]\nsecret = "{secret}"\n\n[cluster]\n'
                          f'postgres = "{self.postgres.new_database()}"\n'
                          f'redis = "{self.redis.url}"\n')
        for node in self.nodes:
            node.config_path = str(config)
        import jwt

        now = int(time.time())
        self.tokens = {u: jwt.encode({"sub": u, "name": u, "projects": "*", "iat": now, "exp": now + 86400},
                                     secret, algorithm="HS256") for u in users}
        self.host = "127.0.0.1"
        self.exit_code: int | None = None

    def start(self) -> None:
        for node in self.nodes:
            node.mint_all = lambda: None  # type: ignore[method-assign]  # tokens are the cluster's
            node.start()
            node.tokens = self.tokens

    @property
    def port(self) -> int:
        return self.nodes[0].port

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    @property
    def pid(self) -> int:
        return self.nodes[0].pid

    @property
    def proc(self):  # noqa: ANN201
        return self.nodes[0].proc

    def engine_pids(self) -> list[int]:
        """PostgreSQL's postmaster and its backends, and Redis."""
        pids = [self.postgres.pid, self.redis.proc.pid]
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                if ppid == self.postgres.pid:
                    pids.append(int(entry.name))
        return pids

    def cpu_s(self) -> float:
        """Both nodes' CPU, and the engines': what the cluster costs in all (backends
        that ended meanwhile are not counted)."""
        total = sum(proc_cpu_s(n.pid) for n in self.nodes if n.alive())
        for pid in self.engine_pids():
            try:
                total += proc_cpu_s(pid)
            except (OSError, ValueError, IndexError):
                pass
        return total

    def alive(self) -> bool:
        return all(n.alive() for n in self.nodes)

    def last_error(self) -> str:
        return " / ".join(n.last_error() for n in self.nodes)

    def stop(self, keep_log: Path | None = None) -> None:
        for i, node in enumerate(self.nodes):
            node.stop(keep_log=keep_log.with_name(f"{keep_log.stem}-node{i}{keep_log.suffix}") if keep_log else None)
        self.exit_code = max((n.exit_code or 0) for n in self.nodes)
        self.redis.close()
        self.postgres.close()
