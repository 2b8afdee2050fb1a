"""How soon the web calendar shows this week of a 10,000-event project, in Chromium.

    .venv/bin/python bench/web_paint.py [--events 10000] [--rounds 3]

A real `barosync serve` with one project of N events spread over two years (about
a hundred in the current week), seeded by the REST import; a sign-in link opened in
Debian's Chromium (Playwright). Three figures, each the median of ``--rounds``:

- first visit: from navigation to this week's events on the grid (the snapshot comes
  from the server: nothing is cached yet), and to "connected, all saved";
- a later visit (a reload): to this week's events on the grid, which come from the
  browser's own copy (IndexedDB) before the server answers, then live.

Speed is measured here, never by timed assertions in tests (tests/test_web_app.py
checks that a reload with no network shows the copy and the changes waiting).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from browser import CHROMIUM, CHROMIUM_ARGS  # noqa: E402
from test_web_client import Server  # noqa: E402

PROJECT = "big"


def ics(n: int) -> bytes:
    """N events over two years around now, the current week's days busy."""
    now = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    lines = ["BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//barosync//web paint bench//EN"]
    for i in range(n):
        start = now + timedelta(hours=(i * 7919) % (2 * 365 * 24) - 365 * 24)
        if i % 100 == 0:  # ~1% in this week, at working hours
            start = now - timedelta(days=now.weekday()) + timedelta(days=i % 5, hours=(i // 100) % 9 - now.hour + 8)
        lines += ["BEGIN:VEVENT", f"UID:bench-{i}", "DTSTAMP:20260101T000000Z",
                  f"DTSTART:{start:%Y%m%dT%H%M%SZ}", f"DTEND:{start + timedelta(minutes=45):%Y%m%dT%H%M%SZ}",
                  f"SUMMARY:Event {i}", "END:VEVENT"]
    lines.append("END:VCALENDAR")
    return "\r\n".join(lines).encode()


def seed(server: Server, n: int) -> None:
    t0 = time.perf_counter()
    request = urllib.request.Request(f"{server.url}/api/projects/{PROJECT}/import", data=ics(n), method="POST",
                                     headers={"Authorization": f"Bearer {server.token('seeder')}",
                                              "Content-Type": "text/calendar"})
    with urllib.request.urlopen(request, timeout=600) as response:
        assert response.status == 200, response.read()[:300]
    print(f"web_paint: seeded {n:,} events in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


PAINTED = "() => document.querySelectorAll('#calendar .fc-timegrid-event').length > 0"
SAVED = ("() => document.getElementById('connection').dataset.state === 'connected'"
         " && document.getElementById('sync').textContent.startsWith('all changes saved')")


def visit(page, link: str | None) -> tuple[float, float]:
    """(ms to the week's events, ms to connected and saved), from navigation start."""
    if link is None:
        page.reload(wait_until="commit")
    else:
        page.goto(link, wait_until="commit")
    page.wait_for_function(PAINTED, timeout=60_000, polling="raf")
    painted = page.evaluate("() => performance.now()")
    page.wait_for_function(SAVED, timeout=60_000, polling=50)
    saved = page.evaluate("() => performance.now()")
    return painted, saved


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    from playwright.sync_api import sync_playwright

    first: list[tuple[float, float]] = []
    again: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory(prefix="barosync-paint-") as tmp:
        server = Server(Path(tmp), server__http_rate_limit=1_000_000, server__http_rate_burst=1_000_000)
        try:
            seed(server, a.events)
            link = server.link("alice", "Alice", PROJECT)
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                for r in range(a.rounds):
                    context = browser.new_context(viewport={"width": 1280, "height": 900})  # nothing cached
                    page = context.new_page()
                    first.append(visit(page, link))
                    again.append(visit(page, None))
                    context.close()
                    print(f"web_paint: round {r + 1}: first visit {first[-1][0]:.0f} ms to the week, "
                          f"{first[-1][1]:.0f} ms to saved; reload {again[-1][0]:.0f} ms to the week",
                          file=sys.stderr, flush=True)
                browser.close()
        finally:
            server.proc.stop()
    med = lambda xs, i: statistics.median(x[i] for x in xs)  # noqa: E731
    print(f"{a.events:,} events, median of {a.rounds}: first visit {med(first, 0):.0f} ms to this week's events "
          f"({med(first, 1):.0f} ms to connected and saved); a reload {med(again, 0):.0f} ms to this week's events "
          f"({med(again, 1):.0f} ms to connected and saved)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
