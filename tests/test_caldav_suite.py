"""python-caldav's own functional suite (tests/test_caldav.py of its pinned sdist, run
by its own pytest configuration) against a real `barosync serve` with an account:
nothing fails, and what it skips is scheduling, which docs/caldav.md says barosync
does not offer, or what needs servers this machine does not run. `make test`
prepares the suite in .venv/caldav-suite (a venv of its own: its pytest-asyncio
set-up is not this suite's pytest-trio)."""

from __future__ import annotations

import os
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from attack_helpers import barosync_cmd
from caldav_helpers import app_password, start

pytestmark = pytest.mark.slow

SUITE = Path(__file__).resolve().parent.parent / ".venv" / "caldav-suite"
PYTHON = SUITE / "venv" / "bin" / "python"
TESTS = SUITE / "caldav-3.6.0" / "tests" / "test_caldav.py"
USER = "testuser"
# The one allowance, in the suite's own compatibility-flag language.
FLAGS = "    features:\n      scheduling:\n        support: unsupported\n"
# Skips that are not barosync's: servers the suite embeds or starts itself, and
# tools it leaves out by default.
NOT_OURS = ("could not import 'xandikos'", "need both Xandikos and Radicale", "work in progress",
            "caldav_server_tester is not installed")
SCHEDULING = ("RFC6638", "calendar-user-address-set", "CalDAV Scheduling", "schedule-inbox")


def test_python_caldavs_functional_suite_passes_against_barosync(tmp_path: Path) -> None:
    if not (PYTHON.exists() and TESTS.exists()):
        pytest.fail(f"python-caldav's suite is not in {SUITE}: `make test` fetches it (the Makefile's "
                    "caldav-suite target)")
    server = start(tmp_path / "data")
    try:
        subprocess.run(barosync_cmd("user", "create", USER, "--admin", "--password-stdin", "--data",
                                    str(server.data_dir)), input="the caldav suite's account\n", text=True,
                       check=True, capture_output=True, timeout=60)
        password = app_password(server.data_dir, USER)
        # The suite reads tests/caldav_test_servers.yaml from where it runs.
        (tmp_path / "tests").mkdir()
        (tmp_path / "tests" / "caldav_test_servers.yaml").write_text(
            f"test-servers:\n  barosync:\n    type: external\n    enabled: true\n"
            f"    url: http://127.0.0.1:{server.port}/\n    username: {USER}\n    password: \"{password}\"\n{FLAGS}")
        report = tmp_path / "report.xml"
        env = {**os.environ, "PYTHON_CALDAV_TEST_EMBEDDED": "0", "PYTHON_CALDAV_TEST_DOCKER": "0",
               "HOME": str(tmp_path)}
        done = subprocess.run(
            [str(PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o",
             "asyncio_default_fixture_loop_scope=function",
             # testPrincipals calls the suite's own deprecated principals(), whose warning
             # its configuration makes an error on every server that answers the search.
             "-W", "default:principals() is deprecated:DeprecationWarning",
             str(TESTS), f"--junitxml={report}"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    finally:
        server.stop()
    assert report.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    failed, skipped, passed = [], [], 0
    for case in ET.parse(report).iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skip = case.find("skipped")
        if bad is not None:
            failed.append(f"{case.get('name')}: {(bad.get('message') or '')[:300]}")
        elif skip is not None:
            skipped.append(f"{case.get('name')}: {skip.get('message') or ''}")
        else:
            passed += 1
    assert failed == [], "\n".join(failed)
    unexplained = [s for s in skipped if not any(k in s for k in NOT_OURS + SCHEDULING)]
    assert unexplained == [], "\n".join(unexplained)
    assert passed >= 70, done.stdout[-2000:]
