"""The plugin manager: built-in plugins registered by import, third-party plugins
from plugin directories (by path) and from the ``barosync`` entry-point group.

Registering built-ins explicitly (not through entry points) is what lets the frozen
single-file binary work: it has no package metadata to discover them from, while a
``.py`` file in a plugin directory loads the same way frozen or not.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any

import pluggy

from . import hookspecs
from .config import Config

log = logging.getLogger("barosync.plugins")

# (name, module, attribute or None for the module itself)
DEFAULT_PLUGINS: tuple[tuple[str, str, str | None], ...] = (
    ("auth", "barosync.auth", None),
    ("last_write_wins", "barosync.conflicts", "LAST_WRITE_WINS"),
    ("first_write_wins", "barosync.conflicts", "FIRST_WRITE_WINS"),
    ("merge", "barosync.conflicts", "MERGE"),
    ("manual", "barosync.conflicts", "MANUAL"),
    ("codecs", "barosync.codecs", None),
)
ENTRY_POINT_GROUP = "barosync"
TRACE_ENV = "BAROSYNC_TRACE_PLUGINS"


class PluginError(Exception):
    """A plugin could not be loaded; the message names the file or entry point."""


def build_plugin_manager(config: Config) -> pluggy.PluginManager:
    pm = pluggy.PluginManager("barosync")
    pm.add_hookspecs(hookspecs)
    disabled = set(config.plugins_disable)
    for name, module_name, attr in DEFAULT_PLUGINS:
        if name in disabled:
            continue
        module = importlib.import_module(module_name)
        pm.register(getattr(module, attr) if attr else module, name=name)
    for directory in config.plugin_paths:
        for path in sorted(Path(directory).glob("*.py")):
            if path.stem in disabled or path.stem.startswith("_"):
                continue
            pm.register(load_plugin_file(path), name=path.stem)
    try:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    except Exception as e:  # a broken installed plugin names itself in the message
        raise PluginError(f"entry point in group {ENTRY_POINT_GROUP!r} failed to load: {type(e).__name__}: {e}") from e
    for name in disabled & {n for n, _ in pm.list_name_plugin()}:
        pm.unregister(name=name)
    if os.environ.get(TRACE_ENV):
        _trace(pm)
    return pm


def load_plugin_file(path: Path) -> Any:
    """Import one plugin file by path (works the same inside the frozen binary)."""
    module_name = f"barosync_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"{path}: not a loadable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(module_name, None)
        raise PluginError(f"{path}: failed to import: {type(e).__name__}: {e}") from e
    return module


def _trace(pm: pluggy.PluginManager) -> None:
    def before(hook_name: str, impls: Any, kwargs: dict[str, Any]) -> None:
        log.info("hook %s(%s) -> %d implementations", hook_name, _brief(kwargs), len(impls))

    def after(outcome: Any, hook_name: str, impls: Any, kwargs: dict[str, Any]) -> None:
        if outcome.exception is not None:
            log.info("hook %s raised %r", hook_name, outcome.exception)
        else:
            log.info("hook %s returned %s", hook_name, _brief(outcome.get_result()))

    pm.add_hookcall_monitoring(before, after)


def _brief(value: Any) -> str:
    text = repr(value)
    # Never write a bearer token into the logs.
    if isinstance(value, dict) and "token" in value:
        text = repr({**value, "token": "<redacted>"})
    return text if len(text) <= 500 else text[:497] + "..."


def strategy_names(pm: pluggy.PluginManager) -> list[str]:
    names: list[str] = []
    for provided in pm.hook.barosync_conflict_strategies():
        names.extend(provided or [])
    return names
