"""The typed client of the zoned control socket (async, trio), and a sync twin.

Usage (one way to make a client: construct it, enter it)::

    async with Client("/run/zoned/zoned.sock") as client:   # path: default_socket_path()
        zone = await client.create_zone("web", vcpus=2, labels={"team": "a"})
        result = await client.exec("web", ["uname", "-r"])
        print(result.returncode, result.stdout, result.exit)
        async with contextlib.aclosing(client.watch_events()) as events:
            async for event in events:
                ...

The package, by job:

=====================================  ==========================================
:mod:`zoned.client.connection`         the socket, the hello, the reader task and
                                       reply routing; :class:`ClientError` & co.
:mod:`zoned.client.options`            process and zone options, declared once;
                                       the one builder of exec/run/create requests
:mod:`zoned.client.api`                :class:`Client`: one method per request
:mod:`zoned.client.process`            :class:`Process`, :class:`ExecResult`,
                                       :data:`OutputChunk`
:mod:`zoned.client.files`              files and trees in and out, directory
                                       listings, over exec
:mod:`zoned.client.tarstream`          a zone's tar stream, read without trust
:mod:`zoned.client.extract`            a tree from a zone written here, atomically,
                                       following nothing the zone made
:mod:`zoned.client.images`             images: pull and import (with progress),
                                       list, inspect, remove, prune, sizes
:mod:`zoned.client.sync`               :class:`SyncClient`, for scripts
=====================================  ==========================================

Rules:

- One connection per :class:`Client`. Entering it opens the unix socket and
  does the ``hello`` handshake; leaving it closes the connection, which is
  also what ends the daemon's side of every stream still running on it.
- One reader task per client, in a nursery the client owns, reads every reply
  and hands it to the request waiting for its ``id``. Requests and streams may
  therefore run concurrently on one client from many tasks; ids are allocated
  incrementally from 1.
- A reply is one of: the expected record, or an ``error_reply``, which is
  raised as the typed :class:`~zoned.errors.ZonedError` of its code
  (:func:`~zoned.errors.error_from_code`). Failures that the daemon did not
  report are :class:`ClientError`: :class:`DaemonUnavailable` (no socket, no
  permission to open it), :class:`ConnectionLost` (the daemon went away or
  broke the connection, or :meth:`Client.abort` was called) and
  :class:`ProtocolError` (a reply that makes no sense).
- What the daemon sends is handed over as the wire record itself
  (:class:`~zoned.protocol.ZoneInfo`, :class:`~zoned.protocol.ExecExit` in
  ``ExecResult.exit``, :class:`~zoned.protocol.ExecOutput` as an output
  chunk): a field the protocol gains reaches callers with no edit here.
- Streams (:meth:`Client.watch_events`, :meth:`Client.console_log`) are async
  generators. Close one that you leave early (``contextlib.aclosing``): until
  then its replies queue up, and once its small buffer is full the reader
  waits for it, stalling every other request on the connection. The protocol
  has no "stop this stream" request: the daemon keeps sending an abandoned
  stream's replies (the client drops them) until the connection closes, so a
  long-lived program that starts and stops watches should give each its own
  :class:`Client`.
- A request is written whole or not at all: a cancellation already pending
  stops it before the first byte, and the write itself is shielded (requests
  are small). Cancelling the wait for a reply is always safe; the late reply
  is dropped. :meth:`Client.abort` breaks the connection at once, waking even
  a shielded write to a daemon that does not read.
- Callers own timeouts: wrap calls in ``trio.move_on_after`` / ``fail_after``.

:class:`SyncClient` is for scripts: each method runs ``trio.run``, opening a
connection, doing one request and closing it.
"""

from __future__ import annotations

from zoned.client.api import Client
from zoned.client.connection import (
    DEFAULT_SOCKET,
    SOCKET_ENV,
    ClientError,
    ConnectionLost,
    DaemonUnavailable,
    ProtocolError,
    default_socket_path,
)
from zoned.client.extract import TreeSummary
from zoned.client.files import (
    DEFAULT_MAX_ENTRIES,
    DEFAULT_MAX_FILE,
    DirectoryListing,
    DirEntry,
    FileTooLarge,
)
from zoned.client.images import ProgressCallback
from zoned.client.options import (
    CreateOptions,
    ExecOptions,
    ProcessOptions,
    RunExecOptions,
    RunOptions,
    RunProcessOptions,
    ZoneOptions,
)
from zoned.client.process import ExecResult, OutputChunk, Process
from zoned.client.sync import SyncClient
from zoned.client.tarstream import UnsafeTree

__all__ = [
    "DEFAULT_MAX_ENTRIES",
    "DEFAULT_MAX_FILE",
    "DEFAULT_SOCKET",
    "SOCKET_ENV",
    "Client",
    "ClientError",
    "ConnectionLost",
    "CreateOptions",
    "DaemonUnavailable",
    "DirEntry",
    "DirectoryListing",
    "ExecOptions",
    "ExecResult",
    "FileTooLarge",
    "OutputChunk",
    "Process",
    "ProcessOptions",
    "ProgressCallback",
    "ProtocolError",
    "RunExecOptions",
    "RunOptions",
    "RunProcessOptions",
    "SyncClient",
    "TreeSummary",
    "UnsafeTree",
    "ZoneOptions",
    "default_socket_path",
]
