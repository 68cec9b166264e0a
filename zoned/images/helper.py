"""The image helper: one import or pull, in a process with the rights conversion needs.

Converting an image needs more than the daemon's sandbox allows
(``systemd/zoned.service``): owners, modes and device nodes kept in the
staging tree (``CAP_CHOWN``, ``CAP_FOWNER``, ``CAP_MKNOD``, ``CAP_SETFCAP``,
``CAP_DAC_OVERRIDE``, setuid files), the network for skopeo. The daemon
does not widen its own sandbox for that: every import runs here instead,
one helper process per import, either

- a child of the daemon (``python -m zoned.images.helper --store DIR``; the
  default, and what tests and hosts without systemd use), or
- a socket-activated service (``systemd/zoned-image-helper.socket`` and
  ``zoned-image-helper@.service``, ``Accept=yes``), which the daemon
  reaches at ``image_helper_socket``: the same program with its stdin and
  stdout on the accepted connection.

The conversation, on stdin/stdout, in frames (a 4-byte big-endian length,
then one msgpack message): the daemon sends one :class:`HelperRequest`; the
helper answers :class:`HelperProgress` messages (at most a few a second,
and one per phase change), then one :class:`HelperImported` or
:class:`HelperFailed`, and exits. End of file on stdin before that (the
daemon gave up: its client went away) cancels the import: its tools are
killed, nothing of it is kept. Both ends are the same build of zoned (the
daemon starts the helper installed beside it), and only root reaches the
helper's socket; still every frame is bounded.

An :class:`UploadedArchive` is a file the daemon wrote into the store's
scratch area from what a client sent (:mod:`zoned.images.upload`); the
helper never opens a path a client named.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import BinaryIO, Final

import msgspec

from zoned.errors import InternalError, ZonedError
from zoned.images.layers import LayerLimits
from zoned.images.progress import Cancel, ImportProgress
from zoned.images.sources import DockerArchiveSource, OciLayoutSource, RegistrySource
from zoned.images.store import ImageStore, ImportResult, StoreLimits
from zoned.images.upload import archive_kind, unpack_layout

#: The largest frame either end sends (an ImportResult with a large image's accounts fits).
MAX_HELPER_FRAME: Final = 64 * 1024 * 1024
#: Progress reports at most this often (phase changes always).
PROGRESS_INTERVAL_S: Final = 0.25
_HEADER = 4


class UploadedArchive(msgspec.Struct, frozen=True, kw_only=True, tag="uploaded-archive"):
    """An archive the daemon received from a client and wrote to ``path`` (in the store)."""

    path: str
    #: Which image of the archive (an OCI ``ref.name`` or a docker ``repo:tag``).
    reference: str | None = None


class HelperRequest(msgspec.Struct, frozen=True, kw_only=True, tag="import"):
    source: RegistrySource | UploadedArchive
    platform: str | None = None
    tags: list[str] = msgspec.field(default_factory=list)


class HelperProgress(msgspec.Struct, frozen=True, kw_only=True, tag="progress"):
    progress: ImportProgress


class HelperImported(msgspec.Struct, frozen=True, kw_only=True, tag="imported"):
    result: ImportResult


class HelperFailed(msgspec.Struct, frozen=True, kw_only=True, tag="failed"):
    code: str
    message: str


HelperReply = HelperProgress | HelperImported | HelperFailed

_request_decoder: Final = msgspec.msgpack.Decoder(HelperRequest)
_reply_decoder: Final = msgspec.msgpack.Decoder(HelperReply)
_encoder: Final = msgspec.msgpack.Encoder()


def frame(message: HelperRequest | HelperReply) -> bytes:
    payload = _encoder.encode(message)
    if len(payload) > MAX_HELPER_FRAME:
        raise InternalError(f"image helper message of {len(payload)} bytes is too large")
    return len(payload).to_bytes(_HEADER, "big") + payload


def frame_length(header: bytes) -> int:
    """The payload length a frame header announces; InternalError if out of bounds."""
    length = int.from_bytes(header, "big")
    if not 1 <= length <= MAX_HELPER_FRAME:
        raise InternalError(f"image helper frame of {length} bytes is out of bounds")
    return length


def decode_reply(payload: bytes) -> HelperReply:
    try:
        return _reply_decoder.decode(payload)
    except (msgspec.DecodeError, ValueError) as exc:
        raise InternalError(f"the image helper sent a bad message: {exc}") from None


def _read_exactly(stream: BinaryIO, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def read_request(stream: BinaryIO) -> HelperRequest:
    header = _read_exactly(stream, _HEADER)
    if header is None:
        raise InternalError("no request: the daemon closed the connection")
    payload = _read_exactly(stream, frame_length(header))
    if payload is None:
        raise InternalError("the request was cut short")
    try:
        return _request_decoder.decode(payload)
    except (msgspec.DecodeError, ValueError) as exc:
        raise InternalError(f"bad request: {exc}") from None


class _Reporter:
    """Progress frames to the daemon, throttled; a broken pipe cancels the import."""

    def __init__(self, out: BinaryIO, cancel: Cancel) -> None:
        self.out = out
        self.cancel = cancel
        self._last_phase = ""
        self._last_at = 0.0

    def send(self, message: HelperReply) -> None:
        try:
            self.out.write(frame(message))
            self.out.flush()
        except (BrokenPipeError, ConnectionError, ValueError):
            self.cancel.set()  # nobody listens any more

    def progress(self, event: ImportProgress) -> None:
        now = time.monotonic()
        if event.phase == self._last_phase and now - self._last_at < PROGRESS_INTERVAL_S:
            return
        self._last_phase, self._last_at = event.phase, now
        self.send(HelperProgress(progress=event))


def _watch_for_eof(stream: BinaryIO, cancel: Cancel) -> None:
    """Cancel the import once the daemon closes our stdin (it gave up)."""
    try:
        while stream.read(4096):
            pass
    except OSError:
        pass
    cancel.set()


def run_import(
    store: ImageStore, request: HelperRequest, reporter: _Reporter, cancel: Cancel
) -> ImportResult:
    """Carry out one request against ``store`` (blocking)."""
    source = request.source

    def run(what: RegistrySource | DockerArchiveSource | OciLayoutSource) -> ImportResult:
        return store.import_image(
            what,
            platform=request.platform,
            tags=request.tags,
            progress=reporter.progress,
            cancel=cancel,
        )

    if isinstance(source, RegistrySource):
        return run(source)
    image = source.reference or "the uploaded archive"
    archive = Path(source.path)
    if archive_kind(image, archive) == "docker-archive":
        return run(DockerArchiveSource(path=str(archive), reference=source.reference))
    with store.operation(image) as op:
        layout = unpack_layout(image, archive, op.path / "layout")
        return run(OciLayoutSource(path=str(layout), reference=source.reference))


def store_for(root: Path, max_image_mib: int) -> ImageStore:
    """The image store as the daemon and its helper open it: blobs bounded by the config."""
    max_bytes = max_image_mib * 1024 * 1024
    return ImageStore(
        root,
        limits=StoreLimits(
            layers=LayerLimits(max_tar_bytes=max(max_bytes, LayerLimits().max_tar_bytes)),
            max_blob_bytes=max_bytes,
        ),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zoned-image-helper", description=__doc__)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--store", type=Path, help="the image store directory")
    where.add_argument("--config", type=Path, help="zoned.toml: its image_store and limits")
    parser.add_argument("--max-image-mib", type=int, default=None)
    args = parser.parse_args(argv)
    root: Path = args.store
    max_image_mib = args.max_image_mib
    if args.config is not None:
        from zoned.config import load_config

        config = load_config(args.config)
        root = Path(config.image_store)
        max_image_mib = max_image_mib or config.max_image_mib
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    # Nothing else may write to the channel: stray prints go to stderr (the log).
    sys.stdout = sys.stderr
    cancel = Cancel()
    reporter = _Reporter(stdout, cancel)
    try:
        request = read_request(stdin)
        threading.Thread(target=_watch_for_eof, args=(stdin, cancel), daemon=True).start()
        store = store_for(root, max_image_mib or 16384)
        result = run_import(store, request, reporter, cancel)
    except ZonedError as exc:  # ImageError included: its message names the image
        reporter.send(HelperFailed(code=exc.code, message=exc.message))
        return 1
    except OSError as exc:
        reporter.send(HelperFailed(code="internal", message=f"image helper: {exc}"))
        return 1
    except Exception:
        traceback.print_exc()
        reporter.send(HelperFailed(code="internal", message="the image helper failed; see its log"))
        return 1
    reporter.send(HelperImported(result=result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
