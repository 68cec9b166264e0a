"""What the agent reports and the daemon passes on: one declaration, one conversion,
the same bytes on the wire as before the declarations were shared."""

from __future__ import annotations

import errno

import msgspec
import pytest

from zoned import protocol as p
from zoned.errors import InvalidRequest

HEARTBEAT = p.HeartbeatReply(
    seq=4, uptime_s=1.5, load1=0.25, mem_total_kib=1000, mem_available_kib=500, processes=12
)
#: What clients see of HEARTBEAT, received at 3.0.
METRICS = p.GuestMetrics(
    uptime_s=1.5,
    load1=0.25,
    mem_total_kib=1000,
    mem_available_kib=500,
    processes=12,
    reported_at=3.0,
)

# Encoded by the protocol before AgentExecExit/ExecExit and HeartbeatReply/
# GuestMetrics shared their fields: old peers decode exactly these bytes.
GOLDEN: list[tuple[p.Message, str]] = [
    (
        p.ExecExit(id=7, exit_code=3),
        "83a474797065a9657865635f65786974a2696407a9657869745f636f646503",
    ),
    (
        p.ExecExit(
            id=7, signal=9, timed_out=True, oom_killed=True, cpu_time_s=0.5, memory_peak_kib=1024
        ),
        "87a474797065a9657865635f65786974a2696407a67369676e616c09a974696d65645f6f7574c3aa6f6f6d"
        "5f6b696c6c6564c3aa6370755f74696d655f73cb3fe0000000000000af6d656d6f72795f7065616b5f6b69"
        "62cd0400",
    ),
    (
        p.AgentExecExit(exec_id=2, exit_code=0, cpu_time_s=0.25, memory_peak_kib=10),
        "85a474797065af6167656e745f657865635f65786974a7657865635f696402a9657869745f636f646500aa"
        "6370755f74696d655f73cb3fd0000000000000af6d656d6f72795f7065616b5f6b69620a",
    ),
    (
        p.AgentExecExit(exec_id=2, signal=9, oom_killed=True, cpu_time_s=0.25, memory_peak_kib=10),
        "86a474797065af6167656e745f657865635f65786974a7657865635f696402a67369676e616c09aa6f6f6d"
        "5f6b696c6c6564c3aa6370755f74696d655f73cb3fd0000000000000af6d656d6f72795f7065616b5f6b69"
        "620a",
    ),
    (
        p.AgentExecExit(exec_id=3, error="cannot run"),
        "83a474797065af6167656e745f657865635f65786974a7657865635f696403a56572726f72aa63616e6e6f"
        "742072756e",
    ),
    (
        HEARTBEAT,
        "87a474797065af6865617274626561745f7265706c79a373657104a8757074696d655f73cb3ff800000000"
        "0000a56c6f616431cb3fd0000000000000ad6d656d5f746f74616c5f6b6962cd03e8b16d656d5f61766169"
        "6c61626c655f6b6962cd01f4a970726f6365737365730c",
    ),
    (
        p.ZoneMetricsReply(
            id=1,
            metrics=p.ZoneMetricsData(
                name="z",
                state="ready",
                sampled_at=2.0,
                vcpus=1,
                memory_mib=256,
                guest=METRICS,
            ),
        ),
        "83a474797065b27a6f6e655f6d6574726963735f7265706c79a2696401a76d65747269637386a46e616d65"
        "a17aa57374617465a57265616479aa73616d706c65645f6174cb4000000000000000a5766370757301aa6d"
        "656d6f72795f6d6962cd0100a5677565737486a8757074696d655f73cb3ff8000000000000a56c6f616431"
        "cb3fd0000000000000ad6d656d5f746f74616c5f6b6962cd03e8b16d656d5f617661696c61626c655f6b69"
        "62cd01f4a970726f6365737365730cab7265706f727465645f6174cb4008000000000000",
    ),
]


@pytest.mark.parametrize(("message", "golden"), GOLDEN, ids=lambda v: type(v).__name__)
def test_shared_declarations_keep_the_encodings(message: p.Message, golden: str) -> None:
    assert p.encode(message).hex() == golden
    decode = p.decode_reply if isinstance(message, p.Reply) else p.decode_from_agent
    assert decode(bytes.fromhex(golden)) == message


def test_guest_metrics_always_carry_every_field() -> None:
    """Clients from before ``processes`` had a default require it, even when 0."""
    reply = p.HeartbeatReply(seq=1, uptime_s=1, load1=0, mem_total_kib=2, mem_available_kib=1)
    metrics = p.guest_metrics(reply, 5.0)
    assert set(msgspec.msgpack.decode(msgspec.msgpack.encode(metrics))) == set(
        p.GuestMetrics.__struct_fields__
    )


def test_an_agent_exit_becomes_the_clients_exit_by_field_name() -> None:
    end = p.AgentExecExit(
        exec_id=4, signal=9, oom_killed=True, cpu_time_s=1.5, memory_peak_kib=2048
    )
    assert p.exec_exit_reply(11, end) == p.ExecExit(
        id=11, signal=9, oom_killed=True, cpu_time_s=1.5, memory_peak_kib=2048
    )
    assert p.exec_exit_reply(11, end, timed_out=True).timed_out
    # The daemon's word on the timeout, not the agent's.
    claims = msgspec.structs.replace(end, timed_out=True)
    assert not p.exec_exit_reply(11, claims).timed_out
    # Every field the exit shares reaches the client: none is left behind.
    agent_only = {"type", "exec_id", "error", "errno"}
    reply_only = {"type", "id"}
    assert (
        set(p.AgentExecExit.__struct_fields__) - agent_only
        == set(p.ExecExit.__struct_fields__) - reply_only
    )


def test_a_start_errno_is_carried_and_bounded() -> None:
    end = p.AgentExecExit(exec_id=1, error="cannot run 'x': No such file", errno=errno.ENOENT)
    assert p.decode_from_agent(p.encode(end)) == end
    for bad in (0, 4096, -1):
        payload = msgspec.msgpack.encode(
            {"type": "agent_exec_exit", "exec_id": 1, "error": "x", "errno": bad}
        )
        with pytest.raises(InvalidRequest, match="errno"):
            p.decode_from_agent(payload)


def test_heartbeat_figures_reach_clients_by_field_name() -> None:
    assert p.guest_metrics(HEARTBEAT, 3.0) == METRICS


def test_a_start_failure_gets_the_shells_exit_status_from_its_errno() -> None:
    from zoned.workloads import start_error_status

    def failed(errno: int | None) -> p.AgentExecExit:
        # The text does not count: only the number does.
        return p.AgentExecExit(exec_id=1, error="No such file or directory", errno=errno)

    assert start_error_status(failed(errno.ENOENT)) == 127
    assert start_error_status(failed(errno.EACCES)) == 126
    assert start_error_status(failed(errno.ENOEXEC)) == 126
    assert start_error_status(failed(None)) == 126  # a refusal: too many processes...
