"""Files and directory trees in and out of a zone, composed over exec.

Nothing here is a protocol request of its own: each transfer is a process in
the zone's workload root (``cat``, ``tar``, a short ``sh`` script) whose
stdin or stdout carries the bytes, so it has exec's flow control end to end.
A helper that fails raises :class:`~zoned.errors.InvalidRequest` with its
stderr. Output taken out of a zone is bounded by ``max_bytes``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

from zoned.client.process import ExecResult, Process
from zoned.errors import InvalidRequest

if TYPE_CHECKING:
    from typing import Unpack

    from zoned.client.options import ProcessOptions

#: Largest file or tree :meth:`FileTransfer.get_file` and friends take by default.
DEFAULT_MAX_FILE = 1024 * 1024 * 1024
#: How much of a failed helper's stderr becomes the error message.
_MAX_ERROR_BYTES = 4096

# Writes stdin to a temporary name beside the target, then renames it: the
# file appears whole or not at all. $1 path, $2 octal mode, $3 uid, $4 gid.
_PUT_SCRIPT = (
    'tmp="$1.zoned-put.$$" && cat > "$tmp" && chmod "$2" "$tmp" && chown "$3:$4" "$tmp"'
    ' && mv -f "$tmp" "$1" || { rm -f "$tmp"; exit 1; }'
)


class FileTransfer(ABC):
    """The file methods of :class:`~zoned.client.Client`, over its :meth:`exec_process`."""

    @abstractmethod
    def exec_process(
        self, zone: str, argv: Sequence[str], **options: Unpack[ProcessOptions]
    ) -> AbstractAsyncContextManager[Process]: ...

    async def put_file(
        self,
        zone: str,
        path: str,
        data: bytes | AsyncIterable[bytes],
        *,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
    ) -> int:
        """Write a file in the zone's workload root, atomically; returns its size.

        ``data`` is bytes or an async iterable of chunks (streamed, never held
        whole). The file appears under its name only once complete, with
        ``mode`` and owner ``uid``:``gid``.
        """
        argv = [
            "sh",
            "-c",
            _PUT_SCRIPT,
            "zoned-put",
            path,
            f"{mode & 0o7777:o}",
            str(uid),
            str(gid),
        ]
        async with self.exec_process(zone, argv, stdin=True) as process:
            sent = await _feed(process, data)
            await _checked(process, f"cannot write {path!r} in zone {zone!r}")
        return sent

    async def get_file(self, zone: str, path: str, *, max_bytes: int = DEFAULT_MAX_FILE) -> bytes:
        """A file of the zone's workload root; :class:`InvalidRequest` beyond ``max_bytes``."""
        data = bytearray()
        async for chunk in self.stream_file(zone, path, max_bytes=max_bytes):
            data.extend(chunk)
        return bytes(data)

    async def stream_file(
        self, zone: str, path: str, *, max_bytes: int = DEFAULT_MAX_FILE
    ) -> AsyncGenerator[bytes, None]:
        """A file of the zone's workload root as chunks, as they come."""
        async for chunk in self._stream_command(
            zone, ["cat", "--", path], f"cannot read {path!r} in zone {zone!r}", max_bytes
        ):
            yield chunk

    async def put_tree(self, zone: str, directory: str, tar_stream: AsyncIterable[bytes]) -> None:
        """Unpack a tar stream into ``directory`` of the zone (created if missing)."""
        argv = ["sh", "-c", 'mkdir -p -- "$1" && exec tar -x -f - -C "$1"', "zoned-put", directory]
        async with self.exec_process(zone, argv, stdin=True) as process:
            await _feed(process, tar_stream)
            await _checked(process, f"cannot unpack into {directory!r} in zone {zone!r}")

    async def stream_tree(
        self, zone: str, directory: str, *, max_bytes: int = DEFAULT_MAX_FILE
    ) -> AsyncGenerator[bytes, None]:
        """``directory`` of the zone as a tar stream, as it comes."""
        async for chunk in self._stream_command(
            zone,
            ["tar", "-c", "-f", "-", "-C", directory, "."],
            f"cannot pack {directory!r} in zone {zone!r}",
            max_bytes,
        ):
            yield chunk

    async def is_directory(self, zone: str, path: str) -> bool:
        async with self.exec_process(zone, ["test", "-d", path]) as process:
            result = await process.wait()
        return result.exit.exit_code == 0

    async def _stream_command(
        self, zone: str, argv: list[str], failure: str, max_bytes: int
    ) -> AsyncGenerator[bytes, None]:
        received = 0
        errors = bytearray()
        async with self.exec_process(zone, argv) as process:
            async for chunk in process:
                if chunk.stream == "stderr":
                    _keep_some(errors, chunk.data)
                    continue
                received += len(chunk.data)
                if received > max_bytes:
                    await process.signal(9)
                    await process.wait()
                    raise InvalidRequest(f"{failure}: larger than the limit of {max_bytes} bytes")
                yield chunk.data
        assert process.result is not None
        _raise_on_failure(process.result, errors, failure)


async def _feed(process: Process, data: bytes | AsyncIterable[bytes]) -> int:
    sent = 0
    if isinstance(data, bytes):
        await process.write(data)
        sent = len(data)
    else:
        async for chunk in data:
            await process.write(chunk)
            sent += len(chunk)
    await process.close_stdin()
    return sent


async def _checked(process: Process, failure: str) -> ExecResult:
    errors = bytearray()
    async for chunk in process:
        _keep_some(errors, chunk.data)
    result = process.result
    assert result is not None
    _raise_on_failure(result, errors, failure)
    return result


def _keep_some(errors: bytearray, data: bytes) -> None:
    """The start of a helper's complaints, bounded: the zone decides how much it writes."""
    errors.extend(data[: max(0, _MAX_ERROR_BYTES - len(errors))])


def _raise_on_failure(result: ExecResult, stderr: bytes | bytearray, failure: str) -> None:
    """A helper command that failed: its stderr (or status) as the error."""
    if result.returncode != 0:
        detail = bytes(stderr).decode(errors="replace").strip() or f"status {result.returncode}"
        raise InvalidRequest(f"{failure}: {detail}")
