"""The plugin manager: built-in plugins registered by import, third-party plugins
from plugin directories (by path) and from the ``barosync`` entry-point group.

Registering built-ins explicitly (not through entry points) is what lets the frozen
single-file binary work: it has no package metadata to discover them from, while a
``.py`` file in a plugin directory loads the same way frozen or not.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import os
import sys
from pathlib import Path
from typing import Any

import pluggy

from . import auth, codecs, conflicts, hookspecs
from ..config import Config
from .conflicts import Strategy

log = logging.getLogger(__name__)

# (name, plugin): a module, or a Strategy
DEFAULT_PLUGINS: tuple[tuple[str, Any], ...] = (
    ("auth", auth),
    ("last_write_wins", conflicts.LAST_WRITE_WINS),
    ("first_write_wins", conflicts.FIRST_WRITE_WINS),
    ("merge", conflicts.MERGE),
    ("manual", conflicts.MANUAL),
    ("codecs", codecs),
)
ENTRY_POINT_GROUP = "barosync"
TRACE_ENV = "BAROSYNC_TRACE_PLUGINS"


class PluginError(Exception):
    """A plugin could not be loaded; the message names the file or entry point."""


# Hooks called from the event loop, where an ``async def`` implementation is
# awaited. The others run in the write transaction or per frame: synchronous only.
ASYNC_HOOKS = frozenset({
    "barosync_authenticate", "barosync_authorize",
    "barosync_startup", "barosync_shutdown", "barosync_connect", "barosync_disconnect",
})


def build_plugin_manager(config: Config) -> pluggy.PluginManager:
    pm = pluggy.PluginManager("barosync")
    pm.add_hookspecs(hookspecs)
    disabled = set(config.plugins_disable)
    for name in disabled:
        pm.set_blocked(name)  # also keeps a disabled entry point from being imported
    for name, plugin in DEFAULT_PLUGINS:
        if name not in disabled:
            pm.register(plugin, name=name)
    for directory in config.plugin_paths:
        for path in sorted(Path(directory).glob("*.py")):
            if path.stem in disabled or path.stem.startswith("_"):
                continue
            plugin = load_plugin_file(path)
            if pm.get_plugin(path.stem) is not None:
                raise PluginError(f"{path}: a plugin named {path.stem!r} is already loaded (rename the file)")
            _register(pm, plugin, path.stem, str(path))
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if pm.is_blocked(ep.name) or pm.get_plugin(ep.name) is not None:
            continue
        where = f"entry point {ep.name} = {ep.value} (group {ENTRY_POINT_GROUP!r})"
        try:
            plugin = ep.load()
        except Exception as e:
            raise PluginError(f"{where}: failed to import: {type(e).__name__}: {e}") from e
        _register(pm, plugin, ep.name, where)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise PluginError(f"{getattr(e.plugin, '__file__', None) or e.plugin}: {e} (a misspelt hook name?)") from e
    if os.environ.get(TRACE_ENV):
        _trace(pm)
    return pm


def _register(pm: pluggy.PluginManager, plugin: Any, name: str, where: str) -> None:
    try:
        pm.register(plugin, name=name)
    except (ValueError, pluggy.PluginValidationError) as e:
        raise PluginError(f"{where}: {e}") from e
    if inspect.ismodule(plugin):  # its @strategy functions are plugins of their own
        for value in list(vars(plugin).values()):
            if isinstance(value, Strategy) and pm.get_name(value) is None:
                _register(pm, value, f"{name}.{value.name}", where)
    for caller in pm.get_hookcallers(plugin) or []:
        for impl in caller.get_hookimpls():
            if impl.plugin is plugin and inspect.iscoroutinefunction(impl.function) and caller.name not in ASYNC_HOOKS:
                pm.unregister(plugin)
                raise PluginError(
                    f"{where}: {caller.name} must be a plain def: it runs inside the write path "
                    f"(async def is fine for {', '.join(sorted(ASYNC_HOOKS))})")


def has_async_impls(hook: Any) -> bool:
    return any(inspect.iscoroutinefunction(impl.function) for impl in hook.get_hookimpls())


async def call_first(hook: Any, *, is_async: bool | None = None, **kwargs: Any) -> Any:
    """Call a firstresult hook whose implementations may be async: the first
    implementation that answers something other than None (after awaiting) wins.
    ``is_async`` (when the caller knows it, see ``has_async_impls``) saves the
    look at the implementations on every call."""
    if is_async is None:
        is_async = has_async_impls(hook)
    if not is_async:
        return hook(**kwargs)
    impls = hook.get_hookimpls()
    # pluggy would stop at the first coroutine object (it is not None), so an async
    # "no opinion" could not pass the question on: walk the implementations in
    # pluggy's own order instead.
    for impl in reversed(impls):
        result = impl.function(*(kwargs[name] for name in impl.argnames))
        if inspect.isawaitable(result):
            result = await result
        if result is not None:
            return result
    return None


async def call_each(hook: Any, **kwargs: Any) -> None:
    """Call a notification hook (sync or async implementations); a plugin's failure
    is logged and never stops the server or the other plugins."""
    try:
        results = hook(**kwargs)
    except Exception:
        log.exception("%s hook failed", hook.name)
        return
    for result in results:
        if inspect.isawaitable(result):
            try:
                await result
            except Exception:
                log.exception("%s hook failed", hook.name)


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


def strategy_resolvers(pm: pluggy.PluginManager) -> dict[str, Any]:
    """Each strategy name -> the ``barosync_resolve_conflict`` of the one plugin that
    provides it, so a plugin that answers without looking at ``strategy`` cannot
    decide other strategies' conflicts. A name provided twice is refused."""
    found: dict[str, Any] = {}
    for impl in pm.hook.barosync_conflict_strategies.get_hookimpls():
        for name in impl.function() or []:
            if name in found:
                raise PluginError(
                    f"conflict strategy {name!r} is provided by both {pm.get_name(found[name])!r} and "
                    f"{pm.get_name(impl.plugin)!r}: rename one, or disable one in [plugins] disable")
            found[name] = impl.plugin
    others = pm.get_plugins()
    return {name: pm.subset_hook_caller("barosync_resolve_conflict", [p for p in others if p is not provider])
            for name, provider in found.items()}


def strategy_names(pm: pluggy.PluginManager) -> list[str]:
    return list(strategy_resolvers(pm))
