"""Security: the auth matrix at the handshake and per message, forged identities,
cross-project access, token expiry and auth:refresh, allowed origins, the secret
file's mode, and tokens (and the secret) kept out of the logs."""

from __future__ import annotations

import base64
import json
import stat
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio

from barosync.hooks.auth import create_token

from attack_helpers import WS, Closed, Rejected, event_payload, mint, read_secret, start_server
from conftest import SECRET, running, token



def b64(obj: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def alg_none(**claims: Any) -> str:
    body = {"sub": "alice", "projects": "*", "exp": int(time.time()) + 3600, **claims}
    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(body)}."


def hs512(claims: dict[str, Any]) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the test secret is short for SHA-512; that is the point
        return jwt.encode(claims, SECRET, algorithm="HS512")


def bad_tokens() -> dict[str, str | None]:
    now = int(time.time())
    good = token("alice", ["p1"])
    header, claims, signature = good.split(".")
    return {
        "no token": None,
        "malformed": "not-a-jwt",
        "three garbage parts": "a.b.c",
        "wrong signature": create_token("another-secret-entirely-0123456789-abcdef", user_id="alice", projects=["p1"]),
        "signature of another token": f"{header}.{claims}.{token('bob', ['p1']).split('.')[2]}",
        "alg none": alg_none(),
        "alg none keeping the old signature": f"{b64({'alg': 'none', 'typ': 'JWT'})}.{claims}.{signature}",
        "HS512 with the right secret": hs512({"sub": "alice", "projects": "*", "exp": now + 3600}),
        "expired": create_token(SECRET, user_id="alice", projects=["p1"], ttl=1, now=now - 3600),
        "not yet valid (nbf)": create_token(SECRET, user_id="alice", projects=["p1"], nbf=now + 3600),
        "no exp": jwt.encode({"sub": "alice", "projects": "*"}, SECRET, algorithm="HS256"),
        "no sub": jwt.encode({"projects": "*", "exp": now + 3600}, SECRET, algorithm="HS256"),
        "sub not a string": jwt.encode({"sub": 42, "projects": "*", "exp": now + 3600}, SECRET, algorithm="HS256"),
        "projects not a list": jwt.encode({"sub": "alice", "projects": {"p1": True}, "exp": now + 3600}, SECRET, algorithm="HS256"),
    }


async def test_handshake_refuses_every_bad_token_with_401_and_stores_nothing(data_dir: Path) -> None:
    async with running(data_dir) as (app, nursery):
        answers = {}
        for name, tok in bad_tokens().items():
            for how in ("query", "bearer"):
                if tok is None and how == "bearer":
                    continue
                try:
                    if how == "query":
                        ws = await WS.connect(app.port, tok)
                    else:
                        ws = await WS.connect(app.port, None, headers=[("Authorization", f"Bearer {tok}")])
                    await ws.abort()
                    answers[(name, how)] = 101
                except Rejected as r:
                    answers[(name, how)] = r.status
                    assert json.loads(r.body)["error"] == "unauthorized"
        # A bad Authorization header is not rescued by a good token in the query.
        try:
            await WS.connect(app.port, token("alice"), headers=[("Authorization", f"Bearer {alg_none()}")])
            answers[("good query, forged header", "both")] = 101
        except Rejected as r:
            answers[("good query, forged header", "both")] = r.status
        print(f"\n[security] handshake matrix: {len(answers)} cases, statuses {sorted(set(answers.values()))}")
        assert {k: v for k, v in answers.items() if v != 401} == {}
        assert app.store.current_seq("p1") == 0 and app.health()["connections"] == 0


async def test_token_for_another_project_is_refused_per_message_and_nothing_is_stored(data_dir: Path) -> None:
    async with running(data_dir) as (app, nursery):
        owner = await WS.connect(app.port, token("owner", ["p2"]))
        assert (await owner.request("event:create", event_payload("p2", id="secret-ev", title="Board meeting")))["type"] == "ack"
        eve = await WS.connect(app.port, token("eve", ["p1"]))
        answers = {
            "subscribe p2": await eve.request("subscribe", {"projectId": "p2"}),
            "subscribe p2 with since": await eve.request("subscribe", {"projectId": "p2", "since": 0}),
            "create in p2": await eve.request("event:create", event_payload("p2", title="x")),
            "cursor in p2": await eve.request("user:cursor", {"projectId": "p2", "x": 1, "y": 1}),
        }
        codes = {k: (v["type"], v["payload"].get("code")) for k, v in answers.items()}
        assert codes == {
            "subscribe p2": ("error", "forbidden"),
            "subscribe p2 with since": ("error", "forbidden"),
            "create in p2": ("error", "forbidden"),
            "cursor in p2": ("error", "not_subscribed"),
        }, codes
        # A mutation on p2's event by id answers exactly like an id that does not exist.
        probes = {}
        for kind, body in (("event:update", {"version": 1, "title": "pwned"}), ("event:delete", {"version": 1})):
            for target in ("secret-ev", "no-such-ev"):
                answer = await eve.request(kind, {"id": target, **body})
                probes[(kind, target)] = answer
                assert answer["type"] == "error", answer
        for kind in ("event:update", "event:delete"):
            real, missing = probes[(kind, "secret-ev")]["payload"], probes[(kind, "no-such-ev")]["payload"]
            assert real["code"] == missing["code"] == "not_found"
            assert real.get("field") == missing.get("field")
            assert real["message"].replace("secret-ev", "ID") == missing["message"].replace("no-such-ev", "ID")
        # An event is (project, id): naming one's own event's id in a project not in
        # the token is a change of an event there, answered as if it did not exist.
        mine = await eve.request("event:create", event_payload("p1", id="eve-ev"))
        move = await eve.request("event:update", {"id": "eve-ev", "version": 1, "projectId": "p2"})
        assert mine["type"] == "ack" and move["type"] == "error" and move["payload"]["code"] == "not_found"
        print(f"\n[security] cross-project: {len(codes) + len(probes) + 1} attempts refused; not_found is indistinguishable")
        assert app.store.current_seq("p2") == 1
        assert app.store.get_event("p2", "secret-ev")["title"] == "Board meeting"
        assert app.store.get_event("p2", "secret-ev")["version"] == 1
        assert app.store.get_event("p2", "eve-ev") is None and app.store.get_event("p1", "eve-ev")["version"] == 1
        for c in (owner, eve):
            await c.abort()


async def test_forged_user_ids_are_ignored(data_dir: Path) -> None:
    async with running(data_dir) as (app, nursery):
        alice = await WS.connect(app.port, token("alice"))
        bob = await WS.connect(app.port, token("bob"))
        watcher = await WS.connect(app.port, token("watcher"))
        for c in (alice, bob, watcher):
            assert (await c.request("subscribe", {"projectId": "p1"}))["type"] == "ack"
        forged = {"createdBy": "mallory", "updatedBy": "mallory", "version": 99, "createdAt": 1, "userId": "mallory"}
        ack = await alice.request("event:create", event_payload("p1", id="f1", **forged), userId="mallory")
        assert ack["type"] == "ack"
        ev = ack["payload"]["event"]
        assert (ev["createdBy"], ev["updatedBy"], ev["version"]) == ("alice", "alice", 1) and ev["createdAt"] > 1
        upd = await bob.request("event:update", {"id": "f1", "version": 1, "title": "moved", **{k: v for k, v in forged.items() if k != "version"}},
                                userId="alice")
        assert upd["type"] == "ack"
        assert (upd["payload"]["event"]["createdBy"], upd["payload"]["event"]["updatedBy"]) == ("alice", "bob")
        created = await watcher.recv_until(lambda m: m["type"] == "event:created")
        updated = await watcher.recv_until(lambda m: m["type"] == "event:updated")
        assert created[-1]["userId"] == "alice" and updated[-1]["userId"] == "bob"
        stored = app.store.get_event("p1", "f1")
        assert (stored["createdBy"], stored["updatedBy"], stored["version"]) == ("alice", "bob", 2)
        assert [c["userId"] for _, c in app.store.iter_changelog("p1")] == ["alice", "bob"]
        for c in (alice, bob, watcher):
            await c.abort()


async def test_expiring_token_closes_4001_unless_refreshed(data_dir: Path) -> None:
    async with running(data_dir) as (app, nursery):
        ttl = 2
        lapsing = await WS.connect(app.port, token("alice", ttl=ttl))
        refreshed = await WS.connect(app.port, token("alice", ttl=ttl))
        assert lapsing.hello["payload"]["tokenExpiresAt"] <= (time.time() + ttl + 1) * 1000
        ack = await refreshed.request("auth:refresh", {"token": token("alice", ttl=60)})
        assert ack["type"] == "ack" and ack["payload"]["expiresAt"] > (time.time() + 30) * 1000
        start = time.monotonic()
        with pytest.raises(Closed) as closed:
            while True:
                await lapsing.recv(ttl + 3)
        waited = time.monotonic() - start
        assert closed.value.code == 4001
        # The refreshed one outlives the first token's expiry and still answers.
        await trio.sleep(0.3)
        assert (await refreshed.request("subscribe", {"projectId": "p1"}))["type"] == "ack"
        print(f"\n[security] lapsing connection closed with 4001 after {waited:.1f}s; refreshed one still open")
        await lapsing.abort()
        await refreshed.abort()


@pytest.mark.parametrize("case", ["another user", "alg none", "expired", "garbage", "not a string"])
async def test_refresh_with_a_bad_token_is_refused_then_closed_4001(data_dir: Path, case: str) -> None:
    bad: Any = {
        "another user": token("mallory", projects="*"),
        "alg none": alg_none(sub="alice"),
        "expired": create_token(SECRET, user_id="alice", projects=["p1"], ttl=1, now=time.time() - 3600),
        "garbage": "x.y.z",
        "not a string": {"token": "nested"},
    }[case]
    async with running(data_dir) as (app, nursery):
        c = await WS.connect(app.port, token("alice"))
        answer = await c.request("auth:refresh", {"token": bad})
        assert answer["type"] == "error" and answer["payload"]["code"] == "forbidden", answer
        with pytest.raises(Closed) as closed:
            while True:
                await c.recv(5)
        assert closed.value.code == 4001
        session_users = {s.identity.user_id for s in app.sessions}
        assert "mallory" not in session_users
        await c.abort()


async def test_browser_handshake_from_another_origin_gets_403(data_dir: Path) -> None:
    async with running(data_dir, allowed_origins=("https://cal.example",)) as (app, nursery):
        statuses = {}
        for origin in ("https://evil.example", "null", "https://cal.example.evil.example", "http://cal.example", "https://cal.example:444"):
            try:
                await WS.connect(app.port, token(), headers=[("Origin", origin)])
                statuses[origin] = 101
            except Rejected as r:
                statuses[origin] = r.status
        ok = await WS.connect(app.port, token(), headers=[("Origin", "https://cal.example")])
        await ok.abort()
        print(f"\n[security] origins refused: {statuses}")
        assert set(statuses.values()) == {403}


async def test_secret_is_0600_and_tokens_never_reach_the_logs(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tok = mint(data, "alice", "--project", "p1")
    assert stat.S_IMODE((data / "secret").stat().st_mode) == 0o600
    secret = read_secret(data)
    header_tok = mint(data, "alice", "--project", "p1", "--ttl", "3600")
    refresh_tok = mint(data, "alice", "--project", "p1", "--ttl", "7200")
    other_tok = mint(data, "bob", "--project", "p1")
    rejected_tok = create_token("wrong-secret-wrong-secret-wrong-secret-0123", user_id="alice", projects=["p1"])
    server = await start_server(data, log_level="debug", env={"BAROSYNC_TRACE_PLUGINS": "1"})
    try:
        a = await WS.connect(server.port, tok)
        b = await WS.connect(server.port, None, headers=[("Authorization", f"Bearer {header_tok}")])
        assert (await a.request("subscribe", {"projectId": "p1"}))["type"] == "ack"
        assert (await b.request("event:create", event_payload("p1", title="t")))["type"] == "ack"
        assert (await a.request("auth:refresh", {"token": refresh_tok}))["type"] == "ack"
        refused = await b.request("auth:refresh", {"token": other_tok})
        assert refused["type"] == "error"
        for bad in (rejected_tok, alg_none()):
            with pytest.raises(Rejected):
                await WS.connect(server.port, bad)

        def rest() -> int:
            request = urllib.request.Request(f"http://127.0.0.1:{server.port}/api/projects/p1/events",
                                             headers={"Authorization": f"Bearer {tok}"})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status
            except urllib.error.HTTPError as e:
                return e.code

        status = await trio.to_thread.run_sync(rest)
        await a.abort()
        await b.abort()
        await trio.sleep(0.2)
    finally:
        server.stop()
    log = server.stderr
    assert "hook " in log, "BAROSYNC_TRACE_PLUGINS=1 traced no hook calls"
    leaked = {name: t for name, t in [("query token", tok), ("bearer token", header_tok), ("refresh token", refresh_tok),
                                      ("other user's token", other_tok), ("rejected token", rejected_tok),
                                      ("secret", secret)] if t in log}
    # A token's signature part alone identifies it too.
    leaked.update({f"{name} signature": t for name, t in [("query token", tok), ("refresh token", refresh_tok)]
                   if t.split(".")[2] in log})
    print(f"\n[security] debug+trace log: {len(log.splitlines())} lines, REST status {status}, leaked: {sorted(leaked)}")
    assert not leaked, sorted(leaked)
    assert stat.S_IMODE((data / "secret").stat().st_mode) == 0o600
