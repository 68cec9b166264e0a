"""Messages between the daemon and a zone's network helper.

One SOCK_SEQPACKET socketpair per helper: each packet is one msgpack
message, and the listening sockets a message refers to travel with it as
SCM_RIGHTS (in the order of its ``*_fds`` fields' indices). The helper is
on the far side of hostile input (it parses the zone's bytes), so the
daemon decodes what it sends with the same strictness as anything from a
zone: tagged, typed, bounded.

Daemon -> helper: :class:`Setup` first (and the :class:`SeedPins` it
announces), then :class:`SetPolicy` and
:class:`SetPublishes` at any time (each answered by :class:`Applied` with
its ``seq`` once new connections see it), :class:`GetCounters`, :class:`Stop`.
Helper -> daemon: :class:`Ready`, :class:`Applied`, :class:`Counters`
(periodically), :class:`Pinned` (for a restarted helper), :class:`Refused`
(already rate-limited).
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from zoned.net.accounting import NetCounters, RefusedEvent
from zoned.net.addressing import ZoneAddressing
from zoned.net.policy import NetPolicy, Publish, RefusedRange

MAX_MESSAGE = 256 * 1024
MAX_FDS = 4 + 2 * 64
PINS_PER_MESSAGE = 512


class Limits(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Per-zone bounds, so that a flood hurts only its own zone."""

    max_connections: int = 256  # concurrent proxied connections (and publish connections)
    connect_rate: float = 50.0  # new connections a second (burst 2x)
    dns_rate: float = 50.0  # queries a second (burst 2x)
    dns_inflight: int = 32  # queries waiting on the upstream
    pin_entries: int = 4096
    event_rate: float = 5.0  # refused events a second (burst 20)
    sniff_timeout_s: float = 10.0  # for the first bytes a client sends
    connect_timeout_s: float = 10.0
    upstream_dns_timeout_s: float = 3.0
    idle_timeout_s: float = 3600.0


class _Msg(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="type"):
    pass


class Setup(_Msg, frozen=True, tag="setup", kw_only=True):
    zone: str
    addressing: ZoneAddressing
    policy: NetPolicy
    extra_refused: list[RefusedRange]
    upstream_dns: list[str]  # "address" or "address#port"
    limits: Limits = Limits()
    # Indices into the fds sent with this message.
    proxy_fds: list[int]  # listening TCP (v4, v6)
    dns_udp_fds: list[int]
    dns_tcp_fds: list[int]
    publishes: list[Publish] = []
    publish_fds: list[int] = []  # one listening socket per publish, same order
    seed_messages: int = 0


class Pin(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    address: Annotated[str, msgspec.Meta(max_length=64)]
    name: Annotated[str, msgspec.Meta(max_length=253)]
    expires: float  # time.monotonic() (CLOCK_MONOTONIC: the same in every process)


class SeedPins(_Msg, frozen=True, tag="seed_pins", kw_only=True):
    """Pins of the zone's previous helper; ``Setup.seed_messages`` of them follow Setup."""

    pins: Annotated[list[Pin], msgspec.Meta(max_length=PINS_PER_MESSAGE)]


class SetPolicy(_Msg, frozen=True, tag="set_policy", kw_only=True):
    seq: int
    policy: NetPolicy


class SetPublishes(_Msg, frozen=True, tag="set_publishes", kw_only=True):
    seq: int
    publishes: list[Publish]
    publish_fds: list[int]


class GetCounters(_Msg, frozen=True, tag="get_counters", kw_only=True):
    """Answered by :class:`Counters` with the same ``seq``, after every earlier message."""

    seq: int


class Stop(_Msg, frozen=True, tag="stop"):
    pass


class Ready(_Msg, frozen=True, tag="ready", kw_only=True):
    pid: int


class Applied(_Msg, frozen=True, tag="applied", kw_only=True):
    seq: int
    # Connections closed because the new policy no longer allows them.
    closed: int = 0


class Counters(_Msg, frozen=True, tag="counters", kw_only=True):
    counters: NetCounters
    pins: int = 0
    seq: int = 0  # of the GetCounters it answers; 0 when periodic


class Pinned(_Msg, frozen=True, tag="pinned", kw_only=True):
    """Pins the helper just recorded, so that a restarted helper starts with them."""

    pins: Annotated[list[Pin], msgspec.Meta(max_length=PINS_PER_MESSAGE)]


class Refused(_Msg, frozen=True, tag="refused", kw_only=True):
    event: RefusedEvent


ToHelper = Setup | SeedPins | SetPolicy | SetPublishes | GetCounters | Stop
FromHelper = Ready | Applied | Counters | Pinned | Refused

_to_helper = msgspec.msgpack.Decoder(ToHelper)
_from_helper = msgspec.msgpack.Decoder(FromHelper)
_encoder = msgspec.msgpack.Encoder()


def encode(message: ToHelper | FromHelper) -> bytes:
    data = _encoder.encode(message)
    if len(data) > MAX_MESSAGE:
        raise ValueError(f"helper message of {len(data)} bytes exceeds {MAX_MESSAGE}")
    return data


def decode_to_helper(data: bytes) -> ToHelper:
    return _to_helper.decode(data)


def decode_from_helper(data: bytes) -> FromHelper:
    """Decode a helper's message; msgspec errors propagate (the caller kills the helper)."""
    if len(data) > MAX_MESSAGE:
        raise msgspec.ValidationError("helper message too long")
    return _from_helper.decode(data)
