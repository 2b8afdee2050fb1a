"""barosync: a self-hosted real-time sync server for team calendars.

The names below are the public API for plugin authors::

    from barosync import hookimpl, Problem, Resolution, strategy

    @hookimpl
    def barosync_validate_mutation(operation, event):
        ...

    @strategy("always_remote")
    def always_remote(conflict):
        return Resolution("keep")

Tests of a plugin: ``barosync.testing``.

See docs/plugins.md.
"""

__version__ = "0.1.0"

# Imported after __version__: the server imports it from here.
from .config import Config  # noqa: E402
from .hooks.plugin_types import Codec, Conflict, Resolution  # noqa: E402
from .hooks.hookspecs import hookimpl  # noqa: E402
from .domain.models import Event, Identity, Problem  # noqa: E402
from .hooks.conflicts import strategy  # noqa: E402
from .wire.protocol import ProtocolError  # noqa: E402

__all__ = [
    "__version__",
    "Codec",
    "Config",
    "Conflict",
    "Event",
    "Identity",
    "Problem",
    "ProtocolError",
    "Resolution",
    "hookimpl",
    "strategy",
]
