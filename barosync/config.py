"""Configuration: one TOML file, every key checked, every default in one table.

A config error names the file, the key and what was expected, so start-up can print
one line instead of a traceback.
"""

from __future__ import annotations

import math
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
    # Largest `.ics` body an import may send (a whole calendar export); other HTTP
    # bodies are held to max_message_bytes.
    max_import_bytes: int = 16 * 1024 * 1024
    # Bytes one connection may have waiting to be written before it counts as too
    # slow and is closed with 4008 (it resumes with `since`, nothing is lost).
    outbox_bytes: int = 4 * 1024 * 1024
    max_subscriptions: int = 100
    max_connections_per_user: int = 50
    # Client messages per second per connection (acks are free: they are bounded by
    # what the server sends), with a burst allowance.
    rate_limit: float = 200.0
    rate_burst: int = 400
    # HTTP requests (REST, CalDAV, the ICS feed together) per second per identity, and
    # the burst: a calendar app's sync comes in bursts of many small requests.
    http_rate_limit: float = 200.0
    http_rate_burst: int = 2000
    handshake_timeout: float = 10.0
    # How often a client acks changes cumulatively, told in `hello` (ackIntervalMs):
    # every ack is a read and a parse for the server, so at 20 changes/s one per
    # 250 ms costs a fifth of one per change; the inspector's unacked count lags
    # by at most this much.
    ack_interval: float = 0.25
    # `barosync serve` on a loopback address prints the owner's sign-in link.
    browser_link: bool = True
    # Browser Origins allowed to open /ws; empty means any (tokens still apply).
    allowed_origins: tuple[str, ...] = ()
    data_dir: Path = Path(DEFAULT_DATA)
    map_size: int = 64 * 1024 * 1024
    # The map never grows past this many bytes (0: no ceiling); at the ceiling writes
    # are refused with `storage_full`, like on a full disk.
    max_map_size: int = 0
    # Changelog history kept per project: changes older than this many seconds are
    # pruned (a `since` before them gets a snapshot); 0 for history_max_changes
    # means no count limit.
    history_retention: float = 30 * 24 * 3600.0
    history_max_changes: int = 0
    # Kept out of repr() so that logs and plugin traces never show it.
    secret: str | None = attrs.field(default=None, repr=False)
    heartbeat_interval: float = 30.0
    heartbeat_timeout: float = 60.0
    cursor_rate: float = 20.0
    conflict_default: str = "merge"
    merge_tiebreak: str = "manual"
    conflict_projects: dict[str, str] = attrs.field(factory=dict)
    # CalDAV's Basic sign-in is refused over plain HTTP on a non-loopback address
    # unless a TLS-terminating proxy sets this header to "https".
    caldav_tls_header: str | None = None
    # Sign-in with the team's OpenID provider (transports/oidc.py); off without an issuer.
    oidc_issuer: str | None = None
    oidc_client_id: str | None = None
    oidc_client_secret: str | None = attrs.field(default=None, repr=False)
    oidc_name: str = "your identity provider"
    oidc_scopes: tuple[str, ...] = ("openid", "profile", "email")
    oidc_redirect_uri: str | None = None
    oidc_groups_claim: str = "groups"
    oidc_group_prefix: str = "barosync:"
    # Several nodes: the durable log in PostgreSQL instead of this node's LMDB
    # (pg_store.py); a libpq URL, e.g. postgresql://barosync@db.internal/barosync.
    cluster_postgres: str | None = attrs.field(default=None, repr=False)
    # ... and the live bus between nodes (bus.py): a redis:// URL.
    cluster_redis: str | None = attrs.field(default=None, repr=False)
    plugin_paths: tuple[Path, ...] = ()
    plugins_disable: tuple[str, ...] = ()
    # [plugins.<name>] tables, handed to plugins as they are.
    plugin_options: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    source: str = "defaults"

    def strategy_for(self, project_id: str) -> str:
        return self.conflict_projects.get(project_id, self.conflict_default)

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
    # TOML has inf and nan; neither is a usable number of seconds (the hello message
    # sends int(seconds * 1000), which raises on both).
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"expected a positive number of seconds, got {value!r}")
    return float(value)


def _str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _str_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"expected a list of non-empty strings, got {value!r}")
    return tuple(value)


# HS256 keys shorter than the hash (RFC 7518 §3.2) can be guessed offline from one
# token; then anyone can mint tokens for anyone.
MIN_SECRET_BYTES = 32


def _secret(value: Any) -> str:
    text = _str(value)
    if len(text.encode()) < MIN_SECRET_BYTES:
        raise ValueError(f"must be at least {MIN_SECRET_BYTES} bytes (a short secret lets anyone forge tokens); "
                         "generate one with: python3 -c 'import secrets; print(secrets.token_urlsafe(48))'")
    return text


def _rate_limit(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 10_000_000:
        raise ValueError(f"expected messages per second (a positive number), got {value!r}")
    return float(value)


def _rate(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1000:
        raise ValueError(f"expected a number of messages per second from 0 to 1000, got {value!r}")
    return float(value)


# section -> key -> (Config attribute, checker). The names are part of the contract
# with config.example.toml; tests check that every key here is documented there.
SCHEMA: dict[str, dict[str, tuple[str, Callable[[Any], Any]]]] = {
    "server": {
        "host": ("host", _str),
        "port": ("port", _int(0, 65535)),
        "max_message_bytes": ("max_message_bytes", _int(1024, 16 * 1024 * 1024)),
        "max_import_bytes": ("max_import_bytes", _int(1024, 1024 * 1024 * 1024)),
        "outbox_bytes": ("outbox_bytes", _int(64 * 1024, 1024 * 1024 * 1024)),
        "max_subscriptions": ("max_subscriptions", _int(1, 100_000)),
        "max_connections_per_user": ("max_connections_per_user", _int(1, 1_000_000)),
        "rate_limit": ("rate_limit", _rate_limit),
        "rate_burst": ("rate_burst", _int(1, 10_000_000)),
        "http_rate_limit": ("http_rate_limit", _rate_limit),
        "http_rate_burst": ("http_rate_burst", _int(1, 10_000_000)),
        "handshake_timeout": ("handshake_timeout", _seconds),
        "ack_interval": ("ack_interval", _seconds),
        "allowed_origins": ("allowed_origins", _str_list),
        "browser_link": ("browser_link", _bool),
    },
    "storage": {
        "path": ("data_dir", _str),
        "map_size": ("map_size", _int(1024 * 1024, 1 << 44)),
        "max_map_size": ("max_map_size", _int(0, 1 << 44)),
        "history_retention": ("history_retention", _seconds),
        "history_max_changes": ("history_max_changes", _int(0, 1 << 62)),
    },
    "auth": {
        "secret": ("secret", _secret),
    },
    "heartbeat": {
        "interval": ("heartbeat_interval", _seconds),
        "timeout": ("heartbeat_timeout", _seconds),
    },
    "presence": {
        "cursor_rate": ("cursor_rate", _rate),
    },
    "conflict": {
        "default": ("conflict_default", _str),
        "merge_tiebreak": ("merge_tiebreak", _str),
        # "projects" is a table of project id -> strategy, checked below.
    },
    "caldav": {
        "tls_header": ("caldav_tls_header", _str),
    },
    "oidc": {
        "issuer": ("oidc_issuer", _str),
        "client_id": ("oidc_client_id", _str),
        "client_secret": ("oidc_client_secret", _str),
        "name": ("oidc_name", _str),
        "scopes": ("oidc_scopes", _str_list),
        "redirect_uri": ("oidc_redirect_uri", _str),
        "groups_claim": ("oidc_groups_claim", _str),
        "group_prefix": ("oidc_group_prefix", _str),
    },
    "cluster": {
        "postgres": ("cluster_postgres", _str),
        "redis": ("cluster_redis", _str),
    },
    "plugins": {
        "paths": ("plugin_paths", _str_list),
        "disable": ("plugins_disable", _str_list),
        # Any other key must be a table: that plugin's options.
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
            if section == "conflict" and key == "projects":
                if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
                    raise ConfigError(source, "[conflict.projects]", "expected a table of project id = \"strategy name\"")
                values["conflict_projects"] = dict(value)
                continue
            if section == "plugins" and key not in SCHEMA["plugins"]:
                if not isinstance(value, dict):
                    raise ConfigError(source, f"[plugins] {key}", "unknown key (known: paths, disable, or a [plugins.NAME] table of a plugin's options)")
                values.setdefault("plugin_options", {})[key] = value
                continue
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
    # Plugin directories are relative to the config file too; a config file that does
    # not name any gets the plugins/ folder beside it (when there is one).
    if "plugin_paths" in values:
        values["plugin_paths"] = tuple(base_dir / p for p in values["plugin_paths"])
    elif (base_dir / "plugins").is_dir():
        values["plugin_paths"] = (base_dir / "plugins",)
    config = Config(**values)
    if config.cluster_redis and not config.cluster_postgres:
        raise ConfigError(source, "[cluster] redis", "needs [cluster] postgres too: the bus carries what the shared "
                                                     "log holds (docs/cluster.md)")
    if config.oidc_issuer is not None:
        if not config.oidc_issuer.startswith(("https://", "http://")):
            raise ConfigError(source, "[oidc] issuer", "must be the provider's URL, e.g. https://auth.example.com")
        if not config.oidc_client_id:
            raise ConfigError(source, "[oidc] client_id", "is needed with [oidc] issuer: the client id the provider "
                                                         "gave barosync")
        if "openid" not in config.oidc_scopes:
            raise ConfigError(source, "[oidc] scopes", "must include \"openid\"")
    if config.heartbeat_timeout <= config.heartbeat_interval:
        raise ConfigError(
            source,
            "[heartbeat] timeout",
            f"must be greater than [heartbeat] interval ({config.heartbeat_interval:g} s)",
        )
    return config


def private_dir(path: Path) -> Path:
    """The data directory, created 0700 (and made so, if an older release made it
    readable by others): it holds events, password hashes and the signing secret."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        if path.stat().st_uid == os.getuid() and path.stat().st_mode & 0o077:
            path.chmod(0o700)
    except OSError:
        pass  # not ours to change: the files inside are still created 0600
    return path


def ensure_secret(config: Config) -> str:
    """The signing secret: configured, or generated once into the data directory."""
    if config.secret:
        try:
            return _secret(config.secret)
        except ValueError as e:
            raise ConfigError(config.source, "[auth] secret", str(e)) from None
    private_dir(config.data_dir)
    path = config.data_dir / SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        secret = path.read_text().strip()
        if len(secret.encode()) < MIN_SECRET_BYTES:
            raise ConfigError(str(path), "[auth] secret", f"the secret file holds fewer than {MIN_SECRET_BYTES} bytes "
                                                           "(a short secret lets anyone forge tokens); delete it to "
                                                           "generate a new one (every token minted with it stops working)") from None
        return secret
    secret = secrets.token_urlsafe(48)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
        f.flush()
        os.fsync(f.fileno())
    return secret
