"""People's accounts (storage/accounts.py) and signing in over HTTP
(transports/signin.py): argon2id passwords, the session cookie and its flags, CSRF,
rate-limited guessing, tokens minted from a session, and a signed-out session's
connections closing within a second. Real LMDB, a real server on 127.0.0.1."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from barosync.core.app import open_log
from barosync.config import Config
from barosync.hooks.auth import create_token
from barosync.storage.accounts import AccountError, Accounts
from barosync.transports.signin import ACCESS_TTL

from conftest import http_exchange, running, ws_url

PASSWORD = "correct horse battery staple"
CSRF = {"X-Barosync-Request": "1"}


@pytest.fixture
def accounts(tmp_path: Path) -> Any:
    store = open_log(Config(data_dir=tmp_path / "data"))
    try:
        yield Accounts(store.tables(Accounts.TABLES))
    finally:
        store.close()


def test_a_password_is_kept_as_an_argon2id_hash_and_checked(accounts: Accounts) -> None:
    accounts.create("alice", name="Alice", password=PASSWORD, projects=["team"], roles={"ops": "viewer"})
    with accounts.tables.read() as txn:
        stored = txn.get("users", b"alice") or b""
    assert PASSWORD.encode() not in stored and b"$argon2id$" in stored
    assert accounts.verify("alice", PASSWORD).name == "Alice"  # type: ignore[union-attr]
    assert accounts.verify("alice", "wrong password") is None
    assert accounts.verify("nobody", PASSWORD) is None
    with pytest.raises(AccountError, match="exists already"):
        accounts.create("alice", name=None, password=PASSWORD, projects=["team"])
    with pytest.raises(AccountError, match="8 to 1024 characters"):
        accounts.create("bob", name=None, password="short", projects=["team"])


def test_disabling_or_a_new_password_signs_out_everywhere(accounts: Accounts) -> None:
    accounts.create("alice", name=None, password=PASSWORD, projects=["team"])
    phone, _ = accounts.open_session("alice", device="phone")
    laptop, signin = accounts.open_session("alice", device="laptop")
    assert accounts.session_live(signin.id, "alice")
    accounts.set_password("alice", "another good password")
    assert accounts.session(phone) is None and accounts.session(laptop) is None
    assert accounts.verify("alice", PASSWORD) is None and accounts.verify("alice", "another good password")
    _, again = accounts.open_session("alice", device="laptop")
    accounts.set_disabled("alice", True)
    assert not accounts.session_live(again.id, "alice") and accounts.verify("alice", "another good password") is None


def test_a_provider_user_gets_an_account_of_their_own_linked_to_their_subject(accounts: Accounts) -> None:
    accounts.create("carol", name="Carol (password)", password=PASSWORD, projects=["team"])
    first = accounts.federated("https://idp", "s-1", wanted_id="carol", name="Carol", access=None)
    assert first.id == "carol-2" and first.projects == frozenset()  # never the existing account
    assert accounts.verify("carol-2", PASSWORD) is None  # no password: only the provider signs it in
    accounts.set_role("carol-2", "team", "viewer")  # an owner adds her in the app
    again = accounts.federated("https://idp", "s-1", wanted_id="carol.renamed", name="Carol R", access=None)
    assert again.id == "carol-2" and again.name == "Carol R" and again.role("team") == "viewer"  # kept
    ruled = accounts.federated("https://idp", "s-1", wanted_id="carol", name="Carol R",
                               access=(frozenset({"ops"}), {"ops": "owner"}, False))
    assert ruled.role("ops") == "owner" and ruled.role("team") is None  # the provider's groups decide
    assert accounts.federated("https://other-idp", "s-1", wanted_id="carol", name="C", access=None).id == "carol-3"


async def sign_in(port: int, user: str = "alice", password: str = PASSWORD, **headers: str) -> tuple[int, dict[str, str], Any]:
    return await http_exchange(port, "POST", "/auth/signin", {"user": user, "password": password},
                               headers={**CSRF, **headers})


def cookie_of(headers: dict[str, str]) -> str:
    return headers["set-cookie"].split(";", 1)[0]


async def mint(port: int, cookie: str) -> str:
    status, headers, answer = await http_exchange(port, "POST", "/auth/token", headers={**CSRF, "Cookie": cookie})
    assert status == 200 and headers["cache-control"] == "no-store", answer
    return answer["token"]


async def test_sign_in_sets_a_private_cookie_and_mints_short_tokens(tmp_path: Path) -> None:
    async with running(tmp_path) as (app, _):
        app.accounts.create("alice", name="Alice", password=PASSWORD, projects=["p1"])
        status, headers, answer = await sign_in(app.port)
        assert status == 200 and answer == {"user": {"id": "alice", "name": "Alice"}}
        flags = [f.strip() for f in headers["set-cookie"].split(";")]
        assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= set(flags) and "Secure" not in flags
        status, headers, _ = await sign_in(app.port, **{"X-Forwarded-Proto": "https"})
        assert "Secure" in headers["set-cookie"]
        token = await mint(app.port, cookie_of(headers))
        identity = await app.authenticate(token)
        assert identity is not None and identity.user_id == "alice" and identity.session_id
        assert identity.expires_at is not None and 0 < identity.expires_at - time.time() <= ACCESS_TTL + 1
        status, _, me = await http_exchange(app.port, "GET", "/auth/me", headers={"Cookie": cookie_of(headers)})
        assert status == 200 and me["user"]["id"] == "alice"


async def test_wrong_password_and_unknown_user_get_the_same_answer(tmp_path: Path) -> None:
    async with running(tmp_path) as (app, _):
        app.accounts.create("alice", name=None, password=PASSWORD, projects=["p1"])
        wrong = await sign_in(app.port, "alice", "not the password")
        unknown = await sign_in(app.port, "mallory", "not the password")
        assert wrong[0] == unknown[0] == 401 and wrong[2] == unknown[2]
        assert "set-cookie" not in wrong[1]


async def test_requests_without_the_csrf_header_or_from_another_origin_are_refused(tmp_path: Path) -> None:
    async with running(tmp_path) as (app, _):
        app.accounts.create("alice", name=None, password=PASSWORD, projects=["p1"])
        _, headers, _ = await sign_in(app.port)
        cookie = cookie_of(headers)
        status, _, answer = await http_exchange(app.port, "POST", "/auth/token", headers={"Cookie": cookie})
        assert status == 403 and answer["error"] == "csrf"
        status, _, answer = await http_exchange(app.port, "POST", "/auth/token",
                                                headers={**CSRF, "Cookie": cookie, "Origin": "https://evil.example"})
        assert status == 403 and answer["error"] == "csrf"
        status, _, _ = await http_exchange(app.port, "POST", "/auth/token", headers={**CSRF, "Origin": "http://test",
                                                                                    "Cookie": cookie})
        assert status == 200  # this server's own page
        status, _, _ = await http_exchange(app.port, "POST", "/auth/signin", {"user": "alice", "password": PASSWORD})
        assert status == 403


async def test_guessing_is_rate_limited_per_account_and_per_address(tmp_path: Path) -> None:
    async with running(tmp_path) as (app, _):
        app.accounts.create("alice", name=None, password=PASSWORD, projects=["p1"])
        app.accounts.create("bob", name=None, password=PASSWORD, projects=["p1"])
        for _ in range(5):
            assert (await sign_in(app.port, "alice", "guess"))[0] == 401
        status, headers, answer = await sign_in(app.port, "alice", PASSWORD)  # even the right one, for now
        assert status == 429 and int(headers["retry-after"]) > 0 and "alice" in answer["message"]
        assert (await sign_in(app.port, "bob", PASSWORD))[0] == 200  # another account is not locked out
        for n in range(15):
            await sign_in(app.port, f"nobody{n}", "guess")
        status, _, answer = await sign_in(app.port, "bob", PASSWORD)
        assert status == 429 and "this address" in answer["message"]


async def test_signing_out_closes_the_sessions_connections_within_a_second(tmp_path: Path) -> None:
    async with running(tmp_path) as (app, _):
        app.accounts.create("alice", name=None, password=PASSWORD, projects=["p1"])
        _, phone_headers, _ = await sign_in(app.port, **{"User-Agent": "phone"})
        _, laptop_headers, _ = await sign_in(app.port, **{"User-Agent": "laptop"})
        phone_token = await mint(app.port, cookie_of(phone_headers))
        laptop_token = await mint(app.port, cookie_of(laptop_headers))
        status, _, listed = await http_exchange(app.port, "GET", "/auth/sessions",
                                                headers={"Cookie": cookie_of(laptop_headers)})
        assert status == 200 and sorted(s["device"] for s in listed["sessions"]) == ["laptop", "phone"]
        async with open_websocket_url(ws_url(app, phone_token)) as phone, \
                open_websocket_url(ws_url(app, laptop_token)) as laptop:
            await phone.get_message()
            await laptop.get_message()
            [phone_session] = [s for s in listed["sessions"] if s["device"] == "phone"]
            status, _, _ = await http_exchange(app.port, "DELETE", f"/auth/sessions/{phone_session['id']}",
                                               headers={**CSRF, "Cookie": cookie_of(laptop_headers)})
            assert status == 200
            with trio.fail_after(1.5):  # SIGNED_OUT_CHECK is 0.5 s
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        await phone.get_message()
            assert closed.value.reason.code == 4001  # the token is no good: sign in again
            await laptop.send_message('{"type": "ping", "id": "still-here"}')
            assert "pong" in await laptop.get_message()
        with pytest.raises(ConnectionRejected):
            async with open_websocket_url(ws_url(app, phone_token)):
                pass
        status, _, _ = await http_exchange(app.port, "POST", "/auth/token", headers={**CSRF, "Cookie": cookie_of(phone_headers)})
        assert status == 401


async def test_a_disabled_user_is_out_within_a_second_and_a_session_survives_a_restart(tmp_path: Path) -> None:
    async with running(tmp_path) as (app, _):
        app.accounts.create("alice", name=None, password=PASSWORD, projects=["p1"])
        app.accounts.create("bob", name=None, password=PASSWORD, projects=["p1"])
        _, alice_headers, _ = await sign_in(app.port, "alice")
        _, bob_headers, _ = await sign_in(app.port, "bob")
        async with open_websocket_url(ws_url(app, await mint(app.port, cookie_of(bob_headers)))) as bob:
            await bob.get_message()
            # As `barosync user disable bob` does, from another process.
            await trio.to_thread.run_sync(app.accounts.set_disabled, "bob", True)
            with trio.fail_after(1.5):
                with pytest.raises(ConnectionClosed):
                    while True:
                        await bob.get_message()
    async with running(tmp_path) as (app, _):  # the next start: the cookie still signs alice in
        assert await app.authenticate(await mint(app.port, cookie_of(alice_headers))) is not None
        status, _, _ = await http_exchange(app.port, "POST", "/auth/token", headers={**CSRF, "Cookie": cookie_of(bob_headers)})
        assert status == 401


def test_accounts_and_sessions_go_with_a_backup_and_are_checked(tmp_path: Path, capsys: Any) -> None:
    from barosync.storage import ops

    data = tmp_path / "data"
    store = open_log(Config(data_dir=data))
    try:
        accounts = Accounts(store.tables(Accounts.TABLES))
        accounts.create("alice", name="Alice", password=PASSWORD, projects=["team"])
        secret, _ = accounts.open_session("alice", device="laptop")
    finally:
        store.close()
    assert ops.backup(data, tmp_path / "backup") == 0
    assert ops.restore(tmp_path / "backup", tmp_path / "restored") == 0
    store = open_log(Config(data_dir=tmp_path / "restored"))
    try:
        restored = Accounts(store.tables(Accounts.TABLES))
        assert restored.verify("alice", PASSWORD) is not None
        assert restored.session(secret) is not None  # the same people, the same sessions
        with restored.tables.write() as txn:  # a session whose user is gone: check says so
            txn.put("signins", b"stray", b'{"id": "stray", "user": "nobody", "device": "d", "created": 1, "lastUsed": 1}')
    finally:
        store.close()
    assert ops.check(tmp_path / "backup") == 0 and "1 accounts: ok" in capsys.readouterr().out
    assert ops.check(tmp_path / "restored") == 1
    assert "accounts: signin b'stray' belongs to no user" in capsys.readouterr().out


async def test_the_setup_code_names_one_owner_and_only_with_the_right_code(tmp_path: Path) -> None:
    async with running(tmp_path) as (app, _):
        code = app.setup_code
        assert code
        body = {"user": "olive", "name": "Olive", "password": PASSWORD}
        status, _, answer = await http_exchange(app.port, "POST", "/auth/setup", {**body, "code": "guess"},
                                                headers=CSRF)
        assert status == 403 and answer["error"] == "setup_done"
        status, _, answer = await http_exchange(app.port, "POST", "/auth/setup", {**body, "code": code, "password": "x"},
                                                headers=CSRF)
        assert status == 400 and "8 to 1024" in answer["message"] and app.setup_code == code  # still usable
        status, headers, answer = await http_exchange(app.port, "POST", "/auth/setup", {**body, "code": code},
                                                      headers=CSRF)
        assert status == 200 and answer["user"]["id"] == "olive" and app.setup_code is None
        identity = await app.authenticate(await mint(app.port, cookie_of(headers)))
        assert identity is not None and identity.admin and identity.projects == "*"
        status, _, _ = await http_exchange(app.port, "POST", "/auth/setup", {**body, "user": "mallory", "code": code},
                                           headers=CSRF)
        assert status == 403
    async with running(tmp_path) as (app, _):
        assert app.setup_code is None  # an account exists: no setup link at the next start


async def test_removing_a_project_or_lowering_a_role_takes_effect_within_a_second(tmp_path: Path) -> None:
    async with running(tmp_path) as (app, _):
        app.accounts.create("bob", name="Bob", password=PASSWORD, projects=["p1", "p2"])
        _, headers, _ = await sign_in(app.port, "bob")
        async with open_websocket_url(ws_url(app, await mint(app.port, cookie_of(headers)))) as bob:
            await bob.get_message()
            # As `barosync user access bob --viewer p1` does, from another process.
            await trio.to_thread.run_sync(lambda: app.accounts.set_access("bob", projects=["p1"], roles={"p1": "viewer"}))
            with trio.fail_after(1.5):
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        await bob.get_message()
            assert closed.value.reason.code == 4001
        fresh = await mint(app.port, cookie_of(headers))  # what a reconnecting client gets now
        identity = await app.authenticate(fresh)
        assert identity is not None and not identity.may_access("p2") and identity.role("p1") == "viewer"
        async with open_websocket_url(ws_url(app, fresh)) as bob:
            await bob.get_message()
            await bob.send_message('{"type": "subscribe", "id": "s2", "payload": {"projectId": "p2"}}')
            with trio.fail_after(5):
                while '"forbidden"' not in (answer := await bob.get_message()):
                    pass
            assert '"s2"' in answer


def test_the_user_commands_make_list_change_and_disable_accounts(tmp_path: Path) -> None:
    import subprocess

    from attack_helpers import barosync_cmd

    data = str(tmp_path / "data")

    def user(*args: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(barosync_cmd("user", *args, "--data", data), input=password, capture_output=True,
                              text=True, timeout=60)

    made = user("create", "carol", "--name", "Carol", "--viewer", "team", "--password-stdin", password=PASSWORD + "\n")
    assert made.returncode == 0, made.stderr
    assert user("create", "carol", "--project", "x", "--password-stdin", password=PASSWORD + "\n").returncode == 2
    short = user("create", "dave", "--project", "x", "--password-stdin", password="short\n")
    assert short.returncode == 2 and "8 to 1024 characters" in short.stderr
    assert "no terminal" in user("create", "erin", "--project", "x").stderr  # stdin is not a terminal here
    assert "projects: team (viewer); 0 signed-in session(s)" in user("list").stdout
    changed = user("access", "carol", "--project", "team", "--viewer", "ops")
    assert changed.returncode == 0 and "ops, team" in user("list").stdout.replace("ops (viewer)", "ops")
    assert user("disable", "carol").returncode == 0 and "disabled" in user("list").stdout
    assert user("enable", "carol").returncode == 0
    reset = user("reset-password", "carol", "--password-stdin", password="a brand new password\n")
    assert reset.returncode == 0 and "signed out everywhere" in reset.stdout
    missing = user("disable", "nobody")
    assert missing.returncode == 2 and "no user 'nobody'" in missing.stderr
    # The team's owner without a browser, and a project's owner.
    assert user("create", "olive", "--admin", "--password-stdin", password=PASSWORD + "\n").returncode == 0
    assert user("create", "owen", "--owner", "team", "--password-stdin", password=PASSWORD + "\n").returncode == 0
    store = open_log(Config(data_dir=tmp_path / "data"))
    try:
        made = Accounts(store.tables(Accounts.TABLES))
        olive, owen = made.get("olive"), made.get("owen")
        assert olive is not None and olive.admin and olive.projects == "*" and olive.may_invite("any")
        assert owen is not None and owen.role("team") == "owner" and not owen.may_invite("ops")
    finally:
        store.close()
    assert "(the team's owner)" in user("list").stdout


async def test_invites_are_for_owners_good_once_and_add_a_project_to_an_existing_account(tmp_path: Path) -> None:
    async with running(tmp_path) as (app, _):
        app.accounts.create("olive", name="Olive", password=PASSWORD, projects="*", admin=True)
        app.accounts.create("bob", name="Bob", password=PASSWORD, projects=["p1"])
        _, olive, _ = await sign_in(app.port, "olive")
        _, bob, _ = await sign_in(app.port, "bob")
        status, _, answer = await http_exchange(app.port, "POST", "/auth/invites", {"project": "p2", "role": "viewer"},
                                                headers={**CSRF, "Cookie": cookie_of(bob)})
        assert status == 403  # bob owns nothing
        status, _, invite = await http_exchange(app.port, "POST", "/auth/invites", {"project": "p2", "role": "viewer"},
                                                headers={**CSRF, "Cookie": cookie_of(olive)})
        assert status == 200 and invite["link"] == f"/#invite={invite['code']}"
        status, _, answer = await http_exchange(app.port, "POST", "/auth/invites", {"project": "p2", "role": "boss"},
                                                headers={**CSRF, "Cookie": cookie_of(olive)})
        assert status == 400 and "one of viewer, editor, owner" in answer["message"]
        # An existing user joins with their own password: the project is added to theirs.
        accept = {"code": invite["code"], "user": "bob", "password": "not bobs"}
        status, _, answer = await http_exchange(app.port, "POST", "/auth/accept", accept, headers=CSRF)
        assert status == 400 and "is taken" in answer["message"]
        status, headers, _ = await http_exchange(app.port, "POST", "/auth/accept", {**accept, "password": PASSWORD},
                                                 headers=CSRF)
        assert status == 200
        identity = await app.authenticate(await mint(app.port, cookie_of(headers)))
        assert identity is not None and identity.role("p1") == "editor" and identity.role("p2") == "viewer"
        status, _, answer = await http_exchange(app.port, "POST", "/auth/accept",
                                                {**accept, "user": "erin", "password": PASSWORD}, headers=CSRF)
        assert status == 400 and "used already" in answer["message"]


def test_an_invite_expires(accounts: Accounts) -> None:
    code, expires = accounts.invite("team", "editor", by="olive", now=1000.0)
    assert expires == 1000 + 7 * 24 * 3600
    with pytest.raises(AccountError, match="expired"):
        accounts.accept(code, "late", name=None, password=PASSWORD, now=expires + 1.0)
    assert accounts.accept(code, "early", name=None, password=PASSWORD, now=expires - 1.0).projects == {"team"}


async def test_a_user_makes_their_own_app_password_and_it_follows_their_account(tmp_path: Path) -> None:
    import base64

    async with running(tmp_path) as (app, _):
        app.accounts.create("bob", name="Bob", password=PASSWORD, projects=["team", "ops"], roles={"ops": "viewer"})
        _, headers, _ = await sign_in(app.port, "bob")
        cookie = {"Cookie": cookie_of(headers)}
        status, _, made = await http_exchange(app.port, "POST", "/auth/app-passwords", {"name": "Bob's phone"},
                                              headers={**CSRF, **cookie})
        assert status == 200 and made["user"] == "bob" and made["password"].startswith("bsp_")
        status, _, listed = await http_exchange(app.port, "GET", "/auth/app-passwords", headers=cookie)
        assert [e["name"] for e in listed["appPasswords"]] == ["Bob's phone"] and "password" not in listed["appPasswords"][0]
        basic = {"Authorization": "Basic " + base64.b64encode(f"bob:{made['password']}".encode()).decode(),
                 "Depth": "1", "Content-Type": "application/xml"}

        async def calendars() -> tuple[int, bytes]:
            status, _, body = await http_exchange(app.port, "PROPFIND", "/dav/calendars/bob/", b"", headers=basic)
            return status, body if isinstance(body, bytes) else str(body).encode()

        status, body = await calendars()
        assert status == 207 and b"/dav/calendars/bob/team/" in body and b"/dav/calendars/bob/ops/" in body
        await trio.to_thread.run_sync(lambda: app.accounts.set_access("bob", projects=["team"]))
        status, body = await calendars()
        assert status == 207 and b"/ops/" not in body  # the app password opens what the account may open now
        await trio.to_thread.run_sync(app.accounts.set_disabled, "bob", True)
        assert (await calendars())[0] == 401
        await trio.to_thread.run_sync(app.accounts.set_disabled, "bob", False)
        _, headers, _ = await sign_in(app.port, "bob")
        cookie = {"Cookie": cookie_of(headers)}
        status, _, _ = await http_exchange(app.port, "DELETE", f"/auth/app-passwords/{made['id']}",
                                           headers={**CSRF, **cookie})
        assert status == 200 and (await calendars())[0] == 401
        status, _, feed = await http_exchange(app.port, "POST", "/auth/feeds", {"project": "team"},
                                              headers={**CSRF, **cookie})
        assert status == 200 and feed["url"].startswith("/ics/team.ics?token=")
        status, _, _ = await http_exchange(app.port, "GET", feed["url"])
        assert status == 200
        status, _, _ = await http_exchange(app.port, "POST", "/auth/feeds", {"project": "ops"}, headers={**CSRF, **cookie})
        assert status == 403


async def test_feeds_are_listed_revoked_and_follow_the_account(tmp_path: Path) -> None:
    async with running(tmp_path) as (app, _):
        app.accounts.create("bob", name="Bob", password=PASSWORD, projects=["team", "ops"])
        _, headers, _ = await sign_in(app.port, "bob")
        cookie = {"Cookie": cookie_of(headers)}
        feeds = {}
        for project in ("team", "ops"):
            status, _, feeds[project] = await http_exchange(app.port, "POST", "/auth/feeds", {"project": project},
                                                            headers={**CSRF, **cookie})
            assert status == 200 and (await http_exchange(app.port, "GET", feeds[project]["url"]))[0] == 200
        status, _, listed = await http_exchange(app.port, "GET", "/auth/feeds", headers=cookie)
        assert status == 200 and {(f["id"], f["project"]) for f in listed["feeds"]} == {
            (feeds["team"]["id"], "team"), (feeds["ops"]["id"], "ops")}
        status, _, _ = await http_exchange(app.port, "DELETE", f"/auth/feeds/{feeds['team']['id']}",
                                           headers={**CSRF, **cookie})
        assert status == 200 and (await http_exchange(app.port, "GET", feeds["team"]["url"]))[0] == 401
        assert (await http_exchange(app.port, "DELETE", f"/auth/feeds/{feeds['team']['id']}",
                                    headers={**CSRF, **cookie}))[0] == 404  # once
        # Taken out of ops, Bob's feed of it stops too; a feed from the command line is not
        # one of these and keeps working until `barosync token revoke`.
        await trio.to_thread.run_sync(lambda: app.accounts.set_access("bob", projects=["team"]))
        assert (await http_exchange(app.port, "GET", feeds["ops"]["url"]))[0] == 401
        cli_feed = create_token(app.config.secret, user_id="bob", projects=["ops"], scope="feed")
        assert (await http_exchange(app.port, "GET", f"/ics/ops.ics?token={cli_feed}"))[0] == 200


async def test_a_projects_owner_sees_its_members_and_changes_their_roles(tmp_path: Path) -> None:
    async with running(tmp_path) as (app, _):
        app.accounts.create("olive", name="Olive", password=PASSWORD, projects="*", admin=True)
        app.accounts.create("owen", name="Owen", password=PASSWORD, projects=["p1"], roles={"p1": "owner"})
        app.accounts.create("bob", name="Bob", password=PASSWORD, projects=["p1", "p2"])
        _, owen, _ = await sign_in(app.port, "owen")
        _, bob, _ = await sign_in(app.port, "bob")

        async def members(cookie: dict[str, str], project: str = "p1", change: Any = None) -> tuple[int, Any]:
            status, _, answer = await http_exchange(
                app.port, "POST" if change is not None else "GET", f"/auth/members/{project}", change,
                headers={**CSRF, **cookie} if change is not None else cookie)
            return status, answer

        status, answer = await members({"Cookie": cookie_of(owen)})
        assert status == 200 and {(m["id"], m["role"], m["everyProject"]) for m in answer["members"]} == {
            ("olive", "editor", True), ("owen", "owner", False), ("bob", "editor", False)}
        assert (await members({"Cookie": cookie_of(bob)}))[0] == 403  # an editor does not manage members
        assert (await members({"Cookie": cookie_of(owen)}, "p2"))[0] == 403  # nor does an owner of another project
        status, answer = await members({"Cookie": cookie_of(owen)}, change={"user": "bob", "role": "viewer"})
        assert status == 200 and ("bob", "viewer") in {(m["id"], m["role"]) for m in answer["members"]}
        status, answer = await members({"Cookie": cookie_of(owen)}, change={"user": "bob", "role": None})
        assert status == 200 and "bob" not in {m["id"] for m in answer["members"]}
        assert app.accounts.get("bob").projects == {"p2"}  # type: ignore[union-attr]
        status, answer = await members({"Cookie": cookie_of(owen)}, change={"user": "olive", "role": None})
        assert status == 400 and "every project" in answer["message"]
        status, answer = await members({"Cookie": cookie_of(owen)}, change={"user": "bob", "role": "boss"})
        assert status == 400


async def test_another_method_on_an_auth_request_is_405_not_404(tmp_path: Path) -> None:
    async with running(tmp_path) as (app, _):
        for method, path in (("PUT", "/auth/feeds"), ("PUT", "/auth/members/p1"), ("GET", "/auth/signin")):
            status, _, answer = await http_exchange(app.port, method, path)
            assert status == 405 and "docs/accounts.md" in answer["message"], (method, path)
        assert (await http_exchange(app.port, "GET", "/auth/nothing"))[0] == 404
