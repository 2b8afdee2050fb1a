"""Wire codecs: json (default), batch and deflate, negotiated with ?codec=."""

from __future__ import annotations

import json
import os
import zlib
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionRejected, open_websocket_url
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, TextMessage

from barosync.hooks.codecs import BUILTIN_CODECS, BatchCodec, DeflateCodec, JsonCodec, batch_json
from barosync.wire.protocol import Outgoing, ProtocolError, encode

from conftest import event_payload, open_client, token, ws_url


def parse_frames(data: bytes) -> list[Any]:
    """Frames -> the wire messages they carry, as a browser would see them."""
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(data)
    out = []
    for ev in client.events():
        if isinstance(ev, TextMessage):
            out.append(json.loads(ev.data))
        elif isinstance(ev, BytesMessage):
            out.append(json.loads(zlib.decompress(ev.data)))
    return out


# -- sans-IO ------------------------------------------------------------------------------


def test_batch_codec_sends_one_message_plain_and_several_as_one_batch_frame():
    codec = BatchCodec()
    one = encode("x", {"n": 1})
    assert parse_frames(codec.frames([one])) == [json.loads(one)]
    many = [encode("x", {"n": n}) for n in range(3)]
    (frame,) = parse_frames(codec.frames(many))
    assert frame["type"] == "batch"
    assert [m["payload"]["n"] for m in frame["payload"]] == [0, 1, 2]


def test_deflate_codec_frames_are_binary_zlib():
    codec = DeflateCodec()
    many = [encode("x", {"n": n, "pad": "calendar " * 20}) for n in range(5)]
    data = codec.frames(many)
    assert len(data) < len(b"".join(many)) / 3
    (frame,) = parse_frames(data)
    assert [m["payload"]["n"] for m in frame["payload"]] == list(range(5))


def test_decoders_accept_batches_and_refuse_what_they_cannot_read():
    assert BatchCodec().decode(batch_json([b'{"type":"ping"}', b'{"type":"ack","id":"a"}']), text=True, max_bytes=1000) == [
        {"type": "ping"}, {"type": "ack", "id": "a"}]
    assert DeflateCodec().decode(zlib.compress(b'{"type":"ping"}'), text=False, max_bytes=1000) == [{"type": "ping"}]
    with pytest.raises(ProtocolError) as info:
        JsonCodec().decode(b"\x00\x01", text=False, max_bytes=1000)
    assert info.value.code == "bad_envelope"
    with pytest.raises(ProtocolError):
        DeflateCodec().decode(b"not zlib", text=False, max_bytes=1000)
    bomb = zlib.compress(b'{"type":"ping","pad":"' + b"x" * 100_000 + b'"}')
    with pytest.raises(ProtocolError) as info:
        DeflateCodec().decode(bomb, text=False, max_bytes=65536)
    assert "larger than" in info.value.message
    with pytest.raises(ProtocolError):
        BatchCodec().decode(b'{"type":"batch","payload":{}}', text=True, max_bytes=1000)


def test_a_message_is_encoded_once_per_codec_not_per_recipient():
    out = Outgoing(encode("event:created", {"title": "x"}))
    deflate = DeflateCodec()
    first = out.frame_for(deflate)
    assert out.frame_for(DeflateCodec()) is first
    assert out.frame_for(JsonCodec()) == out.text


# -- through the server -------------------------------------------------------------------


class CodecClient:
    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.frames = 0

    async def recv_all(self) -> list[dict[str, Any]]:
        data = await self.ws.get_message()
        self.frames += 1
        msg = json.loads(zlib.decompress(data) if isinstance(data, bytes) else data)
        return msg["payload"] if msg["type"] == "batch" else [msg]


async def test_unknown_codec_is_refused_with_400(app):
    with pytest.raises(ConnectionRejected) as info:
        async with open_websocket_url(ws_url(app, token()) + "&codec=morse"):
            pass
    assert info.value.status_code == 400
    assert b"json" in info.value.body and b"deflate" in info.value.body


@pytest.mark.parametrize("codec", ["batch", "deflate"])
async def test_backlog_goes_out_as_batches_with_every_change_in_order(app, nursery, codec):
    writer = await open_client(nursery, app, token("writer"))
    total = 200
    async with open_websocket_url(ws_url(app, token("reader")) + f"&codec={codec}") as ws:
        reader = CodecClient(ws)
        (hello,) = await reader.recv_all()
        assert hello["payload"]["codec"] == codec
        await ws.send_message(json.dumps({"type": "subscribe", "id": "s", "payload": {"projectId": "p1"}}))
        # The server's socket is left unread while the writer makes a backlog.
        for n in range(total):
            # Hex compresses only about 2:1, so even deflate fills the socket.
            await writer.send("event:create", event_payload(title=f"e{n}", description=os.urandom(4000).hex()))
        with trio.fail_after(30):
            while app.writer.committed < total:
                await trio.sleep(0.01)
        seqs = []
        with trio.fail_after(10):
            while len(seqs) < total:
                for msg in await reader.recv_all():
                    if msg["type"] == "event:created":
                        seqs.append(msg["seq"])
        assert seqs == list(range(1, total + 1))
        assert reader.frames < total  # the backlog was batched
        # Batched input is accepted too: a ping and an ack in one frame.
        batch = json.dumps({"type": "batch", "payload": [{"type": "ping", "timestamp": 7}, {"type": "ack", "id": "p1:1"}]})
        await ws.send_message(zlib.compress(batch.encode()) if codec == "deflate" else batch)
        with trio.fail_after(5):
            while True:
                msgs = await reader.recv_all()
                if any(m["type"] == "pong" and m["timestamp"] == 7 for m in msgs):
                    break


def test_builtin_codecs_have_distinct_names():
    assert sorted(c.name for c in BUILTIN_CODECS) == ["batch", "deflate", "json"]
