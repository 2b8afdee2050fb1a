"""Wire codecs: how envelopes become WebSocket frames and back.

A connection picks its codec at the handshake (``/ws?codec=NAME``, default
``json``). Codecs come from the ``barosync_wire_codecs`` hook and are resolved once
per connection, so no plugin call sits on the per-message path.

- ``json``: one JSON envelope per text frame — what the seed's browser client speaks.
- ``batch``: a message that can go out at once goes as a plain envelope frame; what
  is waiting when the socket becomes writable goes as one
  ``{"type":"batch","payload":[…]}`` text frame. No timer: batching adds no delay.
- ``deflate``: like ``batch``, but every frame is binary and zlib-compressed
  (browsers inflate with ``DecompressionStream("deflate")``).

Encode-once survives: a single message's frame is made once per codec in use and
shared by every recipient (``protocol.Outgoing``); only a batch, which is specific
to one connection's backlog, is built per connection.
"""

from __future__ import annotations

import zlib
from typing import Any

import orjson

from ..wire import protocol
from .hookspecs import hookimpl
from .plugin_types import Codec  # noqa: F401  (the interface, importable from here too)
from ..wire.protocol import ProtocolError

DEFAULT_CODEC = "json"
# Fast compression: the point is fewer bytes for little CPU.
DEFLATE_LEVEL = 1


def _loads(data: str | bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise ProtocolError(protocol.E_BAD_JSON, f"frame is not valid JSON: {e}") from None


def _unbatch(value: Any) -> list[Any]:
    if isinstance(value, dict) and value.get("type") == "batch":
        items = value.get("payload")
        if not isinstance(items, list):
            raise ProtocolError(protocol.E_BAD_ENVELOPE, "a batch's `payload` must be a list of envelopes", field="payload")
        return items
    return [value]


def batch_json(messages: list[bytes]) -> bytes:
    return b'{"type":"batch","payload":[' + b",".join(messages) + b"]}"


class JsonCodec(Codec):
    name = "json"

    def frame(self, message: bytes) -> bytes:
        return protocol.text_frame(message)

    def decode(self, data: bytes, *, text: bool, max_bytes: int) -> list[Any]:
        if not text:
            raise ProtocolError(protocol.E_BAD_ENVELOPE, "binary frames are not understood with codec json: send JSON text frames")
        return [_loads(data)]


class BatchCodec(JsonCodec):
    name = "batch"
    batching = True

    def frames(self, messages: list[bytes]) -> bytes:
        if len(messages) == 1:
            return self.frame(messages[0])
        return protocol.text_frame(batch_json(messages))

    def decode(self, data: bytes, *, text: bool, max_bytes: int) -> list[Any]:
        return _unbatch(super().decode(data, text=text, max_bytes=max_bytes)[0])


class DeflateCodec(Codec):
    name = "deflate"
    batching = True

    def frame(self, message: bytes) -> bytes:
        return protocol.binary_frame(zlib.compress(message, DEFLATE_LEVEL))

    def frames(self, messages: list[bytes]) -> bytes:
        if len(messages) == 1:
            return self.frame(messages[0])
        return self.frame(batch_json(messages))

    def decode(self, data: bytes, *, text: bool, max_bytes: int) -> list[Any]:
        if text:
            return _unbatch(_loads(data))
        inflater = zlib.decompressobj()
        try:
            raw = inflater.decompress(data, max_bytes + 1)
        except zlib.error as e:
            raise ProtocolError(protocol.E_BAD_ENVELOPE, f"binary frame is not zlib data: {e}") from None
        if len(raw) > max_bytes or inflater.unconsumed_tail:
            raise ProtocolError(protocol.E_BAD_ENVELOPE, f"inflated message is larger than {max_bytes} bytes")
        return _unbatch(_loads(raw))


BUILTIN_CODECS = (JsonCodec(), BatchCodec(), DeflateCodec())


@hookimpl
def barosync_wire_codecs() -> list[Codec]:
    return list(BUILTIN_CODECS)
