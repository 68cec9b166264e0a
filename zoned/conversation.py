"""The rules of one control-socket connection, without IO (pure).

:class:`Conversation` takes the bytes a client sent and says what to do
with each message: send a reply, start a request, forward stream input, or
close. :mod:`zoned.server` does the IO; every rule is here.

States and rules::

                 hello            other request        stream input     bad framing
  refusing       close: denied    close: denied        close: denied    close: error
  greeting       greet -> serving refuse               refuse           close: error
  serving        refuse           start (or refuse)    forward/refuse   close: error
  closed         (nothing: the connection is done)

- A caller who is not authorised (not root, not in the zoned group) gets
  ``permission_denied`` to its first message and the connection closes.
- The first request must be ``hello``; a version both sides speak is
  chosen, else ``unsupported_version`` and the client may try again. A
  second ``hello`` is refused.
- At most ``max_inflight`` requests run at once per connection; one more
  is refused (``invalid_request``) and nothing starts.
- Requests that take stream input (``exec``, ``run_zone``,
  ``import_image``) are keyed by their id while they run: a second one with
  a running id is refused.
- Stream input is not a request: it carries the id of a running request
  that takes it and is forwarded to it (``exec_input``, ``exec_signal``,
  ``exec_resize`` to an ``exec``/``run_zone``; ``image_data`` to an
  ``import_image``); for any other id, or the other kind, it is refused.
- A frame that breaks the framing (oversize, zero length) closes the
  connection after an error with id 0: the byte stream can no longer be
  trusted. A well-framed message that does not decode is refused with its
  id when that can be read, and the connection carries on.
- Refusals use the request's id and change nothing.

The server calls :meth:`Conversation.finished` when a started request's
handler returns; that frees its in-flight slot and its id.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Final, Literal

from zoned import __version__
from zoned import protocol as p
from zoned.errors import InvalidRequest, PermissionDenied, ZonedError

#: Requests one connection may have running at once.
MAX_INFLIGHT: Final = 64
#: What the daemon calls itself in its hello reply.
SERVER_NAME: Final = f"zoned/{__version__}"
#: Requests that receive stream input while they run.
TAKES_INPUT: Final = (p.Exec, p.RunZone, p.ImportImage)
#: Stream input, by the kind of request it feeds.
_EXEC_INPUT: Final = (p.ExecInput, p.ExecSignal, p.ExecResize)
_IMPORT_INPUT: Final = (p.ImageData,)

State = Literal["refusing", "greeting", "serving", "closed"]


@dataclass(frozen=True)
class Respond:
    """Send ``reply``; the connection carries on."""

    reply: p.Reply


@dataclass(frozen=True)
class RespondAndClose:
    """Send ``reply`` if the client still listens, then close the connection.

    ``denied`` is the frame of a caller refused for who it is (for the audit
    trail), None otherwise.
    """

    reply: p.Reply
    denied: bytes | None = None


@dataclass(frozen=True)
class Start:
    """Run ``request``'s handler; ``takes_input`` says it receives stream input."""

    request: p.Request
    takes_input: bool


@dataclass(frozen=True)
class Forward:
    """Give stream input to the running request with the same id."""

    message: p.StreamInput


Action = Respond | RespondAndClose | Start | Forward


class Conversation:
    """One connection's state: greeted yet, what runs, what the next frame means."""

    def __init__(
        self,
        *,
        authorised: bool,
        uid: int,
        max_frame: int,
        max_inflight: int = MAX_INFLIGHT,
    ) -> None:
        self.state: State = "greeting" if authorised else "refusing"
        self._uid = uid
        self._decoder = p.FrameDecoder(max_frame)
        self._max_inflight = max_inflight
        self._inflight = 0
        # Running requests that take input, by id: True for an import.
        self._streams: dict[int, bool] = {}

    def receive_data(self, data: bytes) -> None:
        """Bytes the client sent; :meth:`next_action` then says what they mean."""
        if self.state == "closed":
            return
        # A bad header breaks the decoder for good: next_action reports it.
        with contextlib.suppress(p.FrameError):
            self._decoder.feed(data)

    def next_action(self) -> Action | None:
        """What the next complete message asks for; None until more bytes arrive."""
        if self.state == "closed":
            return None
        try:
            frame = self._decoder.next_frame()
        except p.FrameError as exc:
            return self._close(p.error_reply(0, exc))
        if frame is None:
            return None
        if self.state == "refusing":
            denied = PermissionDenied(
                f"uid {self._uid} may not use zoned: only root and members of the zoned group may"
            )
            reply = p.error_reply(p.peek_request_id(frame) or 0, denied)
            self.state = "closed"
            return RespondAndClose(reply, denied=frame)
        try:
            request = p.decode_request(frame)
        except InvalidRequest as exc:
            return Respond(p.error_reply(p.peek_request_id(frame) or 0, exc))
        if self.state == "greeting":
            return self._greet(request)
        return self._serve(request)

    def finished(self, request: p.Request) -> None:
        """A started request's handler returned (in any way)."""
        self._inflight -= 1
        if isinstance(request, TAKES_INPUT):
            self._streams.pop(request.id, None)

    # ------------------------------------------------------------------ rules

    def _close(self, reply: p.Reply) -> RespondAndClose:
        self.state = "closed"
        return RespondAndClose(reply)

    def _greet(self, request: p.Request) -> Action:
        if not isinstance(request, p.Hello):
            return _refuse(request.id, "the first request must be hello")
        try:
            version = p.negotiate_version(request.versions)
        except ZonedError as exc:
            return Respond(p.error_reply(request.id, exc))
        self.state = "serving"
        return Respond(p.HelloReply(id=request.id, version=version, server=SERVER_NAME))

    def _serve(self, request: p.Request) -> Action:
        if isinstance(request, p.Hello):
            return _refuse(request.id, "hello already done")
        if isinstance(request, _EXEC_INPUT + _IMPORT_INPUT):
            is_import = self._streams.get(request.id)
            if is_import is None:
                return _refuse(
                    request.id, f"no running exec or import with id {request.id} on this connection"
                )
            if is_import != isinstance(request, _IMPORT_INPUT):
                running = "an import" if is_import else "an exec"
                return _refuse(request.id, f"request {request.id} is {running}: not its input")
            return Forward(request)
        takes_input = isinstance(request, TAKES_INPUT)
        if takes_input and request.id in self._streams:
            return _refuse(request.id, f"id {request.id} is already running")
        if self._inflight >= self._max_inflight:
            return _refuse(request.id, f"too many requests in flight (limit {self._max_inflight})")
        self._inflight += 1
        if takes_input:
            self._streams[request.id] = isinstance(request, p.ImportImage)
        return Start(request, takes_input)


def _refuse(request_id: int, message: str) -> Respond:
    return Respond(p.error_reply(request_id, InvalidRequest(message)))
