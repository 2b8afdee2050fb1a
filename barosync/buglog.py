"""Logging a bug that a request ran into, without letting requests flood the log.

A bug costs the request that found it a 500 (or an ``internal`` error envelope), and
the log one line naming the request and the exception. The traceback, which is what
a developer needs and what would let a client write 30 lines per request, is logged
for the first occurrence and then at most once per ``TRACEBACK_EVERY`` seconds.
"""

from __future__ import annotations

import logging
import time

TRACEBACK_EVERY = 60.0


class BugLog:
    def __init__(self, logger: logging.Logger, *, every: float = TRACEBACK_EVERY) -> None:
        self.logger = logger
        self.every = every
        self._last: float | None = None
        self.suppressed = 0

    def report(self, what: str, error: BaseException) -> None:
        """Log ``error`` (being handled now) met while doing ``what``."""
        now = time.monotonic()
        if self._last is None or now - self._last >= self.every:
            self._last = now
            extra = f" ({self.suppressed} more since the last traceback)" if self.suppressed else ""
            self.suppressed = 0
            self.logger.error("%s failed: %s: %s%s", what, type(error).__name__, _one_line(error), extra,
                              exc_info=error)
        else:
            self.suppressed += 1
            self.logger.error("%s failed: %s: %s (traceback logged at most once per %g s)", what,
                              type(error).__name__, _one_line(error), self.every)


def _one_line(error: BaseException) -> str:
    text = str(error).replace("\r", " ").replace("\n", " ")
    return text[:200] + ("…" if len(text) > 200 else "")
