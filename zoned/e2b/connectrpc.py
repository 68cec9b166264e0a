"""The Connect protocol as envd's clients speak it: JSON codec, no compression (pure).

https://connectrpc.com/docs/protocol: a *unary* call is a plain HTTP POST
(``Content-Type: application/json``) answered with the JSON message, or with
an error status and a JSON error body ``{"code": "not_found", "message": ...}``.
A *server stream* is a POST of ``application/connect+json`` whose body is one
*envelope* (a flags byte, a 4-byte big-endian length, the JSON message),
answered with ``200`` and a stream of envelopes: messages (flags 0), then one
end-of-stream envelope (flags ``0x02``) holding ``{}`` or ``{"error": ...}``.

Rules:

- A request body must be exactly what the call takes: for a stream, one
  uncompressed envelope whose length matches the body; for either, one JSON
  object within the size limit. Anything else is :class:`RpcError`
  ``invalid_argument`` (or ``unimplemented`` for compression), answered
  before anything is done.
- Every error the endpoint answers is an :class:`RpcError` with a Connect
  code; :data:`HTTP_STATUS` is the status a unary error gets (the mapping
  of the Connect specification).
"""

from __future__ import annotations

import struct
from typing import Final, Literal, TypeVar

import msgspec

Code = Literal[
    "canceled",
    "unknown",
    "invalid_argument",
    "deadline_exceeded",
    "not_found",
    "already_exists",
    "permission_denied",
    "resource_exhausted",
    "failed_precondition",
    "aborted",
    "out_of_range",
    "unimplemented",
    "internal",
    "unavailable",
    "data_loss",
    "unauthenticated",
]

#: The HTTP status of a unary call that ends with the code (Connect's table).
HTTP_STATUS: Final[dict[Code, int]] = {
    "canceled": 499,
    "unknown": 500,
    "invalid_argument": 400,
    "deadline_exceeded": 504,
    "not_found": 404,
    "already_exists": 409,
    "permission_denied": 403,
    "resource_exhausted": 429,
    "failed_precondition": 400,
    "aborted": 409,
    "out_of_range": 400,
    "unimplemented": 501,
    "internal": 500,
    "unavailable": 503,
    "data_loss": 500,
    "unauthenticated": 401,
}

UNARY_CONTENT_TYPE: Final = "application/json"
STREAM_CONTENT_TYPE: Final = "application/connect+json"

_HEADER = struct.Struct(">BI")
_T = TypeVar("_T")

FLAG_COMPRESSED: Final = 0x01
FLAG_END_STREAM: Final = 0x02
#: The longest error message sent (a zone's stderr may be in it).
MAX_MESSAGE_CHARS: Final = 2000


class RpcError(Exception):
    """A call that ends with a Connect error ``code`` and ``message``."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code: Code = code
        self.message = message[:MAX_MESSAGE_CHARS]

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]

    def body(self) -> bytes:
        """The JSON error object (a unary error's body, a stream's end's ``error``)."""
        return msgspec.json.encode({"code": self.code, "message": self.message})


def envelope(payload: bytes, flags: int = 0) -> bytes:
    return _HEADER.pack(flags, len(payload)) + payload


def end_of_stream(error: RpcError | None = None) -> bytes:
    """The last envelope of a server stream: success, or how it failed."""
    body = b"{}" if error is None else b'{"error":' + error.body() + b"}"
    return envelope(body, FLAG_END_STREAM)


def single_envelope(body: bytes) -> bytes:
    """The message of a server-stream request body: exactly one plain envelope."""
    if len(body) < _HEADER.size:
        raise RpcError("invalid_argument", "the request is not an enveloped message")
    flags, length = _HEADER.unpack_from(body)
    if flags & FLAG_COMPRESSED:
        raise RpcError("unimplemented", "compressed messages are not supported")
    if flags != 0:
        raise RpcError("invalid_argument", f"unexpected envelope flags {flags:#x}")
    if length != len(body) - _HEADER.size:
        raise RpcError(
            "invalid_argument",
            f"the envelope says {length} bytes, the request holds {len(body) - _HEADER.size}",
        )
    return body[_HEADER.size :]


def decode_message(payload: bytes, kind: type[_T]) -> _T:
    """A JSON message as ``kind``; ``invalid_argument`` with msgspec's reason."""
    try:
        return msgspec.json.decode(payload or b"{}", type=kind)
    except msgspec.ValidationError as exc:
        raise RpcError("invalid_argument", f"invalid message: {exc}") from None
    except msgspec.DecodeError as exc:
        raise RpcError("invalid_argument", f"the message is not JSON: {exc}") from None


def timeout_ms(value: str | None) -> int | None:
    """``Connect-Timeout-Ms``: at most 10 digits of milliseconds (None: none)."""
    if value is None:
        return None
    if not value.isdigit() or len(value) > 10:
        raise RpcError("invalid_argument", f"invalid Connect-Timeout-Ms {value[:20]!r}")
    return int(value)
