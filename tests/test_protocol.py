"""The wire protocol without sockets: envelope decoding, validation and frame encoding."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import TextMessage

from barosync.wire import protocol
from barosync.domain.models import MAX_ID_CHARS
from barosync.wire.protocol import Envelope, ProtocolError, decode_envelope, parse_subscribe


def refused(data: str | bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode_envelope(data)
    return info.value


def dumps(body: Any) -> str:
    return json.dumps(body)


def parse_server_frames(data: bytes) -> list[dict[str, Any]]:
    """What a WebSocket client makes of server bytes: the JSON of each text message.

    A client-side wsproto connection refuses masked frames, so this also checks the
    frames are unmasked, as RFC 6455 requires of a server."""
    client = Connection(ConnectionType.CLIENT)
    client.receive_data(data)
    messages = []
    for event in client.events():
        assert isinstance(event, TextMessage), event
        assert event.message_finished
        messages.append(json.loads(event.data))
    return messages


# -- decoding what the seed browser client sends --------------------------------------


def test_ping_without_id_or_payload_is_accepted():
    env = decode_envelope('{"type":"ping","timestamp":1}')
    assert env == Envelope(type="ping", id=None, payload={}, timestamp=1)


def test_ack_without_payload_is_accepted():
    env = decode_envelope('{"type":"ack","id":"x","timestamp":1}')
    assert env == Envelope(type="ack", id="x", payload={}, timestamp=1)


def test_ack_without_id_is_accepted():
    env = decode_envelope('{"type":"ack"}')
    assert env.type == "ack" and env.id is None and env.payload == {}


def test_bytes_frame_is_decoded_like_text():
    assert decode_envelope(b'{"type":"ping","timestamp":5}') == decode_envelope('{"type":"ping","timestamp":5}')


def test_mutation_with_id_and_payload_is_accepted():
    env = decode_envelope(dumps({"type": "event:create", "id": "m1", "payload": {"title": "Standup"}, "timestamp": 17}))
    assert env == Envelope(type="event:create", id="m1", payload={"title": "Standup"}, timestamp=17)


def test_extra_fields_and_client_user_id_are_ignored():
    env = decode_envelope(
        dumps({"type": "subscribe", "id": "s1", "payload": {"projectId": "p1"}, "userId": "mallory", "version": 9, "extra": [1, 2]})
    )
    assert env == Envelope(type="subscribe", id="s1", payload={"projectId": "p1"}, timestamp=None)
    assert not hasattr(env, "userId") and not hasattr(env, "user_id")


def test_null_payload_defaults_to_empty_object():
    assert decode_envelope('{"type":"unsubscribe","id":"u1","payload":null}').payload == {}


def test_ping_with_non_object_payload_still_pongs():
    # "ping: payload any" in the contract.
    assert decode_envelope('{"type":"ping","payload":"hi"}').payload == {}


@pytest.mark.parametrize("timestamp", ['"1"', "true", "null", "[1]"])
def test_non_numeric_timestamp_is_dropped(timestamp):
    assert decode_envelope(f'{{"type":"ping","timestamp":{timestamp}}}').timestamp is None


# -- refusals: code and ref ---------------------------------------------------------------


@pytest.mark.parametrize("data", ["", "not json", '{"type":"ping"', b"\xff\xfe", '{"type":"ping"} trailing'])
def test_non_json_is_bad_json_without_ref(data):
    err = refused(data)
    assert err.code == protocol.E_BAD_JSON
    assert err.ref is None


@pytest.mark.parametrize("data", ["[]", '[{"type":"ping","id":"x"}]', '"ping"', "42", "null", "true"])
def test_json_that_is_not_an_object_is_bad_envelope(data):
    err = refused(data)
    assert err.code == protocol.E_BAD_ENVELOPE
    assert err.ref is None


@pytest.mark.parametrize("body", [{"id": "m7"}, {"id": "m7", "type": None}, {"id": "m7", "type": 3}, {"id": "m7", "type": ["ping"]}])
def test_missing_or_non_string_type_is_bad_envelope_with_ref(body):
    err = refused(dumps(body))
    assert err.code == protocol.E_BAD_ENVELOPE
    assert err.ref == "m7"
    assert err.field == "type"


def test_unknown_type_is_unknown_type_with_ref():
    err = refused(dumps({"type": "event:explode", "id": "m8", "payload": {}}))
    assert err.code == protocol.E_UNKNOWN_TYPE
    assert err.ref == "m8"
    assert "event:explode" in err.message


def test_server_only_type_from_client_is_unknown_type():
    assert refused(dumps({"type": "event:created", "id": "m9"})).code == protocol.E_UNKNOWN_TYPE


def test_unknown_type_message_is_bounded():
    err = refused(dumps({"type": "x" * 10_000}))
    assert err.code == protocol.E_UNKNOWN_TYPE
    assert len(err.message) < 200


@pytest.mark.parametrize("msg_type", sorted(protocol.ACKED))
def test_acked_types_without_id_are_bad_envelope(msg_type):
    err = refused(dumps({"type": msg_type, "payload": {"projectId": "p1"}}))
    assert err.code == protocol.E_BAD_ENVELOPE
    assert err.field == "id"
    assert err.ref is None
    assert msg_type in err.message


@pytest.mark.parametrize("bad_id", ["", 5, None, ["m1"], {"id": "m1"}])
def test_mutation_with_unusable_id_is_bad_envelope(bad_id):
    err = refused(dumps({"type": "event:create", "id": bad_id, "payload": {}}))
    assert err.code == protocol.E_BAD_ENVELOPE
    assert err.field == "id"


@pytest.mark.parametrize("payload", [[], "x", 1, True, [{"projectId": "p1"}]])
def test_non_object_payload_is_bad_envelope_with_ref(payload):
    err = refused(dumps({"type": "event:update", "id": "m10", "payload": payload}))
    assert err.code == protocol.E_BAD_ENVELOPE
    assert err.field == "payload"
    assert err.ref == "m10"


def test_longest_id_is_accepted():
    long_id = "i" * MAX_ID_CHARS
    assert decode_envelope(dumps({"type": "event:delete", "id": long_id, "payload": {"id": "e1"}})).id == long_id


def test_over_long_id_is_refused_and_not_echoed_as_ref():
    err = refused(dumps({"type": "event:delete", "id": "i" * (MAX_ID_CHARS + 1), "payload": {"id": "e1"}}))
    assert err.code == protocol.E_BAD_ENVELOPE
    assert err.field == "id"
    assert err.ref is None


def test_error_payload_carries_code_message_ref_and_field():
    err = refused(dumps({"type": "subscribe", "id": "m11", "payload": 3}))
    assert err.payload() == {"code": "bad_envelope", "message": err.message, "ref": "m11", "field": "payload"}


# -- parse_subscribe --------------------------------------------------------------------


def test_subscribe_with_project_and_since():
    assert parse_subscribe({"projectId": "p1", "since": 7}, "m1") == protocol.Subscribe("p1", 7)


def test_subscribe_without_since_and_with_since_zero():
    assert parse_subscribe({"projectId": "p1"}, "m1").since is None
    assert parse_subscribe({"projectId": "p1", "since": None}, "m1").since is None
    assert parse_subscribe({"projectId": "p1", "since": 0}, "m1").since == 0


@pytest.mark.parametrize("project", [None, "", 5, ["p1"], "p" * (MAX_ID_CHARS + 1), "p\x001"])
def test_subscribe_refuses_bad_project_id(project):
    payload = {} if project is None else {"projectId": project}
    with pytest.raises(ProtocolError) as info:
        parse_subscribe(payload, "m2")
    assert info.value.code == protocol.E_INVALID
    assert info.value.field == "projectId"
    assert info.value.ref == "m2"


@pytest.mark.parametrize("since", [-1, True, False, "3", 1.5, [1]])
def test_subscribe_refuses_bad_since(since):
    with pytest.raises(ProtocolError) as info:
        parse_subscribe({"projectId": "p1", "since": since}, "m3")
    assert info.value.code == protocol.E_INVALID
    assert info.value.field == "since"
    assert info.value.ref == "m3"


# -- encoding ---------------------------------------------------------------------------


def test_frame_is_an_unmasked_text_frame_whose_json_round_trips():
    payload = {"event": {"id": "e1", "title": "Réunion ☕", "attendees": ["a", "b"]}}
    data = protocol.frame("event:created", payload, seq=4, projectId="p1", userId="alice", timestamp=99)
    assert data[0] == 0x81  # FIN + text opcode
    assert data[1] & 0x80 == 0  # no mask bit: a server frame
    [msg] = parse_server_frames(data)
    assert msg["type"] == "event:created"
    assert msg["payload"] == payload
    assert msg["seq"] == 4 and msg["projectId"] == "p1" and msg["userId"] == "alice" and msg["timestamp"] == 99
    assert isinstance(msg["id"], str) and msg["id"]


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 200_000])
def test_frames_of_every_length_encoding_parse_back(size):
    # 7-bit, 16-bit and 64-bit payload lengths in the frame header.
    text = "x" * size
    [msg] = parse_server_frames(protocol.frame("sync:snapshot", {"blob": text}))
    assert msg["payload"] == {"blob": text}


def test_frames_concatenated_parse_as_separate_messages():
    data = protocol.frame("pong", timestamp=1) + protocol.frame("user:left", {"id": "bob"})
    assert [m["type"] for m in parse_server_frames(data)] == ["pong", "user:left"]


def test_encode_leaves_out_extra_keys_that_are_none():
    body = json.loads(protocol.encode("event:deleted", {"id": "e1"}, seq=None, projectId="p1", userId=None))
    assert set(body) == {"type", "id", "payload", "projectId"}
    assert "timestamp" not in body


def test_encode_defaults_payload_to_empty_object():
    assert json.loads(protocol.encode("pong"))["payload"] == {}


def test_ack_frame_reuses_the_client_message_id():
    [msg] = parse_server_frames(protocol.ack_frame("client-42", {"event": {"id": "e1"}}))
    assert msg == {"type": "ack", "id": "client-42", "payload": {"event": {"id": "e1"}}}


def test_error_frame_carries_the_error_payload():
    err = ProtocolError(protocol.E_INVALID, "`since` must be a non-negative integer seq", ref="m5", field="since")
    [msg] = parse_server_frames(protocol.error_frame(err))
    assert msg["type"] == "error"
    assert msg["payload"] == {"code": "invalid", "message": err.message, "ref": "m5", "field": "since"}
    assert msg["id"] != "m5"


def test_server_message_ids_are_unique():
    ids = [json.loads(protocol.encode("user:cursor"))["id"] for _ in range(1000)]
    ids += [protocol.next_id() for _ in range(1000)]
    assert len(set(ids)) == len(ids)


# -- properties -------------------------------------------------------------------------


def decodes_or_refuses(data: str | bytes) -> None:
    try:
        env = decode_envelope(data)
    except ProtocolError as e:
        assert e.code in (protocol.E_BAD_JSON, protocol.E_BAD_ENVELOPE, protocol.E_UNKNOWN_TYPE)
        assert e.ref is None or (isinstance(e.ref, str) and len(e.ref) <= MAX_ID_CHARS)
        json.dumps(e.payload())  # an error envelope can always be sent back
        return
    assert isinstance(env, Envelope)
    assert env.type in protocol.CLIENT_TYPES
    assert isinstance(env.payload, dict)
    if env.type in protocol.ACKED:
        assert isinstance(env.id, str) and 0 < len(env.id) <= MAX_ID_CHARS


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.binary(), st.text(alphabet=st.characters(exclude_categories=()))))
def test_arbitrary_text_and_bytes_decode_or_refuse(data):
    decodes_or_refuses(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=20,
)
envelope_like = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(sorted(protocol.CLIENT_TYPES)) | json_values,
        "id": st.text(max_size=MAX_ID_CHARS + 2) | json_values,
        "payload": st.dictionaries(st.text(), json_values, max_size=4) | json_values,
        "timestamp": st.integers() | st.floats(allow_nan=False, allow_infinity=False) | json_values,
        "userId": json_values,
    },
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(envelope_like, st.dictionaries(st.text(), json_values, max_size=6), json_values))
def test_arbitrary_json_decodes_or_refuses(body):
    text = json.dumps(body)
    decodes_or_refuses(text)
    decodes_or_refuses(text.encode())


@settings(max_examples=200, deadline=None)
@given(envelope_like)
def test_client_user_id_never_changes_the_decoded_envelope(body):
    with_user = dict(body, userId="mallory")
    without_user = {k: v for k, v in body.items() if k != "userId"}
    try:
        expected = decode_envelope(json.dumps(without_user))
    except ProtocolError as e:
        with pytest.raises(ProtocolError) as info:
            decode_envelope(json.dumps(with_user))
        assert (info.value.code, info.value.ref) == (e.code, e.ref)
    else:
        assert decode_envelope(json.dumps(with_user)) == expected


def test_ack_up_to_reads_a_cumulative_ack_and_leaves_acks_by_id_alone() -> None:
    assert protocol.ack_up_to(None) is None and protocol.ack_up_to({}) is None
    assert protocol.ack_up_to({"projectId": "demo", "seq": 0}) == ("demo", 0)
    assert protocol.ack_up_to({"projectId": "demo", "seq": 42, "extra": 1}) == ("demo", 42)
    for bad, field in (({"projectId": "demo", "seq": 1.5}, "seq"), ({"projectId": "demo", "seq": True}, "seq"),
                       ({"projectId": "", "seq": 1}, "projectId"), ({"projectId": "x" * 129, "seq": 1}, "projectId")):
        with pytest.raises(protocol.ProtocolError) as raised:
            protocol.ack_up_to(bad)
        assert raised.value.field == field and raised.value.code == protocol.E_INVALID
    with pytest.raises(protocol.ProtocolError):
        protocol.ack_up_to([1, 2])
