"""A client that never reads while ~1,000 messages/s are fanned out to its project:
closed with 4008 once its outbox passes outbox_bytes, server memory stays bounded,
other readers keep receiving, and the closed client resumes with `since` and gets
exactly what it missed. Against a real `barosync serve` subprocess."""

from __future__ import annotations

from pathlib import Path

import trio

from attack_helpers import WS, Closed, event_payload, mint, start_server, uid, write_config

OUTBOX = 256 * 1024
RATE = 1000  # messages per second fanned out
SECONDS = 3.0
READERS = 3
PROJECT = "busy"
CHANGE = ("event:created", "event:updated", "event:deleted")




async def test_slow_reader_is_closed_4008_memory_stays_bounded_and_it_resumes_exactly(tmp_path: Path) -> None:
    data = tmp_path / "data"
    tok_writer = mint(data, "writer", "--project", PROJECT)
    tok_reader = mint(data, "reader", "--project", PROJECT)
    tok_slow = mint(data, "slow", "--project", PROJECT)
    config = write_config(tmp_path / "barosync.toml", server__outbox_bytes=OUTBOX, server__rate_limit=5000, server__rate_burst=5000)
    server = await start_server(data, config=config)
    try:
        readers_last = [0] * READERS
        readers_gaps = [0] * READERS
        stop = trio.Event()
        written = 0
        description = "x" * 1500  # ~1.8 KB per change message

        async def reader(i: int, ws: WS) -> None:
            while True:
                msg = await ws.recv(None)
                if msg["type"] in CHANGE:
                    if msg["seq"] != readers_last[i] + 1:
                        readers_gaps[i] += 1
                    readers_last[i] = msg["seq"]

        async def writer(ws: WS) -> None:
            nonlocal written
            window = trio.Semaphore(16)

            async def acks() -> None:
                while True:
                    msg = await ws.recv(None)
                    if msg["type"] == "ack":
                        window.release()
                    else:
                        assert msg["type"] not in ("error", "conflict:detected"), msg

            async with trio.open_nursery() as n:
                n.start_soon(acks)
                start = trio.current_time()
                while not stop.is_set():
                    # Paced at RATE creates per second, each fanned out to every reader.
                    await trio.sleep_until(start + written / RATE)
                    await window.acquire()
                    await ws.send("event:create", event_payload(PROJECT, title=f"e{written}", description=description), id=uid())
                    written += 1
                for _ in range(16):
                    await window.acquire()
                n.cancel_scope.cancel()

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                readers = [await WS.connect(server.port, tok_reader) for _ in range(READERS)]
                for i, r in enumerate(readers):
                    assert (await r.request("subscribe", {"projectId": PROJECT, "since": 0}))["type"] == "ack"
                    nursery.start_soon(reader, i, r)
                # The slow reader: a small receive window, subscribes, then never reads.
                slow = await WS.connect(server.port, tok_slow, rcvbuf=4096)
                slow_sub = await slow.request("subscribe", {"projectId": PROJECT, "since": 0})
                assert slow_sub["type"] == "ack"
                before = server.status()
                w = await WS.connect(server.port, tok_writer)
                writer_done = trio.Event()

                async def run_writer() -> None:
                    await writer(w)
                    writer_done.set()

                nursery.start_soon(run_writer)
                peak = dict(before)
                closed_at = None
                t0 = trio.current_time()
                while trio.current_time() - t0 < SECONDS:
                    await trio.sleep(0.1)
                    now = server.status()
                    peak = {k: max(peak[k], now[k]) for k in peak}
                    if closed_at is None and "closed: too slow" in server.stderr:
                        closed_at = written
                readers_at_close = list(readers_last)
                stop.set()
                await writer_done.wait()
                after = server.status()

                # Now the slow client reads: what the kernel held, then the 4008 close.
                got: list[dict] = []
                code = None
                try:
                    while True:
                        got.append(await slow.recv(10))
                except Closed as closed:
                    code = closed.code
                seqs = [m["seq"] for m in got if m["type"] in CHANGE]
                last_before_close = seqs[-1] if seqs else 0
                await slow.abort()

                # It resumes with `since` and receives exactly the missed seqs. A resume
                # that is itself cut with 4008 is retried from the last seq it applied.
                missed: list[int] = []
                resume_closes: list[tuple[int, int]] = []  # (count asked to replay, code)
                first_count = None
                for _attempt in range(100):
                    since = missed[-1] if missed else last_before_close
                    again = await WS.connect(server.port, tok_slow)
                    resumed = await again.request("subscribe", {"projectId": PROJECT, "since": since})
                    assert resumed["type"] == "ack" and resumed["payload"]["mode"] == "changes", resumed
                    first_count = resumed["payload"]["count"] if first_count is None else first_count
                    try:
                        got_now = 0
                        while got_now < resumed["payload"]["count"]:
                            msg = await again.recv()
                            if msg["type"] in CHANGE:
                                missed.append(msg["seq"])
                                got_now += 1
                        break
                    except Closed as cut:
                        resume_closes.append((resumed["payload"]["count"], cut.code))
                    finally:
                        await again.abort()
                # Every normal reader got everything, in order.
                with trio.move_on_after(10):
                    while min(readers_last) < written:
                        await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
            for c in (*readers, w):
                await c.abort()

        total = written
        growth = {k: after[k] - before[k] for k in before}
        print(f"\n[slow reader] written={total} in {SECONDS}s (~{total / SECONDS:.0f}/s fanned out to {READERS + 1} readers), "
              f"outbox_bytes={OUTBOX}, slow client closed with {code} after ~{closed_at} messages; it had read {len(seqs)} "
              f"(last seq {last_before_close}) and resumed with {len(missed)} missed (first resume asked for {first_count}); "
              f"resumes cut by the server: {len(resume_closes)} {resume_closes[:5]}; "
              f"VmRSS before={before['VmRSS']} KiB peak={peak['VmRSS']} after={after['VmRSS']} (growth {growth['VmRSS']} KiB, "
              f"RssAnon growth {growth['RssAnon']} KiB, RssFile growth {growth['RssFile']} KiB, peak RssAnon +{peak['RssAnon'] - before['RssAnon']} KiB); "
              f"readers' last seqs at the end of the load {readers_at_close}, final {readers_last}, gaps {readers_gaps}")
        assert code == 4008
        assert closed_at is not None
        assert seqs == list(range(1, last_before_close + 1))
        assert missed == list(range(last_before_close + 1, total + 1))
        assert readers_last == [total] * READERS and readers_gaps == [0] * READERS
        # Deliveries to the others went on after the slow one was closed.
        assert min(readers_at_close) > closed_at
        # Bounded: the outbox cap, not the ~MB fanned out to the slow client, is what
        # the server held for it. Anonymous memory growth stays far below what was sent.
        fanned_out_kib = total * 1.8
        assert peak["RssAnon"] - before["RssAnon"] < max(24 * 1024, fanned_out_kib / 4), (peak, before, fanned_out_kib)
        assert "Traceback" not in server.stderr
        # The resume was not cut again while the backlog was replayed: every missed
        # seq came in one go.
        assert resume_closes == []
    finally:
        server.stop()
