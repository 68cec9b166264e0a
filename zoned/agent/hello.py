"""The agent's ``AgentHello`` frame, encoded without msgspec (pure, stdlib-free).

Importing :mod:`zoned.protocol` (msgspec, typing, re, datetime, decimal...)
takes about 0.6 s of guest time under TCG, more than the interpreter's own
start. The hello is what the host waits for to call a zone booted, so the
agent sends it first, with this encoder, and imports the protocol after.

This is not a second definition of the wire: :mod:`zoned.protocol` stays the
only one. The unit tests check that :func:`encode_hello_frame` produces
exactly the bytes ``encode_frame(AgentHello(...), AGENT_MAX_FRAME)`` does, and
that :data:`AGENT_PROTOCOL_VERSION` matches; a change to ``AgentHello`` breaks
them. It encodes what msgspec does for this one message: a msgpack map whose
first key is the tag, then the fields in declaration order, integers and
strings in their shortest form, floats as float64.
"""

from __future__ import annotations

import struct

#: Must equal :data:`zoned.protocol.AGENT_PROTOCOL_VERSION` (checked by the tests).
AGENT_PROTOCOL_VERSION = 1
_TAG = "agent_hello"


def _str(value: str) -> bytes:
    data = value.encode()
    n = len(data)
    if n < 32:
        return bytes([0xA0 | n]) + data
    if n < 1 << 8:
        return b"\xd9" + struct.pack(">B", n) + data
    if n < 1 << 16:
        return b"\xda" + struct.pack(">H", n) + data
    return b"\xdb" + struct.pack(">I", n) + data


def _uint(value: int) -> bytes:
    if value < 0:
        raise ValueError(f"{value} is negative")
    if value < 0x80:
        return bytes([value])
    if value < 1 << 8:
        return b"\xcc" + struct.pack(">B", value)
    if value < 1 << 16:
        return b"\xcd" + struct.pack(">H", value)
    if value < 1 << 32:
        return b"\xce" + struct.pack(">I", value)
    return b"\xcf" + struct.pack(">Q", value)


def encode_hello_frame(*, agent: str, kernel_release: str, boot_s: float, pid: int) -> bytes:
    """One whole frame (length header and payload) holding an ``AgentHello``."""
    fields = (
        ("type", _str(_TAG)),
        ("version", _uint(AGENT_PROTOCOL_VERSION)),
        ("agent", _str(agent)),
        ("kernel_release", _str(kernel_release)),
        ("boot_s", b"\xcb" + struct.pack(">d", boot_s)),
        ("pid", _uint(pid)),
    )
    payload = bytes([0x80 | len(fields)]) + b"".join(_str(key) + value for key, value in fields)
    return struct.pack(">I", len(payload)) + payload
