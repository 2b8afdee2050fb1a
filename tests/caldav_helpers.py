"""A barosync server as calendar apps meet it: a subprocess, app passwords from the
real CLI, and a small HTTP client that speaks Basic and shows every header."""

from __future__ import annotations

import base64
import http.client
import re
import subprocess
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

from attack_helpers import ServerProcess, barosync_cmd

DAV_NS = "{DAV:}"


def app_password(data_dir: Path, user: str, *projects: str, name: str = "test app") -> str:
    args = [a for p in projects for a in ("--project", p)] or ["--all-projects"]
    result = subprocess.run(barosync_cmd("token", "create", "--data", str(data_dir), "--user", user, *args,
                                         "--app-password", "--name", name), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return re.search(r"^password:\s+(\S+)$", result.stdout, re.M).group(1)  # type: ignore[union-attr]


def cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(barosync_cmd(*args, "--data", str(data_dir)), capture_output=True, text=True, timeout=60)


class Http:
    """One request per call, Basic auth, answers as (status, headers, body)."""

    def __init__(self, port: int, user: str | None = None, password: str | None = None, host: str = "127.0.0.1") -> None:
        self.port, self.host = port, host
        self.auth = None if user is None else "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def __call__(self, method: str, path: str, body: bytes | str = b"", **headers: str) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            sent = {k.replace("_", "-"): v for k, v in headers.items()}
            if self.auth:
                sent.setdefault("Authorization", self.auth)
            conn.request(method, path, body=body.encode() if isinstance(body, str) else body, headers=sent)
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()


def hrefs(body: bytes) -> list[str]:
    return [h.text or "" for h in ET.fromstring(body).iter(f"{DAV_NS}href")]


def sync_token_of(body: bytes) -> str:
    """The DAV:sync-token in a multistatus or a PROPFIND answer."""
    found = next(ET.fromstring(body).iter(f"{DAV_NS}sync-token"), None)
    assert found is not None and found.text, body
    return found.text


def privileges(element: ET.Element) -> set[str]:
    return {p.tag.split("}")[1] for priv in element.iter(f"{DAV_NS}privilege") for p in priv}


def responses(body: bytes) -> dict[str, ET.Element]:
    return {r.findtext(f"{DAV_NS}href"): r for r in ET.fromstring(body).findall(f"{DAV_NS}response")}


def event_ics(uid: str, summary: str, start: str = "20261207T090000Z", end: str = "20261207T100000Z",
              extra: str = "") -> str:
    return ("BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//test//caldav//EN\r\nBEGIN:VEVENT\r\n"
            f"UID:{uid}\r\nDTSTAMP:20261201T000000Z\r\nDTSTART:{start}\r\nDTEND:{end}\r\nSUMMARY:{summary}\r\n"
            f"{extra}END:VEVENT\r\nEND:VCALENDAR\r\n")


def start(data_dir: Path, **kw: Any) -> ServerProcess:
    return ServerProcess(data_dir, **kw)
