"""Built-in auth plugin: HS256 JWTs signed with the configured secret.

Claims: ``sub`` (user id), ``name``, ``projects`` (a list, or ``"*"``), ``exp``,
``jti`` (the token's id); optionally ``roles`` (``{project: "viewer" | "editor" |
"owner"}``; a project without one is the editor's), ``avatar``, ``color``, ``admin``
(the sync inspector) and ``scope`` (``"feed"``: the read-only ICS feed and nothing else). Identity
comes only from here, never from a user id a client writes into an envelope. A token
whose ``jti`` is in the data directory's revocation list (``barosync token revoke``)
is refused.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Iterable

import jwt

from ..config import Config
from .hookspecs import hookimpl
from ..domain.models import ALL_PROJECTS, Identity, ValidationError, check_id, parse_roles

ALGORITHM = "HS256"
DEFAULT_TTL = 24 * 3600
# A feed URL lasts until revoked (ten years: a bound every client and JWT library holds),
# so a calendar app's subscription does not stop the next day.
FEED_TTL = 10 * 365 * 24 * 3600
# One revoked token id per line, in the data directory; written by `barosync token
# revoke`, read again by the server whenever the file changes.
REVOKED_FILE = "revoked-tokens"


def create_token(
    secret: str,
    *,
    user_id: str,
    name: str | None = None,
    projects: Iterable[str] | str = (),
    ttl: int = DEFAULT_TTL,
    now: float | None = None,
    **claims: object,
) -> str:
    issued = int(time.time() if now is None else now)
    body = {
        "sub": user_id,
        "name": name or user_id,
        "projects": projects if projects == ALL_PROJECTS else list(projects),
        "iat": issued,
        "exp": issued + ttl,
        "jti": uuid.uuid4().hex,
        **{k: v for k, v in claims.items() if v is not None},
    }
    return jwt.encode(body, secret, algorithm=ALGORITHM)


def decode_token(token: str, secret: str) -> Identity | None:
    try:
        claims = jwt.decode(token, secret, algorithms=[ALGORITHM], options={"require": ["sub", "exp"]})
    except jwt.PyJWTError:
        return None
    sub = claims.get("sub")
    projects = claims.get("projects", [])
    if not isinstance(sub, str) or not sub:
        return None
    try:
        check_id(sub, "sub")  # the user id is part of storage keys
        roles = parse_roles(claims.get("roles"))
    except ValidationError:
        return None
    if projects != ALL_PROJECTS:
        if not isinstance(projects, list) or not all(isinstance(p, str) for p in projects):
            return None
        projects = frozenset(projects)
    name = claims.get("name")
    return Identity(
        user_id=sub,
        name=name if isinstance(name, str) and name else sub,
        projects=projects,
        expires_at=float(claims["exp"]),
        avatar=claims.get("avatar") if isinstance(claims.get("avatar"), str) else None,
        color=claims.get("color") if isinstance(claims.get("color"), str) else None,
        scope="feed" if claims.get("scope") == "feed" else "access",
        admin=claims.get("admin") is True,
        token_id=claims.get("jti") if isinstance(claims.get("jti"), str) else None,
        roles=roles,
        session_id=claims.get("sid") if isinstance(claims.get("sid"), str) else None,
    )


def token_id(token: str) -> str | None:
    """The jti of a token (signature not checked: revoking needs no secret)."""
    try:
        jti = jwt.decode(token, options={"verify_signature": False}).get("jti")
    except jwt.PyJWTError:
        return None
    return jti if isinstance(jti, str) else None


def revoke(data_dir: Path, jti: str) -> None:
    fd = os.open(Path(data_dir) / REVOKED_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with open(fd, "a", encoding="utf-8") as f:
        f.write(jti + "\n")
        f.flush()
        os.fsync(f.fileno())


_revoked: dict[str, tuple[float, frozenset[str]]] = {}


def revoked(data_dir: Path) -> frozenset[str]:
    """The revoked token ids, re-read only when the file changed."""
    path = str(Path(data_dir) / REVOKED_FILE)
    try:
        mtime = os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return frozenset()
    cached = _revoked.get(path)
    if cached is None or cached[0] != mtime:
        with open(path, encoding="utf-8") as f:
            cached = (mtime, frozenset(line.strip() for line in f if line.strip()))
        _revoked[path] = cached
    return cached[1]


@hookimpl(trylast=True)
def barosync_authenticate(token: str, config: Config) -> Identity | None:
    if not config.secret:
        return None
    identity = decode_token(token, config.secret)
    if identity is not None and identity.token_id is not None and identity.token_id in revoked(config.data_dir):
        return None
    return identity


@hookimpl(trylast=True)
def barosync_authorize(identity: Identity, action: str, project_id: str) -> bool | None:
    return identity.may(action, project_id)
