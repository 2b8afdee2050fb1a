"""The one plugin manager, with the built-in plugins registered by import.

Registering built-ins explicitly (not through entry points) is what lets the frozen
single-file binary work: it has no package metadata to discover them from.
"""

from __future__ import annotations

import importlib

import pluggy

from . import hookspecs

DEFAULT_PLUGINS = ("barosync.auth",)

pm = pluggy.PluginManager("barosync")
pm.add_hookspecs(hookspecs)

for _name in DEFAULT_PLUGINS:
    pm.register(importlib.import_module(_name), name=_name)
