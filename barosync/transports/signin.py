"""People signing in: ``/auth/…`` over HTTP, the session in a cookie.

- ``POST /auth/signin`` ``{"user", "password"}`` → ``{"user": {id, name}}`` and the
  session cookie; a wrong password, an unknown user and a disabled one get the same
  401 after the same work (argon2id either way).
- ``GET /auth/providers`` says whether an identity provider is set up ([oidc]);
  ``GET /auth/oidc/start`` and ``/auth/oidc/callback`` sign in with it (oidc.py).
- ``POST /auth/token`` → ``{"token", "expiresAt"}``: an access token for the WebSocket
  and REST, minted from the session for ACCESS_TTL seconds. The browser asks again on
  every reconnect and before expiry, so no lasting token is ever in its storage or in
  a URL; a signed-out session's tokens stop working at once (core/app.py checks the
  session behind every token that names one, and closes its connections).
- ``GET /auth/me``, ``POST /auth/signout``, ``GET /auth/sessions`` (the user's
  signed-in devices) and ``DELETE /auth/sessions/ID``.
- ``POST /auth/invites`` ``{"project", "role"}`` (an owner of the project, or the
  owner made at setup) → ``{"code", "expiresAt"}``: a one-use link ``/#invite=CODE``;
  ``POST /auth/accept`` ``{"code", "user", "name", "password"}`` makes the account (or
  adds the project to an existing one, given its password) and signs it in.
- ``GET /auth/members/PROJECT`` (its owners) → its members and roles;
  ``POST /auth/members/PROJECT`` ``{"user", "role"}`` changes a role, or removes the
  member with ``"role": null`` (at once, as ``barosync user access``).
- ``GET /auth/projects`` → the user's projects (id, name, role) and, for their owners,
  those deleted in the last RESTORE_DAYS days; ``POST /auth/projects`` ``{"name"}``
  makes one (its maker is its owner); ``POST /auth/projects/ID`` ``{"name"}`` renames
  it, ``DELETE /auth/projects/ID`` deletes it (closed to everyone at once) and ``POST
  /auth/projects/ID/restore`` brings it back as it was (its owners).
- ``GET``/``POST /auth/app-passwords`` and ``DELETE /auth/app-passwords/ID``: the
  signed-in user's app passwords for calendar apps (CalDAV), made here and shown once;
  ``POST /auth/feeds`` ``{"project"}``: a read-only ICS feed URL that lasts until
  revoked; ``GET /auth/feeds`` lists the user's, ``DELETE /auth/feeds/ID`` revokes one.

The cookie is HttpOnly (no script reads it), SameSite=Strict (no other site's page
sends it), Path=/, and Secure when the request came over HTTPS (a proxy's
``X-Forwarded-Proto``). Requests that change something, or mint a token, must also
carry ``X-Barosync-Request: 1`` — a header no cross-site form can send, and one a
cross-site script cannot send without a CORS preflight this server never grants — and
an ``Origin``, when the browser sends one, of this server's own host.

Failed sign-ins are limited per account and per address (a token bucket each: a
burst, then one try per SIGN_IN_FAILURE_INTERVAL seconds), answered 429 with
Retry-After.
"""

from __future__ import annotations

import hmac
import logging
from http.cookies import CookieError, SimpleCookie
import math
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

import orjson
import trio

from ..core.app import App
from ..domain.ratelimit import Limiter
from ..hooks.auth import FEED_TTL, create_token
from ..calendars import app_passwords
from ..domain.models import ALL_PROJECTS, EDITOR, OWNER, ROLES
from ..storage.accounts import AccountError, Accounts, OwnerExists, PasswordRefused, SignedIn, User
from ..storage.projects import Projects
from ..wire import protocol
from .rest import HttpError, came_over_https

if TYPE_CHECKING:
    from .oidc import OpenIdConnect

log = logging.getLogger(__name__)

COOKIE = "barosync_session"
CSRF_HEADER = b"x-barosync-request"
ACCESS_TTL = 600  # seconds an access token minted from a session lasts
# Browsers keep a cookie at most 400 days; the session itself lasts until revoked.
COOKIE_MAX_AGE = 400 * 24 * 3600
SIGN_IN_FAILURE_BURST = 5
SIGN_IN_FAILURE_INTERVAL = 30.0
# argon2id checks at once: each takes ~0.1 s of CPU and 64 MiB.
PASSWORD_CHECKS = 2

Answer = tuple[int, Any, list[tuple[bytes, bytes]]]
# What _route answers; another method on one of these is a 405, not a 404.
ENDPOINTS = frozenset({"/auth/providers", "/auth/oidc/start", "/auth/oidc/callback", "/auth/signin", "/auth/setup",
                       "/auth/app-passwords", "/auth/feeds", "/auth/invites", "/auth/accept", "/auth/me", "/auth/token",
                       "/auth/signout", "/auth/sessions", "/auth/projects"})
ENDPOINT_PREFIXES = ("/auth/app-passwords/", "/auth/members/", "/auth/sessions/", "/auth/projects/", "/auth/feeds/")


class SignIn:
    """The /auth/ endpoints of one server."""

    def __init__(self, app: App) -> None:
        self.app = app
        self._by_user = Limiter(1 / SIGN_IN_FAILURE_INTERVAL, SIGN_IN_FAILURE_BURST)
        self._by_address = Limiter(1 / SIGN_IN_FAILURE_INTERVAL, SIGN_IN_FAILURE_BURST * 4)
        self._checks = trio.CapacityLimiter(PASSWORD_CHECKS)
        # Sign-in with the team's identity provider, when [oidc] names one.
        self.oidc: OpenIdConnect | None = None
        if app.config.oidc_issuer:
            from .oidc import OpenIdConnect  # Authlib and requests: imported only when used

            self.oidc = OpenIdConnect(app.config, lambda: self.accounts, self._signed_in_now)

    def _provider(self) -> OpenIdConnect:
        if self.oidc is None:
            raise HttpError(404, "not_found", "no identity provider is set up here ([oidc] issuer in the config)")
        return self.oidc

    @property
    def accounts(self) -> Accounts:
        return self.app.accounts

    async def handle(self, method: bytes, path: str, headers: dict[bytes, bytes], body: bytes, *,
                     peer: str, query: str = "") -> Answer:
        try:
            return await self._route(method, path, headers, body, peer, query)
        except HttpError as e:
            return e.status, e.body, e.headers
        except self.app.store.faults as e:  # a cluster's PostgreSQL away: not a bug, and it passes
            log.warning("%s %s: the accounts cannot be read now (%s)", method.decode(errors="replace"), path,
                        type(e).__name__)
            return 503, {"error": "storage_unavailable", "message": "the server cannot reach its storage right now: "
                                                                    "try again in a few seconds"}, \
                [protocol.retry_after_header(5.0)]

    async def _route(self, method: bytes, path: str, headers: dict[bytes, bytes], body: bytes, peer: str,
                     query: str) -> Answer:
        if path == "/auth/providers" and method == b"GET":
            return 200, {"oidc": self.oidc.describe() if self.oidc is not None else None}, []
        if path == "/auth/oidc/start" and method == b"GET":
            return await self._provider().start(query, headers)
        if path == "/auth/oidc/callback" and method == b"GET":
            return await self._provider().callback(query, headers, _cookies(headers))
        if path == "/auth/signin" and method == b"POST":
            return await self._sign_in(headers, body, peer)
        if path == "/auth/setup" and method == b"POST":
            return await self._setup(headers, body)
        if path == "/auth/app-passwords" and method in (b"GET", b"POST"):
            return await self._app_passwords(method, headers, body)
        if path.startswith("/auth/app-passwords/") and method == b"DELETE":
            _check_request(headers)
            user, _ = await self._signed_in(headers)
            which = path.removeprefix("/auth/app-passwords/")
            if not any(e["id"] == which for e in self._own_app_passwords(user.id)):
                raise HttpError(404, "not_found", f"no app password {which!r} of yours")
            await trio.to_thread.run_sync(app_passwords.revoke, self.app.config.data_dir, which)
            return 200, {"revoked": which}, []
        if path == "/auth/feeds" and method == b"POST":
            return await self._feed(headers, body)
        if path == "/auth/feeds" and method == b"GET":
            user, _ = await self._signed_in(headers)
            return 200, {"feeds": [{"id": f.id, "project": f.project, "created": f.created}
                                   for f in await self.app.tables_call(self.app.feeds.of, user.id)]}, []
        if path.startswith("/auth/feeds/") and method == b"DELETE":
            _check_request(headers)
            user, _ = await self._signed_in(headers)
            feed_id = path.removeprefix("/auth/feeds/")
            if not await trio.to_thread.run_sync(self.app.feeds.revoke, user.id, feed_id):
                raise HttpError(404, "not_found", f"no feed {feed_id!r} of yours")
            return 200, {"revoked": feed_id}, []
        if path == "/auth/projects" and method in (b"GET", b"POST"):
            return await self._projects(method, headers, body)
        if path.startswith("/auth/projects/") and method in (b"POST", b"DELETE"):
            return await self._project(method, path.removeprefix("/auth/projects/"), headers, body)
        if path.startswith("/auth/members/") and method in (b"GET", b"POST"):
            return await self._members(method, path.removeprefix("/auth/members/"), headers, body)
        if path == "/auth/invites" and method == b"POST":
            return await self._invite(headers, body)
        if path == "/auth/accept" and method == b"POST":
            return await self._accept(headers, body, peer)
        if path == "/auth/me" and method == b"GET":
            user, _ = await self._signed_in(headers)
            return 200, {"user": {"id": user.id, "name": user.name}}, []
        if path == "/auth/token" and method == b"POST":
            return await self._token(headers)
        if path == "/auth/signout" and method == b"POST":
            _check_request(headers)
            user, session = await self._signed_in(headers)
            await trio.to_thread.run_sync(self.accounts.revoke, user.id, session.id)
            return 200, {"signedOut": session.id}, [_cookie(headers, "", max_age=0)]
        if path == "/auth/sessions" and method == b"GET":
            user, current = await self._signed_in(headers)
            return 200, {"sessions": [
                {"id": s.id, "device": s.device, "created": s.created, "lastUsed": s.last_used,
                 "current": s.id == current.id} for s in await self.app.tables_call(self.accounts.sessions_of, user.id)]}, []
        if path.startswith("/auth/sessions/") and method == b"DELETE":
            _check_request(headers)
            user, _ = await self._signed_in(headers)
            session_id = path.removeprefix("/auth/sessions/")
            if not await trio.to_thread.run_sync(self.accounts.revoke, user.id, session_id):
                raise HttpError(404, "not_found", f"no signed-in session {session_id!r} of yours")
            return 200, {"signedOut": session_id}, []
        if path in ENDPOINTS or path.startswith(ENDPOINT_PREFIXES):
            raise HttpError(405, "method_not_allowed", f"{method.decode(errors='replace')} is not what {path} takes "
                                                       "(docs/accounts.md lists the /auth/ requests)")
        raise HttpError(404, "not_found", f"no such resource {path!r}")

    async def _setup(self, headers: dict[bytes, bytes], body: bytes) -> Answer:
        """The first run: the setup link's code names the owner account, once."""
        _check_request(headers)
        given = _json(body)
        code, wanted = self.app.setup_code, given.get("code")
        if code is None or not isinstance(wanted, str) or not hmac.compare_digest(wanted.encode(), code.encode()):
            raise HttpError(403, "setup_done", "this setup link was used already, or is not this server's: sign in instead")
        self.app.setup_code = None  # claimed: a second request at once finds it gone
        try:
            user = await trio.to_thread.run_sync(lambda: self.accounts.create(
                str(given.get("user") or ""), name=given.get("name") or None, password=given.get("password"),
                projects=ALL_PROJECTS, admin=True, first=True))
        except OwnerExists:  # made through another node's setup link, or the CLI
            raise HttpError(403, "setup_done", "the owner exists already: sign in instead") from None
        except AccountError as e:
            self.app.setup_code = code
            raise HttpError(400, "invalid", str(e)) from None
        log.info("owner account %r made with the setup link", user.id)
        return await self._signed_in_now(user, headers)

    def _own_app_passwords(self, user_id: str) -> list[dict[str, Any]]:
        return [e for e in app_passwords.listing(self.app.config.data_dir) if e["user"] == user_id]

    async def _app_passwords(self, method: bytes, headers: dict[bytes, bytes], body: bytes) -> Answer:
        if method == b"GET":
            user, _ = await self._signed_in(headers)
            return 200, {"appPasswords": [{"id": e["id"], "name": e["name"], "created": e["created"]}
                                          for e in self._own_app_passwords(user.id)]}, []
        _check_request(headers)
        user, _ = await self._signed_in(headers)
        name = _json(body).get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > 100:
            raise HttpError(400, "invalid", "name the app password (1 to 100 characters), e.g. \"Bob's phone\"")
        password, entry = await trio.to_thread.run_sync(lambda: app_passwords.create(
            self.app.config.data_dir, user_id=user.id, projects=user.projects, roles=dict(user.roles) or None,
            name=name.strip(), account=True))
        log.info("user %r made app password %s", user.id, entry["id"])
        return 200, {"id": entry["id"], "user": user.id, "password": password, "server": "/dav/"}, \
            [(b"cache-control", b"no-store")]

    async def _feed(self, headers: dict[bytes, bytes], body: bytes) -> Answer:
        _check_request(headers)
        user, _ = await self._signed_in(headers)
        project = _json(body).get("project")
        if not isinstance(project, str) or user.role(project) is None:
            raise HttpError(403, "forbidden", f"you may not open project {project!r}")
        secret = self.app.config.secret
        assert secret is not None
        feed = await trio.to_thread.run_sync(self.app.feeds.add, user.id, project)
        token = create_token(secret, user_id=user.id, name=user.name, projects=[project], ttl=FEED_TTL, scope="feed",
                             jti=feed.id)
        return 200, {"id": feed.id, "url": f"/ics/{quote(project, safe='')}.ics?token={token}"}, \
            [(b"cache-control", b"no-store")]

    async def _members(self, method: bytes, project: str, headers: dict[bytes, bytes], body: bytes) -> Answer:
        """A project's members and their roles; an owner changes a role or removes one."""
        if method == b"POST":
            _check_request(headers)
        user, _ = await self._signed_in(headers)
        if not user.may_invite(project):
            raise HttpError(403, "forbidden", f"only an owner of project {project!r} sees and changes its members")
        if method == b"POST":
            given = _json(body)
            member, role = given.get("user"), given.get("role")
            if not isinstance(member, str) or (role is not None and role not in ROLES):
                raise HttpError(400, "invalid", f"send {{\"user\", \"role\"}}: a role of {', '.join(ROLES)}, "
                                                "or null to remove the member")
            try:
                await trio.to_thread.run_sync(self.accounts.set_role, member, project, role)
            except AccountError as e:
                raise HttpError(400, "invalid", str(e)) from None
            log.info("user %r set %r's role in %r to %s", user.id, member, project, role)
        return 200, {"members": [{"id": u.id, "name": u.name, "role": role, "everyProject": u.projects == ALL_PROJECTS}
                                 for u, role in await self.app.tables_call(self.accounts.members, project)]}, []

    @property
    def projects(self) -> Projects:
        return self.app.projects

    async def _projects(self, method: bytes, headers: dict[bytes, bytes], body: bytes) -> Answer:
        """The user's projects by name, and those deleted that they may restore; or a new one."""
        if method == b"POST":
            _check_request(headers)
        user, _ = await self._signed_in(headers)
        records = {p.id: p for p in await self.app.tables_call(self.projects.list)}
        if method == b"POST":
            try:
                made = await self.app.make_project(user, _json(body).get("name"))
            except AccountError as e:
                raise HttpError(400, "invalid", str(e)) from None
            log.info("user %r made project %r", user.id, made.id)
            return 200, {"project": {"id": made.id, "name": made.name, "role": OWNER}}, []
        ids = set(records) | {p for p, _ in await self.app.queries.projects()} if user.projects == ALL_PROJECTS \
            else set(user.projects)
        now = time.time()
        return 200, {
            "projects": sorted(({"id": p, "name": records[p].name if p in records else p, "role": user.role(p),
                                 "color": records[p].color if p in records else None}
                                for p in ids if p not in self.projects.deleted and user.role(p) is not None),
                               key=lambda d: (d["name"].casefold(), d["id"])),
            "deleted": [{"id": p.id, "name": p.name, "deleted": p.deleted, "restorableUntil": until}
                        for p in records.values() if (until := p.restorable_until()) is not None and until > now
                        and user.may_invite(p.id)],
        }, []

    async def _project(self, method: bytes, rest: str, headers: dict[bytes, bytes], body: bytes) -> Answer:
        """Rename, delete or restore a project: its owners, or the owner made at setup."""
        _check_request(headers)
        user, _ = await self._signed_in(headers)
        project, _, verb = rest.partition("/")
        change = {(b"POST", ""): "renamed", (b"DELETE", ""): "deleted", (b"POST", "restore"): "restored"}.get((method, verb))
        if change is None:
            raise HttpError(404, "not_found", f"no such resource /auth/projects/{rest}")
        if not user.may_invite(project):
            raise HttpError(403, "forbidden", f"only an owner of project {project!r} renames, deletes or restores it")
        try:
            if change == "restored":
                found = await trio.to_thread.run_sync(self.projects.restore, project)
            elif change == "deleted":
                found = await trio.to_thread.run_sync(self.projects.delete, project)
            else:
                found = await trio.to_thread.run_sync(self.projects.rename, project, _json(body).get("name"))
        except AccountError as e:
            raise HttpError(400, "invalid", str(e)) from None
        log.info("user %r %s project %r", user.id, change, project)
        return 200, {"project": {"id": found.id, "name": found.name, "deleted": found.deleted,
                                 "restorableUntil": found.restorable_until()}}, []

    async def _invite(self, headers: dict[bytes, bytes], body: bytes) -> Answer:
        _check_request(headers)
        user, _ = await self._signed_in(headers)
        given = _json(body)
        project, role = given.get("project"), given.get("role", EDITOR)
        if not isinstance(project, str) or not user.may_invite(project):
            raise HttpError(403, "forbidden", f"only an owner of project {project!r} may invite to it")
        try:
            code, expires = await trio.to_thread.run_sync(
                lambda: self.accounts.invite(project, role, by=user.id))
        except AccountError as e:
            raise HttpError(400, "invalid", str(e)) from None
        log.info("user %r invited someone to %r as %s", user.id, project, role)
        return 200, {"code": code, "link": f"/#invite={code}", "expiresAt": expires * 1000}, []

    async def _accept(self, headers: dict[bytes, bytes], body: bytes, peer: str) -> Answer:
        _check_request(headers)
        given = _json(body)
        user_id = given.get("user")
        now = trio.current_time()
        _refuse_if_limited(self._by_address, peer, "this address", now)  # a wrong password counts as a guess
        try:
            async with self._checks:
                user = await trio.to_thread.run_sync(lambda: self.accounts.accept(
                    given.get("code"), user_id if isinstance(user_id, str) else "", name=given.get("name") or None,
                    password=given.get("password")))
        except AccountError as e:
            if isinstance(e, PasswordRefused):
                self._by_address.take(peer, now)
            raise HttpError(400, "invalid", str(e)) from None
        log.info("user %r accepted an invite", user.id)
        return await self._signed_in_now(user, headers)

    async def _sign_in(self, headers: dict[bytes, bytes], body: bytes, peer: str) -> Answer:
        _check_request(headers)
        given = _json(body)
        user_id, password = given.get("user"), given.get("password")
        if not isinstance(user_id, str) or not isinstance(password, str):
            raise HttpError(400, "invalid", "send {\"user\": \"your user name\", \"password\": \"your password\"}")
        now = trio.current_time()
        _refuse_if_limited(self._by_user, user_id, f"user {user_id!r}", now)
        _refuse_if_limited(self._by_address, peer, "this address", now)
        async with self._checks:
            user = await trio.to_thread.run_sync(self.accounts.verify, user_id, password)
        if user is None:
            self._by_user.take(user_id, now)
            self._by_address.take(peer, now)
            log.warning("sign-in failed for user %r from %s", user_id, peer)
            raise HttpError(401, "unauthorized", "wrong user name or password")
        log.info("user %r signed in from %s", user.id, peer)
        return await self._signed_in_now(user, headers)

    async def _signed_in_now(self, user: User, headers: dict[bytes, bytes]) -> Answer:
        """A new session for ``user``, its secret in the cookie of this answer."""
        device = headers.get(b"user-agent", b"a browser").decode("latin-1")
        secret, _ = await trio.to_thread.run_sync(lambda: self.accounts.open_session(user.id, device=device))
        return 200, {"user": {"id": user.id, "name": user.name}}, [_cookie(headers, secret, max_age=COOKIE_MAX_AGE)]

    async def _signed_in(self, headers: dict[bytes, bytes]) -> tuple[User, SignedIn]:
        secret = _cookies(headers).get(COOKIE)

        def look_up() -> tuple[SignedIn | None, User | None]:
            session = self.accounts.session(secret) if secret else None
            return session, self.accounts.get(session.user) if session is not None else None

        session, user = await self.app.tables_call(look_up)
        if session is None or user is None or user.disabled:
            raise HttpError(401, "unauthorized", "not signed in (or signed out): sign in again")
        return user, session

    async def _token(self, headers: dict[bytes, bytes]) -> Answer:
        _check_request(headers)
        user, session = await self._signed_in(headers)
        await trio.to_thread.run_sync(self.accounts.touch, session.id)
        secret = self.app.config.secret
        assert secret is not None  # serve() makes sure of one before it listens
        expires = int(time.time()) + ACCESS_TTL
        roles = dict(user.roles) or None
        token = create_token(secret, user_id=user.id, name=user.name, projects=user.projects, ttl=ACCESS_TTL,
                             roles=roles, sid=session.id, admin=True if user.admin else None)
        return 200, {"token": token, "expiresAt": expires * 1000}, [(b"cache-control", b"no-store")]


def _refuse_if_limited(limiter: Limiter, key: str, who: str, now: float) -> None:
    """429 while ``key`` has used up its failed sign-ins."""
    wait = limiter.refused(key, now)
    if wait is not None:
        raise HttpError(429, "rate_limited", f"too many failed sign-ins for {who}: try again in {math.ceil(wait)} s",
                        headers=[protocol.retry_after_header(wait)])


def _json(body: bytes) -> dict[str, Any]:
    try:
        given = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise HttpError(400, "bad_json", "the body must be a JSON object") from None
    if not isinstance(given, dict):
        raise HttpError(400, "bad_json", "the body must be a JSON object")
    return given


def _check_request(headers: dict[bytes, bytes]) -> None:
    """CSRF: the custom header, and the Origin (if any) of this very host."""
    if headers.get(CSRF_HEADER) != b"1":
        raise HttpError(403, "csrf", "send the header X-Barosync-Request: 1 with this request")
    origin = headers.get(b"origin")
    if origin is not None:
        host = headers.get(b"host", b"").decode("latin-1")
        if urlsplit(origin.decode("latin-1")).netloc != host:
            raise HttpError(403, "csrf", "this request must come from a page of this server")


def _cookies(headers: dict[bytes, bytes]) -> dict[str, str]:
    jar = SimpleCookie()
    try:
        jar.load(headers.get(b"cookie", b"").decode("latin-1"))
    except CookieError:
        return {}  # a malformed Cookie header signs nobody in
    return {name: morsel.value for name, morsel in jar.items()}


def _cookie(headers: dict[bytes, bytes], value: str, *, max_age: int) -> tuple[bytes, bytes]:
    return (b"set-cookie", f"{COOKIE}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict"
                           f"{'; Secure' if came_over_https(headers) else ''}".encode())


