"""A bug met by requests costs one log line each and its traceback at most once per
interval (buglog.py), so a client that finds a bug cannot flood the log with it."""

from __future__ import annotations

import logging

import pytest

from barosync.buglog import BugLog


def fail(n: int) -> ValueError:
    try:
        raise ValueError(f"bug number {n}\nwith a second line a client could use to forge one")
    except ValueError as e:
        return e


def test_a_burst_logs_one_line_each_and_one_traceback(caplog: pytest.LogCaptureFixture) -> None:
    bugs = BugLog(logging.getLogger("test.buglog"), every=3600)
    with caplog.at_level(logging.ERROR, logger="test.buglog"):
        for n in range(5):
            bugs.report(f"GET '/x/{n}'", fail(n))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5 and all("\n" not in line for line in lines)
    assert [r.exc_info is not None for r in caplog.records] == [True, False, False, False, False]
    assert lines[0].startswith("GET '/x/0' failed: ValueError: bug number 0")
    assert "traceback logged at most once per 3600 s" in lines[1]


def test_the_next_traceback_after_the_interval_says_how_many_went_without(caplog: pytest.LogCaptureFixture) -> None:
    bugs = BugLog(logging.getLogger("test.buglog"), every=0.0)
    with caplog.at_level(logging.ERROR, logger="test.buglog"):
        bugs.report("first", fail(1))
        bugs.every = 3600
        bugs.report("second", fail(2))
        bugs.every = 0.0
        bugs.report("third", fail(3))
    assert [r.exc_info is not None for r in caplog.records] == [True, False, True]
    assert "(1 more since the last traceback)" in caplog.records[2].getMessage()
