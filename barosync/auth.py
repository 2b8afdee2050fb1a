"""Built-in auth plugin: HS256 JWTs signed with the configured secret.

Claims: ``sub`` (user id), ``name``, ``projects`` (a list, or ``"*"``), ``exp``;
optionally ``avatar`` and ``color``. Identity comes only from here, never from a
user id a client writes into an envelope.
"""

from __future__ import annotations

import time
from typing import Iterable

import jwt

from .config import Config
from .hookspecs import hookimpl
from .models import ALL_PROJECTS, Identity, ValidationError, check_id

ALGORITHM = "HS256"
DEFAULT_TTL = 24 * 3600


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
    )


@hookimpl(trylast=True)
def barosync_authenticate(token: str, config: Config) -> Identity | None:
    if not config.secret:
        return None
    return decode_token(token, config.secret)


@hookimpl(trylast=True)
def barosync_authorize(identity: Identity, action: str, project_id: str) -> bool | None:
    return identity.may_access(project_id)
