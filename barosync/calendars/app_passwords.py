"""App passwords: what calendar apps sign in with (HTTP Basic), since they cannot
carry bearer tokens.

``barosync token create --user alice --app-password`` makes one: a user name (the user
id) and a long random password ``bsp_<id>_<secret>``. Only a salted scrypt hash is
kept, in the data directory's ``app-passwords.json`` (written atomically; the server
re-reads it when it changes, so ``barosync token revoke <id>`` takes effect at the
next request). Each password is scoped to the projects it was made for.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..config import private_dir
from ..domain.models import ALL_PROJECTS, Identity, ValidationError, check_id, parse_roles

FILE = "app-passwords.json"
PREFIX = "bsp_"
# scrypt's cost: about 50 ms and 16 MiB per check on a small server. A check that
# succeeded is remembered (see Verifier), so an app's many requests pay it once.
SCRYPT = {"n": 2**14, "r": 8, "p": 1}


class AppPasswordError(ValueError):
    pass


def _hash(secret: str, salt: bytes, params: dict[str, int]) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, n=params["n"], r=params["r"], p=params["p"],
                          maxmem=64 * 1024 * 1024, dklen=32)


@contextmanager
def _locked(data_dir: Path) -> Iterator[dict[str, Any]]:
    """The file's content, to change in place; written back atomically (fsync,
    rename) under an exclusive lock so two CLI runs cannot lose each other's change."""
    private_dir(data_dir)
    path = data_dir / FILE
    with open(os.open(data_dir / (FILE + ".lock"), os.O_RDWR | os.O_CREAT, 0o600), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        content = _read(path)
        yield content
        tmp = path.with_suffix(".tmp")
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        fd = os.open(data_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _read(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except FileNotFoundError:
        return {"passwords": []}
    if not isinstance(content, dict) or not isinstance(content.get("passwords"), list):
        raise AppPasswordError(f"{path} is not an app-password file barosync wrote; move it away")
    return content


def create(data_dir: Path, *, user_id: str, projects: Iterable[str] | str, name: str | None = None,
           roles: dict[str, str] | None = None, account: bool = False,
           now: float | None = None) -> tuple[str, dict[str, Any]]:
    """A new app password: (the password, its stored entry without the hash)."""
    try:
        check_id(user_id, "user")
        parse_roles(roles)
    except ValidationError as e:
        raise AppPasswordError(f"--{e.field} {e.message}") from None
    pid = "ap" + secrets.token_hex(6)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(30)).decode()
    salt = secrets.token_bytes(16)
    entry = {
        "id": pid,
        "user": user_id,
        "name": name or f"{user_id}'s app",
        "projects": projects if projects == ALL_PROJECTS else sorted(set(projects)),
        "created": int(now if now is not None else time.time()),
        "roles": dict(roles or {}),
        # Made by an account's owner in the web app: it opens what the account may open
        # now, and stops when the account is disabled (calendars/caldav.py).
        "account": account,
        "salt": salt.hex(),
        "scrypt": SCRYPT,
        "hash": _hash(secret, salt, SCRYPT).hex(),
    }
    with _locked(Path(data_dir)) as content:
        content["passwords"].append(entry)
    return f"{PREFIX}{pid}_{secret}", public(entry)


def public(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: entry.get(k, {}) if k == "roles" else entry[k]
            for k in ("id", "user", "name", "projects", "roles", "created")}


def listing(data_dir: Path) -> list[dict[str, Any]]:
    return [public(e) for e in _read(Path(data_dir) / FILE)["passwords"]]


def revoke(data_dir: Path, which: str) -> dict[str, Any] | None:
    """Remove an app password (by id, or the password itself); the entry, or None."""
    pid = which[len(PREFIX):].split("_", 1)[0] if which.startswith(PREFIX) else which
    if not (Path(data_dir) / FILE).exists():
        return None
    with _locked(Path(data_dir)) as content:
        found = [e for e in content["passwords"] if e["id"] == pid]
        content["passwords"] = [e for e in content["passwords"] if e["id"] != pid]
    return public(found[0]) if found else None


class Verifier:
    """Checks Basic credentials against the file, re-read when it changes.

    A password that passed is remembered by its SHA-256 (never the password), so the
    scrypt cost is paid once per app rather than once per request; the memory is
    dropped whenever the file changes, so a revocation holds at the next request.
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / FILE
        self._mtime: int | None = None
        self._entries: dict[str, dict[str, Any]] = {}
        self._passed: dict[bytes, str] = {}

    def _refresh(self) -> None:
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except FileNotFoundError:
            mtime = None
        if mtime != self._mtime:
            self._mtime = mtime
            self._passed.clear()
            try:
                entries = _read(self.path)["passwords"] if mtime is not None else []
            except (AppPasswordError, ValueError):
                entries = []
            self._entries = {e["id"]: e for e in entries if isinstance(e, dict) and "id" in e}

    def lookup(self, user: str, password: str) -> tuple[dict[str, Any] | None, bool]:
        """(the entry the password names, whether it is already known to match)."""
        self._refresh()
        if not password.startswith(PREFIX) or password.count("_") < 2:
            return None, False
        pid = password[len(PREFIX):].split("_", 1)[0]
        entry = self._entries.get(pid)
        if entry is None or entry["user"] != user:
            return None, False
        return entry, self._passed.get(hashlib.sha256(password.encode()).digest()) == pid

    def check(self, entry: dict[str, Any], password: str) -> bool:
        """The slow part (scrypt); safe to run in a worker thread."""
        secret = password[len(PREFIX):].split("_", 1)[1]
        expected = bytes.fromhex(entry["hash"])
        ok = hmac.compare_digest(_hash(secret, bytes.fromhex(entry["salt"]), entry["scrypt"]), expected)
        if ok:
            self._passed[hashlib.sha256(password.encode()).digest()] = entry["id"]
        return ok


def identity(entry: dict[str, Any]) -> Identity:
    projects = entry["projects"]
    return Identity(user_id=entry["user"], name=entry["user"],
                    projects=ALL_PROJECTS if projects == ALL_PROJECTS else frozenset(projects),
                    scope="caldav", token_id=entry["id"], roles=parse_roles(entry.get("roles")))
