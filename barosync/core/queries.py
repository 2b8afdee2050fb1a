"""The core's reads, for the transports (REST, CalDAV, the ICS feed, the inspector):
what a calendar, a project or the log holds now. Each is one store read off the event
loop where the store needs it (reads.py), so no transport names the store or knows
how its reads run; the store stays behind this and the writer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..storage.reads import find_event

if TYPE_CHECKING:
    from ..storage.reads import Reads
    from ..storage.roles import LogStore


class Queries:
    def __init__(self, store: "LogStore", read: "Reads") -> None:
        self._store = store
        self._read = read

    @property
    def history_id(self) -> str:
        """The log's id (``dataId``): a restored or new log has another, so positions
        (``since``, sync tokens) from the old one are not trusted."""
        return self._store.data_id

    @property
    def storage(self) -> str:
        """"lmdb" or "postgresql"."""
        return self._store.kind

    def map_usage(self) -> tuple[int, int] | None:
        """LMDB's map: bytes in use, and its size; None for PostgreSQL."""
        return self._store.map_usage() if self._store.kind == "lmdb" else None

    async def projects(self) -> list[tuple[str, int]]:
        """Every project with a change, and its head seq."""
        return list(await self._read(self._store.projects))

    async def head(self, project_id: str) -> int:
        return await self._read(self._store.current_seq, project_id)

    async def snapshot(self, project_id: str) -> tuple[int, list[dict[str, Any]]]:
        """The project's events now, and the seq they are as of."""
        return await self._read(self._store.snapshot, project_id)

    async def event(self, project_id: str, event_id: str) -> dict[str, Any] | None:
        return await self._read(self._store.get_event, project_id, event_id)

    async def events(self, project_id: str, event_ids: list[str | None]) -> list[dict[str, Any] | None]:
        """Several events of one project in one read (None for an id that is absent)."""
        return await self._read(_events, self._store, project_id, event_ids)

    async def find(self, project_id: str, event_id: str) -> tuple[bool, dict[str, Any] | None]:
        """Whether the project knows the id (live, or deleted within the history), and
        the event if it is live."""
        return await self._read(find_event, self._store, project_id, event_id)

    async def changes_after(self, project_id: str, since: int) -> tuple[list[bytes], bool] | None:
        """The change messages after ``since`` (None: the history cannot say)."""
        return await self._read(self._store.replay, project_id, since)

    async def log_view(self, rooms: set[str]) -> tuple[dict[str, int], dict[str, int | None]]:
        """Every project's head, and the oldest seq kept of each (and of ``rooms``)."""
        return await self._read(_log_view, self._store, rooms)


def _events(store: "LogStore", project_id: str, event_ids: list[str | None]) -> list[dict[str, Any] | None]:
    return [store.get_event(project_id, i) if i is not None else None for i in event_ids]


def _log_view(store: "LogStore", rooms: set[str]) -> tuple[dict[str, int], dict[str, int | None]]:
    heads = dict(store.projects())
    return heads, {p: store.first_kept_seq(p) for p in set(heads) | rooms}
