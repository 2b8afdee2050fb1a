"""python-caldav's own functional test suite against barosync and Radicale, in one run.

    .venv/bin/python bench/caldav_suite.py --suite DIR [--radicale PYTHON] [--keep]

``--suite`` is an unpacked python-caldav sdist (``pip download --no-binary :all:
--no-deps caldav==3.6.0``; its ``tests/`` is what runs). ``--radicale`` is a Python
with Radicale, the caldav library, pytest and PyYAML installed (a venv of its own:
``python3 -m venv V && V/bin/pip install radicale caldav pytest pyyaml``); the suite
runs with that Python against both servers, each configured as an external server
with no flags, so neither gets the suite's server-specific allowances.

Prints passed / failed / skipped for each server side by side, then every test that
failed against barosync with the first line of its error, so each can be named with
its cause. Nothing here runs in `make test`: it needs the sdist and Radicale.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
USER = "testuser"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"caldav_suite: {what} did not listen on {port} within {timeout:g} s")


def start_radicale(python: str, work: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    config = work / "radicale.conf"
    config.write_text(f"[server]\nhosts = 127.0.0.1:{port}\n[auth]\ntype = none\n"
                      f"[storage]\nfilesystem_folder = {work / 'radicale-data'}\n")
    proc = subprocess.Popen([python, "-m", "radicale", "--config", str(config)], stdout=subprocess.DEVNULL,
                            stderr=open(work / "radicale.log", "wb"))
    wait_listening(port, "Radicale")
    return proc, port


def start_barosync(work: Path) -> tuple[subprocess.Popen[bytes], int, str]:
    data = work / "barosync-data"
    barosync = [sys.executable, "-m", "barosync"]
    # An account, as a team's people have: it makes, renames and deletes calendars.
    subprocess.run([*barosync, "user", "create", USER, "--admin", "--password-stdin", "--data", str(data)],
                   input="the caldav suite's account\n", capture_output=True, text=True, check=True)
    made = subprocess.run([*barosync, "token", "create", "--data", str(data), "--user", USER, "--all-projects",
                           "--app-password", "--name", "caldav suite"], capture_output=True, text=True, check=True)
    password = re.search(r"^password:\s+(\S+)$", made.stdout, re.M).group(1)  # type: ignore[union-attr]
    proc = subprocess.Popen([*barosync, "serve", "--port", "0", "--data", str(data), "--no-browser-link"],
                            stdout=subprocess.PIPE, stderr=open(work / "barosync.log", "wb"))
    line = proc.stdout.readline().decode()  # type: ignore[union-attr]
    port = int(line.rsplit(":", 1)[1])
    return proc, port, password


# What docs/caldav.md says barosync does not offer, told to the suite as its own
# compatibility flags: scheduling (RFC 6638) only.
BAROSYNC_FLAGS = "    features:\n      scheduling:\n        support: unsupported\n"
# testPrincipals calls python-caldav's own deprecated principals(), whose warning the
# suite turns into an error: it fails on every server that answers a principal search.
WARNINGS = ["-W", "default:principals() is deprecated:DeprecationWarning"]


def run_suite(python: str, suite: Path, name: str, url: str, password: str, work: Path, *, flags: str = "") -> Path:
    config = suite / "tests" / "caldav_test_servers.yaml"
    config.write_text(f"test-servers:\n  {name}:\n    type: external\n    enabled: true\n    url: {url}\n"
                      f"    username: {USER}\n    password: \"{password}\"\n{flags}")
    report = work / f"{name}.xml"
    env = {**os.environ, "PYTHON_CALDAV_TEST_EMBEDDED": "0", "PYTHON_CALDAV_TEST_DOCKER": "0"}
    print(f"caldav_suite: running tests/test_caldav.py against {name} ({url}) ...", flush=True)
    subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o",
                    "asyncio_default_fixture_loop_scope=function", *WARNINGS, "tests/test_caldav.py",
                    f"--junitxml={report}"], cwd=suite, env=env, stdout=open(work / f"{name}.out", "wb"),
                   stderr=subprocess.STDOUT, timeout=3600)
    config.unlink()
    return report


def results(report: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures = []
    for case in ET.parse(report).iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            counts["failed"] += 1
            message = (bad.get("message") or bad.text or "").strip().splitlines()
            failures.append((case.get("name", "?"), message[0][:160] if message else ""))
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", required=True, type=Path, help="an unpacked python-caldav sdist")
    parser.add_argument("--radicale", default=sys.executable, help="a Python with radicale, caldav, pytest, pyyaml")
    parser.add_argument("--no-radicale", action="store_true", help="run against barosync only (while mending)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, reports)")
    args = parser.parse_args()
    if not (args.suite / "tests" / "test_caldav.py").exists():
        sys.exit(f"caldav_suite: {args.suite} has no tests/test_caldav.py: unpack python-caldav's sdist there")
    work = Path(tempfile.mkdtemp(prefix="caldav-suite-"))
    servers = [] if args.no_radicale else [start_radicale(args.radicale, work)]
    barosync, bport, password = start_barosync(work)
    servers.append((barosync, bport))
    try:
        reports = {}
        if not args.no_radicale:
            reports["radicale"] = run_suite(args.radicale, args.suite, "radicale-peer",
                                            f"http://127.0.0.1:{servers[0][1]}/", "", work)
        reports["barosync"] = run_suite(args.radicale, args.suite, "barosync", f"http://127.0.0.1:{bport}/",
                                        password, work, flags=BAROSYNC_FLAGS)
    finally:
        for proc, _ in servers:
            proc.terminate()
            proc.wait(timeout=30)
    found = {name: results(path) for name, path in reports.items()}
    print(f"\n{'server':<10} {'passed':>7} {'failed':>7} {'skipped':>8}")
    for name, (counts, _) in found.items():
        print(f"{name:<10} {counts['passed']:>7} {counts['failed']:>7} {counts['skipped']:>8}")
    radicale_failed = {n for n, _ in found["radicale"][1]} if "radicale" in found else set()
    print("\nfailed against barosync (* also against Radicale):")
    for test, message in found["barosync"][1]:
        print(f"  {'*' if test in radicale_failed else ' '} {test}: {message}")
    if args.keep:
        print(f"\nlogs and reports in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
