"""Sign-in with the team's identity provider (transports/oidc.py) against a real
OpenID provider: panva's oidc-provider from npm (tests/oidc/provider.mjs), run by
Node.js. Chromium walks the whole flow, provider login page and consent included; the
HTTP tests check PKCE, the state cookie and a callback nobody started."""

from __future__ import annotations

import itertools
import json
import os
import select
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qs, urlsplit

import pytest

from barosync.transports.oidc import groups_access

from attack_helpers import barosync_cmd
from conftest import http_exchange, running
from test_web_app import App
from test_web_client import Server

NODE_MODULES = Path(os.environ.get("BAROSYNC_NODE_MODULES", ".venv/node/node_modules")).resolve()
SCRIPT = Path(__file__).resolve().parent / "oidc" / "provider.mjs"
SECRET = "a client secret only these tests know"
USERS = {"carol": {"name": "Carol Viewer", "email": "carol@example.com", "groups": ["barosync:team:viewer", "other"]},
         "olive": {"name": "Olive Owner", "groups": ["barosync:admin"]}}
_ids = itertools.count()

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("BAROSYNC_TEST_POSTGRES") or os.environ.get("BAROSYNC_TEST_CLUSTER")),
    reason="accounts live in the LMDB data directory")


class Provider:
    """oidc-provider in a Node.js subprocess on a free 127.0.0.1 port."""

    def __init__(self, tmp: Path) -> None:
        if shutil.which("node") is None or not (NODE_MODULES / "oidc-provider").is_dir():
            pytest.skip("node or oidc-provider is missing (`make test` installs it into .venv/node)")
        # Beside node_modules, so that `import "oidc-provider"` resolves.
        self.script = NODE_MODULES.parent / f"provider-{os.getpid()}-{next(_ids)}.mjs"
        shutil.copy(SCRIPT, self.script)
        self.log = (tmp / "provider.log").open("w")
        self.proc = subprocess.Popen(["node", str(self.script), SECRET, json.dumps(USERS)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.issuer = self._line()
        assert self.issuer.startswith("http://127.0.0.1:"), self.issuer

    def _line(self, timeout: float = 30) -> str:
        assert self.proc.stdout is not None
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise AssertionError(f"the OpenID provider said nothing in {timeout} s")
        return self.proc.stdout.readline().strip()

    def register(self, redirect_uri: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(redirect_uri + "\n")
        self.proc.stdin.flush()
        assert self._line() == "ready"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.log.close()
        self.script.unlink(missing_ok=True)


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[Provider]:
    p = Provider(tmp_path)
    yield p
    p.stop()


def oidc_config(provider: Provider) -> dict[str, Any]:
    return {"oidc_issuer": provider.issuer, "oidc_client_id": "barosync", "oidc_client_secret": SECRET,
            "oidc_name": "Test IdP", "oidc_scopes": ("openid", "profile", "email", "groups")}


def test_groups_give_roles_and_the_highest_wins() -> None:
    assert groups_access(["barosync:team:viewer", "barosync:team:editor", "barosync:ops:owner", "staff"], "barosync:") == (
        frozenset({"team", "ops"}), {"team": "editor", "ops": "owner"}, False)
    assert groups_access(["barosync:admin"], "barosync:") == ("*", {}, True)
    assert groups_access(["barosync:team:boss"], "barosync:") == (frozenset(), {}, False)  # no such role: nothing
    assert groups_access(["staff"], "barosync:") is None and groups_access("barosync:admin", "barosync:") is None


async def test_start_sends_to_the_provider_with_pkce_and_a_state_cookie(tmp_path: Path, provider: Provider) -> None:
    async with running(tmp_path, **oidc_config(provider)) as (app, _):
        provider.register("http://test/auth/oidc/callback")  # the Host header http_exchange sends
        status, _, providers = await http_exchange(app.port, "GET", "/auth/providers")
        assert status == 200 and providers["oidc"] == {"name": "Test IdP", "start": "/auth/oidc/start"}
        status, headers, _ = await http_exchange(app.port, "GET", "/auth/oidc/start")
        assert status == 302, headers.get("location")
        where = urlsplit(headers["location"])
        asked = {k: v[0] for k, v in parse_qs(where.query).items()}
        assert f"{where.scheme}://{where.netloc}" == provider.issuer
        assert asked["code_challenge_method"] == "S256" and len(asked["code_challenge"]) == 43
        assert asked["redirect_uri"] == "http://test/auth/oidc/callback" and asked["nonce"] and asked["state"]
        assert set(asked["scope"].split()) == {"openid", "profile", "email", "groups"}
        cookie = [f.strip() for f in headers["set-cookie"].split(";")]
        assert cookie[0] == f"barosync_oidc={asked['state']}" and {"HttpOnly", "SameSite=Lax"} <= set(cookie)
        # The provider's answer arriving in another browser (no state cookie), or a state
        # nobody started, is refused: no one can sign someone else in as themselves.
        for headers_sent in ({}, {"Cookie": "barosync_oidc=someone-elses"}):
            status, back, _ = await http_exchange(app.port, "GET", f"/auth/oidc/callback?code=x&state={asked['state']}",
                                                  headers=headers_sent)
            assert status == 303 and back["location"].startswith("/#signin-error=")
        status, back, _ = await http_exchange(app.port, "GET", "/auth/oidc/callback?error=access_denied&state=x")
        assert status == 303 and "access_denied" in back["location"]
        assert "set-cookie" not in back or "barosync_session" not in back["set-cookie"]


@pytest.mark.browser
def test_a_teammate_signs_in_with_the_provider_and_gets_the_role_of_their_group(chromium, tmp_path: Path,
                                                                                provider: Provider) -> None:

    server = Server(tmp_path, **{f"oidc__{k.removeprefix('oidc_')}": list(v) if isinstance(v, tuple) else v
                                 for k, v in oidc_config(provider).items()})
    try:
        provider.register(f"{server.url}/auth/oidc/callback")
        carol = App(chromium, server.url + "/")
        carol.page.wait_for_selector("#signin-oidc:not([hidden])")
        assert carol.text("#signin-oidc") == "Sign in with Test IdP"
        carol.shot("sign-in-with-a-provider")
        carol.page.click("#signin-oidc")
        carol.page.wait_for_url(f"{provider.issuer}/**")  # the provider's own login page
        carol.page.fill("input[name=login]", "carol")
        carol.page.fill("input[name=password]", "anything")
        carol.page.click("button[type=submit]")
        carol.page.click("button:has-text('Continue')")  # consent
        carol.wait_connected()
        assert carol.page.url == server.url + "/"  # no code, token or state left in the address
        assert "Carol Viewer (carol)" in carol.text("#who")
        assert carol.page.locator("#project").inner_text() == "team"
        carol.page.wait_for_selector("#read-only:not([hidden])")  # barosync:team:viewer
        assert carol.page.is_hidden("#new-event") and carol.errors == []
        listed = subprocess.run(barosync_cmd("user", "list", "--data", str(server.data)), capture_output=True,
                                text=True, timeout=60)
        assert listed.returncode == 0 and "carol" in listed.stdout, listed.stderr

        # Dave has no barosync group at the provider: an owner's invite brings him in.
        made = subprocess.run(barosync_cmd("user", "create", "owen", "--owner", "team", "--password-stdin", "--data",
                                           str(server.data)), input="owen's long password\n", capture_output=True,
                              text=True, timeout=60)
        assert made.returncode == 0, made.stderr
        cookie = post(server, "/auth/signin", {"user": "owen", "password": "owen's long password"})[1]
        link = post(server, "/auth/invites", {"project": "team", "role": "editor"}, cookie)[0]["link"]
        dave = App(chromium, server.url + link)
        dave.page.wait_for_selector("#setup-oidc:not([hidden])")
        assert dave.text("#setup-oidc") == "Join with Test IdP"
        dave.page.click("#setup-oidc")
        dave.page.wait_for_url(f"{provider.issuer}/**")
        dave.page.fill("input[name=login]", "dave")
        dave.page.fill("input[name=password]", "anything")
        dave.page.click("button[type=submit]")
        dave.page.click("button:has-text('Continue')")
        dave.wait_connected()
        assert dave.page.locator("#project").inner_text() == "team" and dave.page.is_visible("#new-event")
        assert dave.errors == []
    finally:
        server.stop()


def post(server: Server, path: str, body: Any, cookie: str | None = None) -> tuple[Any, str | None]:
    """A JSON POST to the server as a browser's script sends it: (answer, session cookie)."""
    headers = {"X-Barosync-Request": "1", "Content-Type": "application/json", **({"Cookie": cookie} if cookie else {})}
    request = urllib.request.Request(server.url + path, data=json.dumps(body).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        set_cookie = response.headers.get("Set-Cookie")
        return json.loads(response.read()), set_cookie.split(";", 1)[0] if set_cookie else None
