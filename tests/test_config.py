"""Configuration: config.example.toml is the defaults, and every bad file is one clear error."""

from __future__ import annotations

import os
import re
import stat
import tomllib
from pathlib import Path
from typing import Any

import attrs
import pytest

from barosync.config import SCHEMA, SECRET_FILE, Config, ConfigError, ensure_secret, load_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.toml"

# Keys whose default cannot be written as a TOML value, so the example shows them as
# a commented-out assignment and explains the default in words.
COMMENTED_IN_EXAMPLE = {
    ("auth", "secret"): "default None: generated into the data directory",
    ("plugins", "paths"): "default depends on whether plugins/ exists beside the file",
    ("caldav", "tls_header"): "default None: no proxy header is trusted",
    ("cluster", "postgres"): "default None: the embedded LMDB",
    ("cluster", "redis"): "default None: no bus between nodes",
    ("oidc", "issuer"): "default None: no identity provider",
    ("oidc", "client_id"): "default None: given by the provider",
    ("oidc", "client_secret"): "default None: given by the provider",
    ("oidc", "redirect_uri"): "default None: from the browser's address",
}
# Config attributes that a file holds relative to itself.
PATH_ATTRS = {"data_dir", "plugin_paths"}


def write(tmp_path: Path, text: str, name: str = "barosync.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def comparable(config: Config) -> dict[str, Any]:
    return {k: v for k, v in attrs.asdict(config, recurse=False).items() if k not in PATH_ATTRS | {"source"}}


def example_sections() -> dict[str, str]:
    """The text of each top-level [section] of the example, comments included."""
    sections: dict[str, str] = {}
    current = ""
    for line in EXAMPLE.read_text().splitlines():
        header = re.match(r"\[([A-Za-z0-9_.-]+)\]\s*$", line)
        if header:
            current = header.group(1).split(".")[0]
        sections[current] = sections.get(current, "") + line + "\n"
    return sections


# -- config.example.toml --------------------------------------------------------------------


def test_example_file_loads_as_the_defaults(tmp_path):
    copy = write(tmp_path, EXAMPLE.read_text(), "copied.toml")
    config = load_config(copy)
    assert comparable(config) == comparable(Config())
    assert config.data_dir == tmp_path.resolve() / Config().data_dir
    assert config.plugin_paths == Config().plugin_paths
    assert config.source == str(copy)


def test_example_file_in_the_repository_resolves_paths_beside_itself():
    config = load_config(EXAMPLE)
    assert comparable(config) == comparable(Config())
    assert config.data_dir == ROOT / "barosync-data"
    assert config.plugin_paths == ((ROOT / "plugins",) if (ROOT / "plugins").is_dir() else ())


def test_every_schema_key_is_in_the_example_with_its_default():
    parsed = tomllib.loads(EXAMPLE.read_text())
    sections = example_sections()
    defaults = Config()
    for section, keys in SCHEMA.items():
        assert section in parsed, f"[{section}] missing from config.example.toml"
        for key, (attr, check) in keys.items():
            if (section, key) in COMMENTED_IN_EXAMPLE:
                assert key not in parsed[section]
                assert re.search(rf"^# {re.escape(key)} = ", sections[section], re.M), f"[{section}] {key} is not documented"
                continue
            assert key in parsed[section], f"[{section}] {key} missing from config.example.toml"
            value = check(parsed[section][key])
            default = getattr(defaults, attr)
            if attr in PATH_ATTRS:
                value = Path(value)
            assert value == default, f"[{section}] {key} = {value!r} in the example, but the default is {default!r}"


def test_every_key_in_the_example_has_a_comment_above_it():
    lines = EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"[a-z_]+ = ", line):
            assert lines[i - 1].startswith("#"), f"{line!r} has no comment"


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, key",
    [
        ("[database]\nurl = 'lmdb://'\n", "[database]"),
        ("server = 8080\n", "[server]"),
        ("[server]\nhots = '0.0.0.0'\n", "[server] hots"),
        ("[storage]\ndir = 'data'\n", "[storage] dir"),
        ("[server]\nport = '8080'\n", "[server] port"),
        ("[server]\nport = true\n", "[server] port"),
        ("[server]\nport = 80.5\n", "[server] port"),
        ("[server]\nport = 65536\n", "[server] port"),
        ("[server]\nport = -1\n", "[server] port"),
        ("[server]\nhost = ''\n", "[server] host"),
        ("[server]\nmax_message_bytes = 10\n", "[server] max_message_bytes"),
        ("[server]\noutbox_bytes = 1024\n", "[server] outbox_bytes"),
        ("[storage]\npath = 5\n", "[storage] path"),
        ("[storage]\nmap_size = 1\n", "[storage] map_size"),
        ("[auth]\nsecret = ''\n", "[auth] secret"),
        ("[auth]\nsecret = 'x'\n", "[auth] secret"),
        ("[auth]\nsecret = 'thirty-one-bytes-is-not-enough!'\n", "[auth] secret"),
        ("[heartbeat]\ninterval = '30s'\n", "[heartbeat] interval"),
        ("[heartbeat]\ninterval = 0\n", "[heartbeat] interval"),
        ("[heartbeat]\ninterval = -5.0\n", "[heartbeat] interval"),
        ("[heartbeat]\ninterval = nan\n", "[heartbeat] interval"),
        ("[heartbeat]\ntimeout = inf\n", "[heartbeat] timeout"),
        ("[presence]\ncursor_rate = 0\n", "[presence] cursor_rate"),
        ("[presence]\ncursor_rate = 1001\n", "[presence] cursor_rate"),
        ("[conflict]\ndefault = 3\n", "[conflict] default"),
        ("[conflict.projects]\np1 = 3\n", "[conflict.projects]"),
        ("[plugins]\npaths = 'plugins'\n", "[plugins] paths"),
        ("[plugins]\ndisable = [1]\n", "[plugins] disable"),
        ("[plugins]\nverbose = true\n", "[plugins] verbose"),
        ("[oidc]\nissuer = 'https://auth.example.com'\n", "[oidc] client_id"),
        ("[oidc]\nissuer = 'auth.example.com'\nclient_id = 'b'\n", "[oidc] issuer"),
        ("[oidc]\nissuer = 'https://a.example'\nclient_id = 'b'\nscopes = ['profile']\n", "[oidc] scopes"),
    ],
)
def test_bad_value_names_the_file_and_the_key(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert err.key == key
    assert err.source == str(path)
    assert str(err).startswith(f"{path}: {key}: ")
    assert "\n" not in str(err)


def test_out_of_range_message_says_what_is_expected(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "[server]\nport = 70000\n"))
    assert "0 to 65535" in info.value.message and "70000" in info.value.message


def test_unknown_key_message_lists_the_known_ones(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "[server]\nprot = 1\n"))
    assert "port" in info.value.message and "host" in info.value.message


@pytest.mark.parametrize(
    "text",
    [
        "[heartbeat]\ninterval = 30\ntimeout = 30\n",
        "[heartbeat]\ninterval = 30\ntimeout = 10\n",
        "[heartbeat]\ntimeout = 15\n",  # below the default interval
        "[heartbeat]\ninterval = 90\n",  # above the default timeout
    ],
)
def test_heartbeat_timeout_not_above_interval_is_refused(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key == "[heartbeat] timeout"
    assert str(path) in str(info.value) and "interval" in info.value.message


def test_invalid_toml_names_the_file_and_the_line(tmp_path):
    path = write(tmp_path, "[server]\nport = 80\nhost = 127.0.0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path)
    assert str(path) in str(info.value)
    assert "TOML" in info.value.message and "line 3" in info.value.message
    assert "\n" not in str(info.value)


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "nowhere.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")
    assert "not found" in info.value.message


def test_directory_instead_of_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert info.value.source == str(tmp_path)


# -- values -----------------------------------------------------------------------------------


def test_values_in_the_file_override_the_defaults(tmp_path):
    config = load_config(write(tmp_path, "[server]\nport = 9000\n[heartbeat]\ninterval = 5\ntimeout = 12.5\n"))
    assert config.port == 9000
    assert config.heartbeat_interval == 5.0 and config.heartbeat_timeout == 12.5
    assert config.host == Config().host


def test_relative_paths_are_beside_the_file_not_the_working_directory(tmp_path, monkeypatch):
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    path = write(conf_dir, "[storage]\npath = 'data'\n[plugins]\npaths = ['extra']\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(Path("..") / "etc" / path.name)
    assert config.data_dir.resolve() == (conf_dir / "data").resolve()
    assert [p.resolve() for p in config.plugin_paths] == [(conf_dir / "extra").resolve()]


def test_absolute_data_path_is_kept(tmp_path):
    target = tmp_path / "somewhere" / "data"
    config = load_config(write(tmp_path, f"[storage]\npath = '{target}'\n"))
    assert config.data_dir == target


def test_no_config_file_means_the_defaults():
    assert load_config(None) == Config()


def test_overrides_ignore_unset_options():
    config = Config().with_overrides(port=0, host=None, data_dir=None)
    assert config.port == 0 and config.host == Config().host and config.data_dir == Config().data_dir


# -- the generated secret ---------------------------------------------------------------------


def test_ensure_secret_generates_a_private_file_once_and_reuses_it(tmp_path):
    config = Config(data_dir=tmp_path / "new" / "data")
    first = ensure_secret(config)
    path = config.data_dir / SECRET_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == first
    assert len(first) >= 32
    assert ensure_secret(config) == first
    assert ensure_secret(Config(data_dir=config.data_dir)) == first


def test_ensure_secret_is_private_even_with_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        ensure_secret(Config(data_dir=tmp_path))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / SECRET_FILE).stat().st_mode) == 0o600


def test_ensure_secret_differs_between_data_directories(tmp_path):
    assert ensure_secret(Config(data_dir=tmp_path / "a")) != ensure_secret(Config(data_dir=tmp_path / "b"))


def test_configured_secret_is_used_and_nothing_is_written(tmp_path):
    config = Config(data_dir=tmp_path / "data", secret="configured-secret-0123456789-abcdefghij")
    assert ensure_secret(config) == "configured-secret-0123456789-abcdefghij"
    assert not (tmp_path / "data" / SECRET_FILE).exists()


def test_empty_secret_file_is_a_config_error(tmp_path):
    (tmp_path / SECRET_FILE).write_text("\n")
    with pytest.raises(ConfigError) as info:
        ensure_secret(Config(data_dir=tmp_path))
    assert str(tmp_path / SECRET_FILE) in str(info.value)


def test_a_short_secret_is_refused_with_how_to_make_a_good_one(tmp_path):
    """Under 32 bytes anyone can guess an HS256 key from one token, then mint tokens."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "[auth]\nsecret = 'hunter2'\n"))
    assert "at least 32 bytes" in info.value.message and "secrets.token_urlsafe" in info.value.message
    short = Config(data_dir=tmp_path / "data", secret="hunter2")  # made in code, not read from a file
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        ensure_secret(short)
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "secret").write_text("short\n")
    with pytest.raises(ConfigError, match="delete it to generate a new one"):
        ensure_secret(Config(data_dir=tmp_path / "data"))
