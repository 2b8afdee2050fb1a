"""storage/cache_file.py: derived bytes kept by key and version, in memory and in an
LMDB file that survives a restart and is started again when it cannot be used."""

from __future__ import annotations

import sys
from pathlib import Path

import trio

from barosync.storage.cache_file import CacheFile


def test_an_entry_is_used_only_for_its_version_and_survives_a_reopen(tmp_path: Path) -> None:
    cache = CacheFile(tmp_path / "cache")
    cache.put(b"p\0e1", b'"1-10"', b"BEGIN:VCALENDAR...")
    assert cache.get(b"p\0e1", b'"1-10"') == b"BEGIN:VCALENDAR..."
    assert cache.get(b"p\0e1", b'"2-20"') is None  # a newer version: derive it again
    cache.close()
    again = CacheFile(tmp_path / "cache")
    assert again.get(b"p\0e1", b'"1-10"') == b"BEGIN:VCALENDAR..."
    assert again.get(b"p\0e2", b'"1-10"') is None
    again.close()


def test_an_unreadable_file_is_started_again_and_a_full_one_emptied(tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "data.mdb").write_bytes(b"not an LMDB file" * 1000)
    cache = CacheFile(tmp_path / "cache", map_size=64 * 1024)
    assert cache.get(b"k", b"v") is None
    for i in range(100):
        cache.put(f"k{i}".encode(), b"v", b"x" * 2000)  # 200 KB into a 64 KB file
    cache.close()
    reopened = CacheFile(tmp_path / "cache", map_size=64 * 1024)
    assert reopened.get(b"k0", b"v") is None  # emptied when full, and still usable
    reopened.put(b"k", b"v", b"small")
    reopened.close()
    assert CacheFile(tmp_path / "cache", map_size=64 * 1024).get(b"k", b"v") == b"small"


async def test_new_entries_reach_the_file_in_the_background(tmp_path: Path) -> None:
    cache = CacheFile(tmp_path / "cache")
    read = ("import lmdb, sys; env = lmdb.open(sys.argv[1], readonly=True, lock=False); "
            "print(env.begin().get(b'k'))")
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        cache.put(b"k", b"v1", b"data")
        with trio.fail_after(10):  # another process sees it, with no close()
            while True:
                done = await trio.run_process([sys.executable, "-c", read, str(tmp_path / "cache")],
                                              capture_stdout=True)
                if done.stdout.strip() == b"b'v1\\ndata'":
                    break
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    cache.close()
