"""Debian's Chromium driven by Playwright, for the tests that need a real browser.

The ``chromium`` fixture is registered once, in conftest.py: one Playwright per test
session (its sync API cannot start twice in one process).
"""

from __future__ import annotations

import shutil
from typing import Any, Iterator

import pytest

CHROMIUM = "/usr/bin/chromium"
# As the machine's notes say: without these, Chromium spends its start reaching for
# Google's hosts, which this closed network refuses.
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    # Pages the tests serve through Playwright routes have no address; without this,
    # Chromium's local-network checks refuse their WebSockets to 127.0.0.1.
    "--disable-features=LocalNetworkAccessChecks",
]


def chromium() -> Iterator[Any]:
    """A launched Chromium (Playwright's sync API); skipped where it is missing."""
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"{CHROMIUM} is missing: `apt-get install chromium` (.ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra has it)")
    with sync_api.sync_playwright() as pw:
        # launch() gives every run a new, empty profile of its own.
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
