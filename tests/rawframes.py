"""One end of a framed connection, spoken frame by frame: tests play a client or an
agent with it and can also send what the other end must not accept."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import trio

from zoned import protocol as p

Sent = TypeVar("Sent", bound=p.Message)
Received = TypeVar("Received", bound=p.Message)


class FrameStream(Generic[Sent, Received]):
    """Frames of at most ``max_frame`` bytes on ``stream``; what arrives is ``decode``-d."""

    def __init__(
        self, stream: trio.SocketStream, max_frame: int, decode: Callable[[bytes], Received]
    ) -> None:
        self.stream = stream
        self.max_frame = max_frame
        self.decoder = p.FrameDecoder(max_frame)
        self._decode = decode

    async def send(self, message: Sent) -> None:
        await self.stream.send_all(p.encode_frame(message, self.max_frame))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive(self) -> Received:
        while (frame := self.decoder.next_frame()) is None:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError("the other end closed the connection")
            self.decoder.feed(data)
        return self._decode(frame)
