"""ICS feed URLs people made in the web app: listed, revoked, and stopped when their
maker loses the project.

- ``feeds`` (a table beside the accounts', tables.py): feed id -> {user, project,
  created, revoked}. The id is the ``jti`` of the feed's token (hooks/auth.py), so
  core/app.py can ask, for a feed token, whether it is one of these and still live.
  A revoked one is kept, so that its token cannot pass for one made on the command
  line (those carry no record, and `barosync token revoke` stops them).
"""

from __future__ import annotations

import secrets
import time

import attrs
import orjson

from .accounts import Accounts
from .tables import Tables


@attrs.frozen
class Feed:
    id: str
    user: str
    project: str
    created: int


class Feeds:
    TABLES = ("feeds",)

    def __init__(self, tables: Tables, accounts: Accounts) -> None:
        self.tables = tables
        self.accounts = accounts

    def add(self, user_id: str, project: str, *, now: float | None = None) -> Feed:
        """A feed of ``project`` for ``user_id``: its id is the jti of the feed's token."""
        feed = Feed(id=secrets.token_hex(12), user=user_id, project=project,
                    created=int(now if now is not None else time.time()))
        with self.tables.write() as txn:
            txn.put("feeds", feed.id.encode(), orjson.dumps({"user": user_id, "project": project, "created": feed.created}))
        return feed

    def of(self, user_id: str) -> list[Feed]:
        with self.tables.read() as txn:
            found = [(k.decode(), orjson.loads(v)) for k, v in txn.items("feeds")]
        return sorted((Feed(id=k, user=d["user"], project=d["project"], created=d["created"])
                       for k, d in found if d["user"] == user_id and not d.get("revoked")), key=lambda f: -f.created)

    def revoke(self, user_id: str, feed_id: str) -> bool:
        """Stop one of the user's feeds; whether it was live."""
        with self.tables.write() as txn:
            raw = txn.get("feeds", feed_id.encode())
            record = orjson.loads(raw) if raw is not None else None
            if record is None or record["user"] != user_id or record.get("revoked"):
                return False
            record["revoked"] = True
            txn.put("feeds", feed_id.encode(), orjson.dumps(record))
        return True

    def live(self, feed_id: str, user_id: str) -> bool | None:
        """Whether a feed made here still opens: not revoked, its user enabled and still
        a reader of its project. None: no such feed here (a token from the command line)."""
        with self.tables.read() as txn:
            raw = txn.get("feeds", feed_id.encode())
        if raw is None:
            return None
        record = orjson.loads(raw)
        user = self.accounts.get(user_id) if not record.get("revoked") and record["user"] == user_id else None
        return user is not None and not user.disabled and user.role(record["project"]) is not None
