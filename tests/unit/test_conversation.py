"""The control-socket conversation rules, without a socket (zoned.conversation)."""

from __future__ import annotations

import struct

import pytest

from zoned import protocol as p
from zoned.access import ROOT_UID, AccessPolicy, Caller
from zoned.conversation import (
    MAX_INFLIGHT,
    SERVER_NAME,
    Action,
    Conversation,
    Forward,
    Respond,
    RespondAndClose,
    Start,
)

HELLO = p.Hello(id=1, versions=[p.PROTOCOL_VERSION], client="test")


def actions(conversation: Conversation, *messages: p.Request | bytes) -> list[Action]:
    """Feed messages (or raw bytes) in one chunk; every action they lead to."""
    data = b"".join(m if isinstance(m, bytes) else p.encode_frame(m) for m in messages)
    conversation.receive_data(data)
    found = []
    while (action := conversation.next_action()) is not None:
        found.append(action)
    return found


def error(action: Action) -> tuple[int, str, str]:
    assert isinstance(action, Respond | RespondAndClose), action
    reply = action.reply
    assert isinstance(reply, p.ErrorReply), reply
    return reply.id, reply.code, reply.message


@pytest.fixture
def serving() -> Conversation:
    conversation = Conversation(authorised=True, uid=1000, max_frame=p.DEFAULT_MAX_FRAME)
    (greeted,) = actions(conversation, HELLO)
    assert greeted == Respond(p.HelloReply(id=1, version=p.PROTOCOL_VERSION, server=SERVER_NAME))
    assert conversation.state == "serving"
    return conversation


def exec_request(id: int) -> p.Exec:
    return p.Exec(id=id, zone="z", argv=["true"])


def caller(uid: int, gid: int, *groups: int) -> Caller:
    return Caller(uid=uid, gid=gid, groups=frozenset(groups), pid=1)


def test_root_and_group_members_may_connect() -> None:
    assert AccessPolicy(socket_gid=None).may_connect(caller(0, 0))
    assert AccessPolicy(socket_gid=50).may_connect(caller(1000, 50))
    assert AccessPolicy(socket_gid=50).may_connect(caller(1000, 1000, 7, 50))
    assert not AccessPolicy(socket_gid=50).may_connect(caller(1000, 1000, 7))
    assert not AccessPolicy(socket_gid=None).may_connect(caller(1000, 1000, 7))


def test_owners_act_on_their_zones_root_and_administrators_on_all() -> None:
    policy = AccessPolicy(socket_gid=50, admin_gid=60)
    owner, other, admin = caller(1000, 50), caller(1001, 50), caller(1002, 50, 60)
    assert policy.may_act_on(owner, 1000)
    assert not policy.may_act_on(other, 1000)
    assert not policy.sees_all(owner)
    assert policy.may_act_on(admin, 1000) and policy.sees_all(admin)
    assert policy.may_act_on(caller(0, 0), 1000)
    # No administrators' group: membership of a group with no id means nothing.
    assert not AccessPolicy(socket_gid=50).sees_all(caller(1002, 50, 60))
    # Zones from before owners existed belong to root.
    assert not policy.may_act_on(owner, ROOT_UID)


def test_an_unauthorised_caller_is_refused_and_closed() -> None:
    conversation = Conversation(authorised=False, uid=1234, max_frame=p.DEFAULT_MAX_FRAME)
    (action,) = actions(conversation, p.ListZones(id=9), p.ListZones(id=10))
    assert isinstance(action, RespondAndClose)
    request_id, code, message = error(action)
    assert (request_id, code) == (9, "permission_denied")
    assert "uid 1234 may not use zoned" in message
    assert conversation.state == "closed"
    assert actions(conversation, HELLO) == []


def test_hello_comes_first() -> None:
    conversation = Conversation(authorised=True, uid=0, max_frame=p.DEFAULT_MAX_FRAME)
    (refused,) = actions(conversation, p.ListZones(id=5))
    assert error(refused) == (5, "invalid_request", "the first request must be hello")
    assert conversation.state == "greeting"
    (greeted,) = actions(conversation, HELLO)
    assert isinstance(greeted, Respond) and isinstance(greeted.reply, p.HelloReply)


def test_no_common_version_may_be_retried() -> None:
    conversation = Conversation(authorised=True, uid=0, max_frame=p.DEFAULT_MAX_FRAME)
    (refused,) = actions(conversation, p.Hello(id=3, versions=[99]))
    assert error(refused)[:2] == (3, "unsupported_version")
    assert conversation.state == "greeting"
    (greeted,) = actions(conversation, HELLO)
    assert isinstance(greeted, Respond) and isinstance(greeted.reply, p.HelloReply)


def test_hello_twice_is_refused(serving: Conversation) -> None:
    (refused,) = actions(serving, p.Hello(id=2, versions=[p.PROTOCOL_VERSION]))
    assert error(refused) == (2, "invalid_request", "hello already done")
    assert serving.state == "serving"


def test_requests_start_and_finish(serving: Conversation) -> None:
    request = p.ListZones(id=2)
    assert actions(serving, request) == [Start(request, takes_input=False)]
    serving.finished(request)


def test_the_inflight_cap_refuses_one_more_and_frees_on_finish(serving: Conversation) -> None:
    started = [p.GetZone(id=i, name="z") for i in range(10, 10 + MAX_INFLIGHT)]
    assert actions(serving, *started) == [Start(r, takes_input=False) for r in started]
    (refused,) = actions(serving, p.ListZones(id=99))
    assert error(refused) == (
        99,
        "invalid_request",
        f"too many requests in flight (limit {MAX_INFLIGHT})",
    )
    serving.finished(started[0])
    assert actions(serving, p.ListZones(id=100)) == [Start(p.ListZones(id=100), takes_input=False)]


def test_stream_input_goes_to_its_running_exec(serving: Conversation) -> None:
    running = exec_request(7)
    data = p.ExecInput(id=7, data=b"abc")
    signal = p.ExecSignal(id=7, signal=2)
    assert actions(serving, running, data, signal) == [
        Start(running, takes_input=True),
        Forward(data),
        Forward(signal),
    ]
    serving.finished(running)
    (refused,) = actions(serving, p.ExecInput(id=7, data=b"late"))
    assert error(refused) == (
        7,
        "invalid_request",
        "no running exec or import with id 7 on this connection",
    )


def test_image_data_goes_to_its_import_and_only_there(serving: Conversation) -> None:
    upload = p.ImportImage(id=3, size=10)
    running = exec_request(7)
    piece = p.ImageData(id=3, data=b"0123456789", eof=True)
    assert actions(serving, upload, running, piece) == [
        Start(upload, takes_input=True),
        Start(running, takes_input=True),
        Forward(piece),
    ]
    (wrong,) = actions(serving, p.ImageData(id=7, data=b"x"))
    assert error(wrong) == (7, "invalid_request", "request 7 is an exec: not its input")
    (wrong,) = actions(serving, p.ExecInput(id=3, data=b"x"))
    assert error(wrong) == (3, "invalid_request", "request 3 is an import: not its input")
    serving.finished(upload)
    (late,) = actions(serving, p.ImageData(id=3, eof=True))
    assert error(late)[:2] == (3, "invalid_request")


def test_stream_input_for_an_unknown_or_plain_request_is_refused(serving: Conversation) -> None:
    plain = p.ListZones(id=4)
    assert actions(serving, plain) == [Start(plain, takes_input=False)]
    for message in (p.ExecInput(id=4, eof=True), p.ExecSignal(id=8, signal=9)):
        (refused,) = actions(serving, message)
        assert error(refused)[:2] == (message.id, "invalid_request")


def test_a_running_exec_id_cannot_be_reused(serving: Conversation) -> None:
    first = exec_request(5)
    assert actions(serving, first) == [Start(first, takes_input=True)]
    (refused,) = actions(serving, p.RunZone(id=5, argv=["true"]))
    assert error(refused) == (5, "invalid_request", "id 5 is already running")
    serving.finished(first)
    again = exec_request(5)
    assert actions(serving, again) == [Start(again, takes_input=True)]


def test_a_message_that_does_not_decode_keeps_its_id_and_the_connection(
    serving: Conversation,
) -> None:
    import msgspec

    payload = msgspec.msgpack.encode({"type": "list_zones", "id": 44, "bogus": 1})
    (refused,) = actions(serving, struct.pack(">I", len(payload)) + payload)
    assert isinstance(refused, Respond)
    assert error(refused)[:2] == (44, "invalid_request")
    assert actions(serving, p.ListZones(id=45)) == [Start(p.ListZones(id=45), takes_input=False)]


def test_broken_framing_closes_with_id_zero(serving: Conversation) -> None:
    (closed,) = actions(serving, struct.pack(">I", p.DEFAULT_MAX_FRAME + 1) + b"x")
    assert isinstance(closed, RespondAndClose)
    assert error(closed)[:2] == (0, "invalid_request")
    assert serving.state == "closed"
    assert actions(serving, p.ListZones(id=2)) == []


def test_a_frame_in_pieces_waits_for_its_last_byte(serving: Conversation) -> None:
    frame = p.encode_frame(p.ListZones(id=6))
    for byte in frame[:-1]:
        serving.receive_data(bytes([byte]))
        assert serving.next_action() is None
    serving.receive_data(frame[-1:])
    assert serving.next_action() == Start(p.ListZones(id=6), takes_input=False)


def test_a_watcher_gets_only_its_own_zones_events_and_no_other_zones_names() -> None:
    policy = AccessPolicy(socket_gid=50, admin_gid=60)
    zone_event = p.Event(seq=1, time=0.0, kind="zone_state", zone="web", state="ready")
    cpu_event = p.Event(seq=2, time=0.0, kind="cpu_offline", cpu=3, reason="zones affected: web")
    owner = policy.event_view(caller(1000, 50))
    assert owner(zone_event, 1000) == zone_event
    other = policy.event_view(caller(1001, 50))
    assert other(zone_event, 1000) is None
    assert other(cpu_event, None) == p.Event(seq=2, time=0.0, kind="cpu_offline", cpu=3)
    admin = policy.event_view(caller(1002, 50, 60))
    assert admin(zone_event, 1000) == zone_event and admin(cpu_event, None) == cpu_event
