"""Accounts: a team's users and their signed-in sessions.

Tables (tables.py) beside the log: sub-databases of the data directory's LMDB
environment, so `barosync backup` copies them with the calendars (one consistent read
transaction) and a restore brings them back; in a cluster, PostgreSQL's, shared by
the nodes:

- ``users``: user id -> {name, password (argon2id), projects, roles, disabled, created};
- ``signins``: session id -> {user, device, created, lastUsed, revoked}, and
  ``signin_keys``: SHA-256 of a session's secret -> its id. The browser holds the
  secret in an HttpOnly cookie; the data directory holds only its hash, so a copy of
  the data signs nobody in.
- ``invites``: SHA-256 of an invite's code -> {project, role, by, expires, usedBy}: a
  link an owner hands a teammate, good once, for a week.
- ``oidc_subjects``: SHA-256 of an identity provider's issuer and subject -> the user
  id it signs in as (an account made at its first sign-in, with no password).
- ``feeds``: the ICS feed URLs people made (feeds.py).

Passwords are hashed with argon2id through argon2-cffi (its default parameters: 64
MiB, 3 passes). Hashing and checking cost ~0.1 s: callers on the event loop run
them in a worker thread, as they do every call here when the tables are PostgreSQL's
(``tables.blocking``). Everything here is synchronous.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
import time
from typing import Any, Iterable

import attrs
import orjson
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from .tables import TableTxn, Tables
from ..domain.models import ALL_PROJECTS, EDITOR, OWNER, Identity, ValidationError, check_id, parse_roles

# A password shorter than this is refused when it is set (NIST SP 800-63B: at least 8).
MIN_PASSWORD_CHARS = 8
MAX_PASSWORD_CHARS = 1024  # argon2 takes any length; a megabyte "password" is an attack
MAX_NAME_CHARS = 200
MAX_DEVICE_CHARS = 200
INVITE_TTL = 7 * 24 * 3600.0
_hasher = PasswordHasher()


@functools.cache
def _dummy() -> str:
    """Checked against when the user does not exist, so that an unknown name costs the
    same time as a wrong password (no way to probe which users exist). Made on first
    use: hashing takes ~0.1 s, which every start (and every CLI run) would pay."""
    return _hasher.hash(secrets.token_urlsafe(16))


class AccountError(ValueError):
    """A request about accounts that cannot be done; the message says why."""


class PasswordRefused(AccountError):
    """The password given for an existing account is not its password (a guess, for
    the sign-in limits)."""


class OwnerExists(AccountError):
    """The setup link's owner is made only while there is no user."""


@attrs.frozen
class User:
    id: str
    name: str
    projects: frozenset[str] | str
    roles: tuple[tuple[str, str], ...]
    disabled: bool
    created: int
    admin: bool = False  # may open the sync inspector (the owner made at setup)

    def role(self, project: str) -> str | None:
        """The user's role in a project (None: no access), by the rule their tokens follow."""
        return Identity(user_id=self.id, name=self.name, projects=self.projects, roles=self.roles).role(project)

    def may_invite(self, project: str) -> bool:
        """The owner made at setup, or an owner of the project."""
        return self.admin or self.role(project) == OWNER


@attrs.frozen
class SignedIn:
    id: str  # what lists and revocations name (not the secret)
    user: str
    device: str
    created: int
    last_used: int
    revoked: bool


def _user(user_id: str, raw: bytes) -> User:
    d = orjson.loads(raw)
    projects = d["projects"]
    return User(id=user_id, name=d["name"], projects=ALL_PROJECTS if projects == ALL_PROJECTS else frozenset(projects),
                roles=parse_roles(d.get("roles")), disabled=d.get("disabled", False), created=d["created"],
                admin=d.get("admin", False))


def _signin(raw: bytes) -> SignedIn:
    d = orjson.loads(raw)
    return SignedIn(id=d["id"], user=d["user"], device=d["device"], created=d["created"], last_used=d["lastUsed"],
                  revoked=d.get("revoked", False))


def secret_key(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _usable_id(user_id: str) -> bool:
    try:
        check_id(user_id, "user")
    except ValidationError:
        return False
    return True


def check_password(password: Any) -> str:
    if not isinstance(password, str) or not MIN_PASSWORD_CHARS <= len(password) <= MAX_PASSWORD_CHARS:
        raise AccountError(f"a password has {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters")
    return password


def audit(txn: TableTxn) -> tuple[int, list[str]]:
    """What `barosync check` says of the accounts: how many users, and each record
    that does not read back or points at nothing."""
    problems: list[str] = []
    users = set()
    for key, raw in txn.items("users"):
        try:
            _user(key.decode(), raw)
            users.add(key)
        except (ValueError, KeyError, TypeError, ValidationError) as e:
            problems.append(f"accounts: user {key!r} does not read back ({type(e).__name__})")
    signins = {key for key, _ in txn.items("signins")}
    for key, session_id in txn.items("signin_keys"):
        if session_id not in signins:
            problems.append(f"accounts: a session key points at no session ({session_id!r})")
    for table, what in (("signins", "user"), ("feeds", "user")):
        for key, raw in txn.items(table):
            if orjson.loads(raw).get(what, "").encode() not in users:
                problems.append(f"accounts: {table[:-1]} {key!r} belongs to no user")
    for _, user_id in txn.items("oidc_subjects"):
        if user_id not in users:
            problems.append(f"accounts: an identity provider's subject points at no user ({user_id!r})")
    return len(users), problems


class Accounts:
    """Users and sessions, in ``tables``."""

    TABLES = ("users", "signins", "signin_keys", "invites", "oidc_subjects")

    def __init__(self, tables: Tables) -> None:
        self.tables = tables

    # -- users ---------------------------------------------------------------------------

    def any_user(self) -> bool:
        with self.tables.read() as txn:
            return bool(txn.items("users"))

    def get(self, user_id: str) -> User | None:
        with self.tables.read() as txn:
            raw = txn.get("users", user_id.encode())
        return _user(user_id, raw) if raw is not None else None

    def list(self) -> list[User]:
        with self.tables.read() as txn:
            return [_user(k.decode(), v) for k, v in txn.items("users")]

    def create(self, user_id: str, *, name: str | None, password: str | None, projects: Iterable[str] | str,
               roles: dict[str, str] | None = None, admin: bool = False, now: float | None = None,
               first: bool = False) -> User:
        """A new user; ``first``: only while there is no user at all (the setup link's
        owner: in the same transaction, so two nodes' links cannot both make one)."""
        try:
            check_id(user_id, "user")
            parse_roles(roles)
        except ValidationError as e:
            raise AccountError(f"{e.field} {e.message}") from None
        name = (name or user_id).strip()
        if not name or len(name) > MAX_NAME_CHARS:
            raise AccountError(f"a name has 1 to {MAX_NAME_CHARS} characters")
        # No password: the account signs in only through the identity provider.
        record = {"name": name, "password": _hasher.hash(check_password(password)) if password is not None else None,
                  "projects": projects if projects == ALL_PROJECTS else sorted(set(projects)),
                  "roles": dict(roles or {}), "admin": admin, "created": int(now if now is not None else time.time())}
        with self.tables.write() as txn:
            if first and txn.items("users"):
                raise OwnerExists("the owner exists already: sign in instead")
            if not txn.put("users", user_id.encode(), orjson.dumps(record), overwrite=False):
                raise AccountError(f"user {user_id!r} exists already")
        user = self.get(user_id)
        assert user is not None
        return user

    def _change(self, user_id: str, **changes: Any) -> dict[str, Any]:
        with self.tables.write() as txn:
            raw = txn.get("users", user_id.encode())
            if raw is None:
                raise AccountError(f"no user {user_id!r} (`barosync user list` shows them)")
            record = orjson.loads(raw)
            record.update(changes)
            txn.put("users", user_id.encode(), orjson.dumps(record))
        return record

    def set_password(self, user_id: str, password: str) -> None:
        """A new password; every session of the user is signed out."""
        self._change(user_id, password=_hasher.hash(check_password(password)))
        self.revoke_all(user_id)

    def set_access(self, user_id: str, *, projects: Iterable[str] | str, roles: dict[str, str] | None = None,
                   admin: bool | None = None) -> None:
        """What the user may open, from now on (``admin``, when given: whether they are
        the team's owner): tokens minted before stop working and the user's
        connections reconnect with the new access (core/app.py)."""
        try:
            parse_roles(roles)
        except ValidationError as e:
            raise AccountError(f"{e.field} {e.message}") from None
        changes: dict[str, Any] = {"admin": admin} if admin is not None else {}
        self._change(user_id, projects=projects if projects == ALL_PROJECTS else sorted(set(projects)),
                     roles=dict(roles or {}), **changes)

    def members(self, project: str) -> list[tuple[User, str]]:
        """Who may open ``project``, with their role there."""
        return [(user, role) for user in self.list() if (role := user.role(project)) is not None]

    def set_role(self, user_id: str, project: str, role: str | None) -> None:
        """Give ``user_id`` ``role`` in ``project``, or (None) take the project away; the
        user's connections follow within a second, as for set_access."""
        user = self.get(user_id)
        if user is None:
            raise AccountError(f"no user {user_id!r}")
        roles = dict(user.roles)
        if role is None:
            if user.projects == ALL_PROJECTS:
                raise AccountError(f"{user_id!r} may open every project: `barosync user access` changes that")
            roles.pop(project, None)
            projects: frozenset[str] | str = user.projects - {project}
        else:
            roles[project] = role
            projects = user.projects if user.projects == ALL_PROJECTS else user.projects | {project}
        self.set_access(user_id, projects=projects, roles={p: r for p, r in roles.items() if r != EDITOR} or None)

    def set_disabled(self, user_id: str, disabled: bool) -> None:
        """A disabled user cannot sign in, and is signed out everywhere."""
        self._change(user_id, disabled=disabled)
        if disabled:
            self.revoke_all(user_id)

    def verify(self, user_id: str, password: str) -> User | None:
        """The user if the password is theirs and they may sign in; the same cost and
        the same None whether the user is unknown, disabled or the password wrong."""
        with self.tables.read() as txn:
            raw = txn.get("users", user_id.encode()) if isinstance(user_id, str) and user_id else None
        stored = (orjson.loads(raw)["password"] if raw is not None else None) or _dummy()
        try:
            _hasher.verify(stored, password[:MAX_PASSWORD_CHARS])
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        if raw is None or orjson.loads(raw)["password"] is None:
            return None
        user = _user(user_id, raw)
        if user.disabled:
            return None
        if _hasher.check_needs_rehash(stored):  # the library's parameters moved on
            self._change(user_id, password=_hasher.hash(password))
        return user

    def federated(self, issuer: str, subject: str, *, wanted_id: str, name: str,
                  access: tuple[frozenset[str] | str, dict[str, str], bool] | None) -> User:
        """The account an identity provider's user signs in as: made (with no password)
        at the first sign-in under ``wanted_id``, or a free id like it (never an
        existing account's: that would hand it over); its name, and its access when
        given as (projects, roles, admin), follow the provider at each sign-in."""
        key = hashlib.sha256(f"{issuer}\0{subject}".encode()).digest()
        with self.tables.read() as txn:
            linked = txn.get("oidc_subjects", key)
        projects, roles, admin = access if access is not None else (frozenset(), {}, False)
        if linked is None:
            base = wanted_id if _usable_id(wanted_id) else "user"
            user_id, n = base, 1
            while self.get(user_id) is not None:
                n += 1
                user_id = f"{base}-{n}"
            self.create(user_id, name=name, password=None, projects=projects, roles=roles or None, admin=admin)
            with self.tables.write() as txn:
                txn.put("oidc_subjects", key, user_id.encode())
        else:
            user_id = linked.decode()
            changes: dict[str, Any] = {"name": (name or user_id)[:MAX_NAME_CHARS]}
            if access is not None:
                changes.update(projects=projects if projects == ALL_PROJECTS else sorted(projects),
                               roles={p: r for p, r in roles.items() if r != EDITOR}, admin=admin)
            self._change(user_id, **changes)
        user = self.get(user_id)
        assert user is not None
        return user

    # -- invites -------------------------------------------------------------------------

    def invite(self, project: str, role: str, *, by: str, ttl: float = INVITE_TTL,
               now: float | None = None) -> tuple[str, int]:
        """A one-use invite into ``project`` as ``role``: (its code, when it expires)."""
        try:
            check_id(project, "project")
            parse_roles({project: role})
        except ValidationError as e:
            raise AccountError(f"{e.field} {e.message}") from None
        code = secrets.token_urlsafe(24)
        expires = int((now if now is not None else time.time()) + ttl)
        record = {"project": project, "role": role, "by": by, "expires": expires, "usedBy": None}
        with self.tables.write() as txn:
            txn.put("invites", secret_key(code), orjson.dumps(record))
        return code, expires

    def accept(self, code: str, user_id: str, *, name: str | None, password: str,
               now: float | None = None) -> User:
        """Use an invite: a new account with its project, or (with the right password)
        an existing one that gains it. AccountError says why not."""
        check_password(password)
        invite = self._claim(code, user_id, now)
        project, role = invite["project"], invite["role"]
        try:
            existing = self.get(user_id) if isinstance(user_id, str) and user_id else None
            if existing is None:
                return self.create(user_id, name=name, password=password, projects=[project],
                                   roles={project: role} if role != EDITOR else None)
            if self.verify(user_id, password) is None:
                raise PasswordRefused(f"{user_id!r} is taken: with their password the invite adds {project!r} to it")
            return self._grant(existing, project, role)
        except BaseException:
            self._claim(code, None, now)  # not used after all
            raise

    def accept_signed_in(self, code: str, user_id: str, *, now: float | None = None) -> User:
        """Use an invite for an account that has just signed in (with the identity
        provider): it gains the invite's project."""
        invite = self._claim(code, user_id, now)
        try:
            user = self.get(user_id)
            if user is None:
                raise AccountError(f"no user {user_id!r}")
            return self._grant(user, invite["project"], invite["role"])
        except BaseException:
            self._claim(code, None, now)
            raise

    def _grant(self, user: User, project: str, role: str) -> User:
        if user.projects != ALL_PROJECTS:
            roles = {**dict(user.roles), project: role}
            self.set_access(user.id, projects=[*user.projects, project],
                            roles={p: r for p, r in roles.items() if r != EDITOR} or None)
        found = self.get(user.id)
        assert found is not None
        return found

    def _claim(self, code: str, user_id: str | None, now: float | None) -> dict[str, Any]:
        """Mark an invite used by ``user_id`` (None: unused again), in one write: two
        requests at once cannot both use it."""
        with self.tables.write() as txn:
            raw = txn.get("invites", secret_key(code)) if isinstance(code, str) else None
            invite = orjson.loads(raw) if raw is not None else None
            if user_id is not None and (invite is None or invite["usedBy"] is not None
                                        or invite["expires"] < (now if now is not None else time.time())):
                raise AccountError("this invite was used already, has expired or is not this server's: "
                                   "ask for a new one")
            if invite is not None:
                invite["usedBy"] = user_id
                txn.put("invites", secret_key(code), orjson.dumps(invite))
        assert invite is not None
        return invite

    # -- sessions ------------------------------------------------------------------------

    def open_session(self, user_id: str, *, device: str, now: float | None = None) -> tuple[str, SignedIn]:
        """A new session: (its secret, for the cookie; what is stored)."""
        secret = secrets.token_urlsafe(32)
        at = int(now if now is not None else time.time())
        session_id = secrets.token_hex(8)
        record = {"id": session_id, "user": user_id, "device": device[:MAX_DEVICE_CHARS], "created": at,
                  "lastUsed": at}
        with self.tables.write() as txn:
            txn.put("signins", session_id.encode(), orjson.dumps(record))
            txn.put("signin_keys", secret_key(secret), session_id.encode())
        return secret, _signin(orjson.dumps(record))

    def session(self, secret: str) -> SignedIn | None:
        """The live session this secret opens (None: unknown or revoked)."""
        with self.tables.read() as txn:
            session_id = txn.get("signin_keys", secret_key(secret))
            raw = txn.get("signins", session_id) if session_id is not None else None
        found = _signin(raw) if raw is not None else None
        return found if found is not None and not found.revoked else None

    def session_live(self, session_id: str, user_id: str, *, projects: frozenset[str] | str | None = None,
                     roles: tuple[tuple[str, str], ...] | None = None) -> bool:
        """Whether a session, by id, is still signed in, its user enabled and (when
        given) the user's projects and roles still those a token says (a read of two
        keys: cheap enough to ask for every open connection every second)."""
        with self.tables.read() as txn:
            raw = txn.get("signins", session_id.encode())
            found_user = txn.get("users", user_id.encode())
        if raw is None or found_user is None:
            return False
        user = _user(user_id, found_user)
        found = _signin(raw)
        if user.disabled or found.user != user_id or found.revoked:
            return False
        return (projects is None or user.projects == projects) and (roles is None or user.roles == roles)

    def touch(self, session_id: str, now: float | None = None) -> None:
        with self.tables.write() as txn:
            raw = txn.get("signins", session_id.encode())
            if raw is not None:
                record = orjson.loads(raw)
                record["lastUsed"] = int(now if now is not None else time.time())
                txn.put("signins", session_id.encode(), orjson.dumps(record))

    def sessions_of(self, user_id: str) -> list[SignedIn]:
        with self.tables.read() as txn:
            found = [_signin(v) for _, v in txn.items("signins")]
        return sorted((s for s in found if s.user == user_id and not s.revoked), key=lambda s: -s.last_used)

    def revoke(self, user_id: str, session_id: str) -> bool:
        """Sign one session out (by id, only the user's own); whether it was live."""
        return bool(self._revoke(lambda s: s["user"] == user_id and s["id"] == session_id))

    def revoke_all(self, user_id: str) -> int:
        return self._revoke(lambda s: s["user"] == user_id)

    def _revoke(self, which: Any) -> int:
        count = 0
        with self.tables.write() as txn:
            for key, raw in txn.items("signins"):
                record = orjson.loads(raw)
                if which(record) and not record.get("revoked"):
                    record["revoked"] = True
                    txn.put("signins", key, orjson.dumps(record))
                    count += 1
        return count
