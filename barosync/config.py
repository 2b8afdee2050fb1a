"""Configuration: one TOML file, every key checked, every default in one table.

A config error names the file, the key and what was expected, so start-up can print
one line instead of a traceback.
"""

from __future__ import annotations

import os
import secrets
import tomllib
from pathlib import Path
from typing import Any, Callable

import attrs

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_DATA = "barosync-data"
SECRET_FILE = "secret"


class ConfigError(Exception):
    """A configuration problem, worded for the person who wrote the file."""

    def __init__(self, source: str, key: str, message: str) -> None:
        self.source = source
        self.key = key
        self.message = message
        super().__init__(f"{source}: {key}: {message}")


@attrs.frozen
class Config:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_message_bytes: int = 64 * 1024
    # Bytes one connection may have waiting to be written before it counts as too
    # slow and is closed with 4008 (it resumes with `since`, nothing is lost).
    outbox_bytes: int = 4 * 1024 * 1024
    data_dir: Path = Path(DEFAULT_DATA)
    map_size: int = 64 * 1024 * 1024
    secret: str | None = None
    heartbeat_interval: float = 30.0
    heartbeat_timeout: float = 60.0
    source: str = "defaults"

    def with_overrides(self, **changes: Any) -> "Config":
        return attrs.evolve(self, **{k: v for k, v in changes.items() if v is not None})


def _int(lo: int, hi: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer from {lo} to {hi}, got {value!r}")
        if not lo <= value <= hi:
            raise ValueError(f"expected an integer from {lo} to {hi}, got {value}")
        return value

    return check


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"expected a positive number of seconds, got {value!r}")
    return float(value)


def _str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value


# section -> key -> (Config attribute, checker). The names are part of the contract
# with config.example.toml; tests check that every key here is documented there.
SCHEMA: dict[str, dict[str, tuple[str, Callable[[Any], Any]]]] = {
    "server": {
        "host": ("host", _str),
        "port": ("port", _int(0, 65535)),
        "max_message_bytes": ("max_message_bytes", _int(1024, 16 * 1024 * 1024)),
        "outbox_bytes": ("outbox_bytes", _int(64 * 1024, 1024 * 1024 * 1024)),
    },
    "storage": {
        "path": ("data_dir", _str),
        "map_size": ("map_size", _int(1024 * 1024, 1 << 44)),
    },
    "auth": {
        "secret": ("secret", _str),
    },
    "heartbeat": {
        "interval": ("heartbeat_interval", _seconds),
        "timeout": ("heartbeat_timeout", _seconds),
    },
}


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and check a config file; with no path, the embedded defaults."""
    if path is None:
        return Config()
    source = str(path)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(source, "file", "not found (check the --config path)") from None
    except OSError as e:
        raise ConfigError(source, "file", f"cannot be read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, "file", f"is not valid TOML: {e}") from None
    return parse_config(raw, source=source, base_dir=Path(path).resolve().parent)


def parse_config(raw: dict[str, Any], *, source: str, base_dir: Path) -> Config:
    values: dict[str, Any] = {"source": source}
    for section, table in raw.items():
        if section not in SCHEMA:
            known = ", ".join(f"[{s}]" for s in SCHEMA)
            raise ConfigError(source, f"[{section}]", f"unknown section (known: {known})")
        if not isinstance(table, dict):
            raise ConfigError(source, f"[{section}]", "expected a table of keys")
        for key, value in table.items():
            spec = SCHEMA[section].get(key)
            if spec is None:
                known = ", ".join(SCHEMA[section])
                raise ConfigError(source, f"[{section}] {key}", f"unknown key (known: {known})")
            attr, check = spec
            try:
                values[attr] = check(value)
            except ValueError as e:
                raise ConfigError(source, f"[{section}] {key}", str(e)) from None
    if "data_dir" in values:
        # A relative data path in a file means "next to the file", not "wherever
        # the server happens to be started from".
        values["data_dir"] = base_dir / values["data_dir"]
    config = Config(**values)
    if config.heartbeat_timeout <= config.heartbeat_interval:
        raise ConfigError(
            source,
            "[heartbeat] timeout",
            f"must be greater than [heartbeat] interval ({config.heartbeat_interval:g} s)",
        )
    return config


def ensure_secret(config: Config) -> str:
    """The signing secret: configured, or generated once into the data directory."""
    if config.secret:
        return config.secret
    config.data_dir.mkdir(parents=True, exist_ok=True)
    path = config.data_dir / SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        secret = path.read_text().strip()
        if not secret:
            raise ConfigError(str(path), "[auth] secret", "the generated secret file is empty; delete it to generate a new one") from None
        return secret
    secret = secrets.token_urlsafe(48)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
        f.flush()
        os.fsync(f.fileno())
    return secret
