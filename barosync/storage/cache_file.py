"""A cache of bytes derived from stored data (CalDAV's rendered resources), kept in
memory and in an LMDB file of its own beside the data, so that what took time to
derive survives a restart.

It is a cache, never the data: each entry carries the version it was derived from
(an ETag) and is used only while that still matches; the file is written without
fsync, off the event loop, a batch at a time; and a file that cannot be opened or
fills up is emptied and started again. Deleting it loses nothing.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import lmdb
import trio

log = logging.getLogger(__name__)

# Entries kept in memory (the whole dict is dropped when it is reached: cheaper than
# tracking use, and the file still has them).
MEMORY_ENTRIES = 20_000
# How often new entries go to the file, and at most how many in one transaction.
FLUSH_SECONDS = 1.0
FLUSH_BATCH = 5_000
# The file's ceiling; reaching it empties the file (it fills again as entries are used).
MAP_SIZE = 512 * 1024 * 1024


class CacheFile:
    def __init__(self, path: Path | None, *, map_size: int = MAP_SIZE) -> None:
        self.path = path
        self.map_size = map_size
        self._memory: dict[bytes, tuple[bytes, bytes]] = {}
        self._pending: dict[bytes, bytes] = {}
        self._env: lmdb.Environment | None = self._open() if path is not None else None

    def _open(self) -> lmdb.Environment | None:
        assert self.path is not None
        for attempt in (1, 2):
            try:
                self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
                return lmdb.open(str(self.path), map_size=self.map_size, subdir=True, sync=False, metasync=False,
                                 max_dbs=0, readahead=False)
            except lmdb.Error as e:
                if attempt == 2:
                    log.warning("cache file %s cannot be used (%s): keeping the cache in memory only", self.path, e)
                    return None
                shutil.rmtree(self.path, ignore_errors=True)  # a cache: start it again
        return None

    def get(self, key: bytes, version: bytes) -> bytes | None:
        """What was derived from ``version`` of ``key``, if it is kept."""
        found = self._memory.get(key)
        if found is not None and found[0] == version:
            return found[1]
        if self._env is None:
            return None
        try:
            with self._env.begin(buffers=False) as txn:
                raw = txn.get(key)
        except lmdb.Error:
            return None
        if raw is None:
            return None
        stored_version, _, data = raw.partition(b"\n")
        if stored_version != version:
            return None
        self._remember(key, version, data)
        return data

    def put(self, key: bytes, version: bytes, data: bytes) -> None:
        assert b"\n" not in version
        self._remember(key, version, data)
        if self._env is not None:
            self._pending[key] = version + b"\n" + data

    def _remember(self, key: bytes, version: bytes, data: bytes) -> None:
        if len(self._memory) >= MEMORY_ENTRIES:
            self._memory.clear()
        self._memory[key] = (version, data)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Writes new entries to the file every FLUSH_SECONDS, until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(FLUSH_SECONDS)
            if self._pending:
                batch, self._pending = self._pending, {}
                await trio.to_thread.run_sync(self._write, batch)

    def _write(self, batch: dict[bytes, bytes]) -> None:
        env = self._env
        if env is None:
            return
        items = list(batch.items())
        try:
            for first in range(0, len(items), FLUSH_BATCH):
                with env.begin(write=True) as txn:
                    for key, value in items[first:first + FLUSH_BATCH]:
                        txn.put(key, value)
        except lmdb.MapFullError:
            with env.begin(write=True) as txn:
                txn.drop(env.open_db(), delete=False)  # full: start again, it refills as used
        except lmdb.Error as e:
            log.warning("cache file %s: a write failed (%s); entries stay in memory", self.path, e)

    def close(self) -> None:
        """Writes what is pending and closes the file."""
        if self._env is None:
            return
        batch, self._pending = self._pending, {}
        if batch:
            self._write(batch)
        self._env.close()
        self._env = None
