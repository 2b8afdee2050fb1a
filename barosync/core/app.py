"""The application core: what one running server holds, below every transport.

``App`` owns the config, the plugin manager, the store and its writer, the hub, the
wire codecs and the register of open connections, and answers the questions every
transport asks (authenticate, authorize, health). server.py (HTTP and the WebSocket
upgrade), session.py, rest.py and metrics.py sit on top of it; this module imports
none of them.
"""

from __future__ import annotations

import functools
import logging
import math
import secrets
import time
import uuid
from typing import Any, Callable, TypeVar

import pluggy
import trio

from .. import __version__
from ..wire import protocol
from ..domain import expansion
from ..hooks.codecs import DEFAULT_CODEC
from ..config import Config, ConfigError
from ..engine.hub import Hub, Subscriber
from ..domain.models import ALL_PROJECTS, OWNER, Identity, identity_problem
from ..hooks.plugins import PluginError, build_plugin_manager, call_first, has_async_impls, strategy_resolvers
from ..domain.ratelimit import Limiter
from ..storage.reads import Reads
from .queries import Queries
from ..storage.roles import Bus, LogStore, SharedPresence
from ..engine.sequencer import Sequencer
from ..storage.accounts import Accounts, User
from ..storage.feeds import Feeds
from ..storage.projects import Project, Projects
from ..storage.store import Store
from ..engine.writer import Writer

log = logging.getLogger(__name__)
# How often history past [storage] history_retention is pruned: hourly, or four
# times per retention window when that is shorter.
PRUNE_INTERVAL = 3600.0
PRUNES_PER_RETENTION = 4
# How often open connections are checked against their signed-in sessions.
SIGNED_OUT_CHECK = 0.5

T = TypeVar("T")


def open_log(config: Config, pm: pluggy.PluginManager | None = None,
             strategies: dict[str, Any] | None = None) -> LogStore:
    """The change log ``config`` names (LMDB in the data directory, or PostgreSQL),
    committing with the rules of ``pm``'s plugins (those ``config`` loads when None)."""
    if pm is None:
        pm = build_plugin_manager(config)
    if strategies is None:
        strategies = strategy_resolvers(pm)
    if config.cluster_postgres:
        from ..storage.pg_store import PgStore  # psycopg is needed only for a cluster

        return PgStore(config.cluster_postgres, hook=pm.hook, config=config, strategies=strategies)
    return Store(config.data_dir, map_size=config.map_size, hook=pm.hook, config=config, strategies=strategies)


class App:
    """Everything one running server holds."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.pm = build_plugin_manager(config)
        strategies = strategy_resolvers(self.pm)
        check_strategies(config, list(strategies))
        self.codecs = {c.name: c for found in self.pm.hook.barosync_wire_codecs() for c in (found or [])}
        if DEFAULT_CODEC not in self.codecs:
            raise PluginError(f"no plugin provides the {DEFAULT_CODEC!r} wire codec every browser client needs (is 'codecs' in [plugins] disable?)")
        self.store: LogStore = open_log(config, self.pm, strategies)
        try:
            self._build(config)
        except BaseException:
            self.store.close()  # a failed start leaves no environment open in the process
            raise

    def _build(self, config: Config) -> None:
        self.hub = Hub(self.pm.hook, cursor_rate=config.cursor_rate)
        # Store reads from the event loop: ``await app.read(app.store.snapshot, p)``.
        self.read = Reads(self.store)
        # ... and the reads the transports ask for, by what they mean (queries.py).
        self.queries = Queries(self.store, self.read)
        # Known once: plugins do not change while the server runs.
        self._async_authenticate = has_async_impls(self.pm.hook.barosync_authenticate)
        self._async_authorize = has_async_impls(self.pm.hook.barosync_authorize)
        self.writer = Writer(self.store, self.hub.on_batch, on_failure=self.fail, read=self.read)
        # People's accounts and signed-in sessions (storage/accounts.py), and the
        # projects made, renamed and deleted in the web app (storage/projects.py), in
        # tables beside the log: the data directory's, or a cluster's PostgreSQL.
        tables = self.store.tables(Accounts.TABLES + Feeds.TABLES + Projects.TABLES)
        self.accounts = Accounts(tables)
        self.feeds = Feeds(tables, self.accounts)
        self.projects = Projects(tables)
        # Whether their calls wait on the network: then they run in worker threads.
        self._tables_block = tables.blocking
        # With no account yet, whoever opens the setup link with this code names the
        # owner (printed at start; used once; a restart makes a new one).
        self.setup_code: str | None = secrets.token_urlsafe(24) if not self.accounts.any_user() else None
        if self.read.blocking:
            # Reads that yield need each room kept in log order by a task of its own.
            self.hub.sequencer = Sequencer(hub=self.hub, store=self.store, read=self.read,
                                           answered=self.writer.answered)
        # Several nodes: the live bus between them (bus.py) and presence (presence.py).
        self.bus: Bus | None = None
        self.presence: SharedPresence | None = None
        if config.cluster_redis:
            from ..engine.bus import RedisBus
            from ..engine.presence import RedisPresence
            from ..engine.redis_link import check_reachable

            try:
                check_reachable(config.cluster_redis)
            except OSError as e:
                raise ConfigError(config.source, "[cluster] redis",
                                  f"cannot connect to Redis: {e}; start it, or check the URL") from None
            node_id = uuid.uuid4().hex[:12]
            presence = RedisPresence(config.cluster_redis, hub=self.hub, node_id=node_id)
            self.presence = self.hub.presence = presence
            self.bus = self.hub.bus = RedisBus(config.cluster_redis, hub=self.hub, node_id=node_id,
                                               presence_changed=presence.changed_elsewhere)
        # Set when storage failed: the server closes every connection with 1011 and stops.
        self.failure: str | None = None
        # Open WebSocket connections (the transport adds and removes them).
        self.sessions: set[Subscriber] = set()
        self._per_user: dict[str, int] = {}
        self.port: int = 0
        self.started_at = time.time()
        self._stop = trio.Event()
        self._sessions_gone = trio.Event()
        # HTTP requests (REST, CalDAV, the ICS feed) per identity: one allowance
        # shared by the three transports.
        self.requests = Limiter(config.http_rate_limit, config.http_rate_burst)
        # Recurrence expansion runs in one worker thread at a time (expansion.py).
        self._expanding = trio.CapacityLimiter(1)
        # The inspector's previous reading of hub.committed, for changes per second.
        self.admin_sample: tuple[float, dict[str, int]] = (0.0, {})

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The core's own tasks: the writer, cursor ticks and history pruning; with
        several nodes the rooms' sequencers and the bus. Transports start this, then
        their listeners; ``drain`` ends the writing before they cancel it."""
        async with trio.open_nursery() as tasks:
            await tasks.start(self.writer.run)
            tasks.start_soon(self.hub.run_cursors)
            for part in (self.hub.sequencer, self.bus, self.presence):
                if part is not None:
                    await tasks.start(part.run)
            tasks.start_soon(self._prune_periodically)
            tasks.start_soon(self._close_signed_out)
            task_status.started()

    async def drain(self) -> None:
        """No more mutations: returns once everything submitted is committed and answered."""
        self.writer.close()
        await self.writer.closed.wait()

    async def _prune_periodically(self) -> None:
        """Prune history past the retention window, now and then every PRUNE_INTERVAL
        (or a quarter of the window when that is shorter)."""
        interval = min(PRUNE_INTERVAL, max(1.0, self.config.history_retention / PRUNES_PER_RETENTION))
        while True:
            try:
                dropped = await self.writer.prune()
                if dropped:
                    log.info("pruned %d changes older than the history retention", dropped)
            except Exception:
                log.exception("history pruning failed; will try again")
            await trio.sleep(interval)

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        """The store closes (after ``drain``, or a start that failed): the last step."""
        self.store.close()

    def request_refused(self, identity: Identity) -> tuple[str, float] | None:
        """Spend one of the identity's HTTP requests (REST, CalDAV, the ICS feed share
        them); when none is left, what to tell the client and how many seconds to wait."""
        wait = self.requests.take(identity.user_id, trio.current_time())
        if wait is None:
            return None
        return (f"more than {self.config.http_rate_limit:g} requests per second for this user: slow down and try "
                f"again in {math.ceil(wait)} s", wait)

    async def expand(self, fn: Callable[..., T], *args: Any, seconds: float = expansion.DEADLINE) -> T:
        """``fn(*args)`` (work that expands recurrences) off the event loop, one at a
        time, stopped with expansion.ExpansionLimit after ``seconds``: a request's
        expansion never delays the loop, nor runs past its deadline."""
        return await trio.to_thread.run_sync(functools.partial(expansion.run_guarded, fn, *args, seconds=seconds),
                                             limiter=self._expanding)

    def fail(self, message: str) -> None:
        """Storage failed: stop, telling every client to come back later (1011)."""
        self.failure = message
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def wait_stopped(self) -> None:
        await self._stop.wait()

    # -- connections -------------------------------------------------------------------

    def connections_of(self, user_id: str) -> int:
        return self._per_user.get(user_id, 0)

    def connected(self, session: Subscriber) -> None:
        self.sessions.add(session)
        user_id = session.identity.user_id
        self._per_user[user_id] = self._per_user.get(user_id, 0) + 1

    def disconnected(self, session: Subscriber) -> None:
        self.sessions.discard(session)
        user_id = session.identity.user_id
        left = self._per_user[user_id] - 1
        if left:
            self._per_user[user_id] = left
        else:
            del self._per_user[user_id]
        self._sessions_gone.set()

    async def wait_disconnected(self, timeout: float) -> None:
        """Until every connection has gone, or ``timeout`` seconds."""
        with trio.move_on_after(timeout):
            while self.sessions:
                await self._sessions_gone.wait()
                self._sessions_gone = trio.Event()

    # -- questions every transport asks --------------------------------------------------

    async def authenticate(self, token: str, *, scope: str = "access") -> Identity | None:
        """The identity of a token good for ``scope``: a feed token opens only the
        ICS feed, and nothing else opens a feed."""
        try:
            identity = await call_first(self.pm.hook.barosync_authenticate, is_async=self._async_authenticate,
                                        token=token, config=self.config)
        except Exception:
            log.exception("auth plugin failed; refusing the token")
            return None
        if identity is None or identity.scope != scope:
            return None
        try:
            if identity.session_id is not None and not await self.tables_call(self.signed_in, identity):
                return None  # minted from a session that has signed out since
            if (scope == "feed" and identity.token_id is not None
                    and await self.tables_call(self.feeds.live, identity.token_id, identity.user_id) is False):
                return None  # a feed made in the web app and revoked since, or its user out
        except self.store.faults as e:
            # Whether the session is still signed in cannot be known now: refused, and
            # the client tries again after its backoff.
            log.warning("refused a token of user %r: its session cannot be checked now (%s)", identity.user_id,
                        type(e).__name__)
            return None
        problem = identity_problem(identity)
        if problem is not None:
            log.warning("refused a token for user %r: %s", identity.user_id, problem)
            return None
        return identity

    async def make_project(self, user: User, name: Any, *, project_id: str | None = None) -> Project:
        """A new project, its maker its owner (the web app's Projects dialog, a calendar
        app's MKCALENDAR). Its id is made from ``name`` unless ``project_id`` is given,
        never one in use: in the log, or named by anyone's access. AccountError says
        why not."""
        taken = {p for p, _ in await self.queries.projects()}
        for other in await self.tables_call(self.accounts.list):
            taken |= ({*other.projects} if other.projects != ALL_PROJECTS else set()) | {p for p, _ in other.roles}
        made = await trio.to_thread.run_sync(lambda: self.projects.create(name, by=user.id, taken=taken,
                                                                          project_id=project_id))
        await trio.to_thread.run_sync(self.accounts.set_role, user.id, made.id, OWNER)
        return made

    async def tables_call(self, fn: Callable[..., T], *args: Any) -> T:
        """A call into the accounts or projects: in a worker thread when their tables
        are PostgreSQL's (a network round trip), directly on LMDB (microseconds)."""
        if self._tables_block:
            return await trio.to_thread.run_sync(fn, *args)
        return fn(*args)

    def signed_in(self, identity: Identity) -> bool:
        """Whether the session an identity's token was minted from is still on, and the
        user's projects and roles still the token's (a read of two keys)."""
        return (identity.session_id is not None
                and self.accounts.session_live(identity.session_id, identity.user_id,
                                               projects=identity.projects, roles=identity.roles))

    async def _close_signed_out(self) -> None:
        """Connections whose session signed out, whose user was disabled or whose
        access changed (from any process: the CLI too), or that hold a project deleted
        since, close within SIGNED_OUT_CHECK seconds, with 4001: their token is no
        good, and the client's next one carries what the user may open now (a removed
        or deleted project is then refused). While the tables cannot be read (a
        cluster's PostgreSQL away), connections stay as they are."""
        unreadable = False
        while True:
            await trio.sleep(SIGNED_OUT_CHECK)
            try:
                await self._sweep_signed_out()
            except self.store.faults as e:
                if not unreadable:
                    log.warning("cannot check sessions and deleted projects (%s: %s); connections stay open "
                                "until the storage answers again", type(e).__name__, str(e).strip())
                unreadable = True
                continue
            if unreadable:
                log.info("sessions and deleted projects are checked again")
            unreadable = False

    async def _sweep_signed_out(self) -> None:
        verdicts: dict[str, bool] = {}
        if self._tables_block:
            await trio.to_thread.run_sync(self.projects.refresh)  # another node may have deleted one
        deleted = self.projects.deleted
        for conn in list(self.sessions):
            if deleted and not deleted.isdisjoint(conn.subscriptions):
                conn.close(protocol.CLOSE_TOKEN_INVALID, "a project you had open was deleted: reconnect")
                continue
            identity = conn.identity
            if identity.session_id is None:
                continue
            live = verdicts.get(identity.session_id)
            if live is None:
                live = verdicts[identity.session_id] = await self.tables_call(self.signed_in, identity)
            if not live:
                conn.close(protocol.CLOSE_TOKEN_INVALID, "signed out, or your access changed: reconnect")

    async def authorize(self, identity: Identity, action: str, project_id: str) -> bool:
        if project_id in self.projects.deleted:
            return False  # deleted in the web app: closed to everyone until restored
        try:
            return bool(await call_first(self.pm.hook.barosync_authorize, is_async=self._async_authorize,
                                         identity=identity, action=action, project_id=project_id))
        except Exception:
            log.exception("authorize plugin failed; refusing %s in %s", action, project_id)
            return False

    def health(self) -> dict[str, Any]:
        """What /healthz answers; any status but "ok" is served as 503."""
        state: dict[str, Any] = {"status": "ok"}
        if self.failure is not None:
            state = {"status": "failed", "reason": self.failure}
        elif self.writer.degraded is not None:
            state = {"status": "degraded", "reason": f"storage full: {self.writer.degraded}; writes are refused",
                     "since": round(trio.current_time() - self.writer.degraded_since, 3)}
        return {
            **state,
            "version": __version__,
            "connections": len(self.sessions),
            "rooms": len(self.hub.rooms),
            "commits": self.writer.batches,
            "mutations": self.writer.committed,
            "uptime": round(time.time() - self.started_at, 3),
        }


def check_strategies(config: Config, available: list[str]) -> None:
    wanted = [("[conflict] default", config.conflict_default), ("[conflict] merge_tiebreak", config.merge_tiebreak)]
    wanted += [(f"[conflict.projects] {p}", name) for p, name in config.conflict_projects.items()]
    for key, name in wanted:
        if name not in available:
            raise ConfigError(config.source, key, f"unknown strategy {name!r} (available: {', '.join(available)})")
