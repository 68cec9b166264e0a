"""Entries for the systemd journal over its native protocol (a datagram socket).

journald's native protocol (systemd's "Native Journal Protocol" document):
one datagram per entry on ``/run/systemd/journal/socket``; each field is
``NAME=value\\n``, or, for a value holding a newline or other binary data,
``NAME\\n`` + the value's length as 64-bit little-endian + the value + ``\\n``.
Field names are upper-case letters, digits and ``_``, not starting with
``_`` (those are the journal's own trusted fields). An entry too large for
one datagram is written to a sealed memfd whose descriptor is passed
instead (``SCM_RIGHTS``).

:func:`open_journal` says whether there is a journal: on a host without
journald (no socket) it returns None and the caller logs that; nothing
here raises at a missing or refusing journal after it was found (a send
that fails is reported by its return value).
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import re
import socket
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

JOURNAL_SOCKET: Final = Path("/run/systemd/journal/socket")
_FIELD_NAME: Final = re.compile(r"^[A-Z0-9][A-Z0-9_]{0,63}\Z")

# Priorities (syslog's).
PRIORITY_WARNING: Final = 4
PRIORITY_NOTICE: Final = 5
PRIORITY_INFO: Final = 6


def encode_entry(fields: Mapping[str, str | bytes | int]) -> bytes:
    """One journal entry in the native protocol; ValueError for a bad field name."""
    out = bytearray()
    for name, value in fields.items():
        if not _FIELD_NAME.fullmatch(name):
            raise ValueError(f"invalid journal field name {name!r}")
        data = value if isinstance(value, bytes) else str(value).encode()
        if b"\n" in data:
            out += name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out)


def decode_entry(data: bytes) -> dict[str, bytes]:
    """The fields of one native-protocol entry (for tests and tools)."""
    fields: dict[str, bytes] = {}
    position = 0
    while position < len(data):
        end = data.index(b"\n", position)
        line = data[position:end]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            fields[name.decode()] = value
            position = end + 1
        else:
            (length,) = struct.unpack("<Q", data[end + 1 : end + 9])
            start = end + 9
            fields[line.decode()] = data[start : start + length]
            position = start + length + 1
    return fields


class Journal:
    """A connection to journald's native socket (blocking sends: worker threads).

    Made by :func:`open_journal`, connected: the socket answers, or there is none.
    """

    def __init__(self, path: Path, sock: socket.socket) -> None:
        self.path = path
        self._sock = sock

    def close(self) -> None:
        self._sock.close()

    def send(self, fields: Mapping[str, str | bytes | int]) -> bool:
        """Send one entry; False (and a log line) if the journal did not take it."""
        entry = encode_entry(fields)
        try:
            self._sock.send(entry)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                log.warning("journal %s refused an entry: %s", self.path, exc)
                return False
        return self._send_memfd(entry)

    def _send_memfd(self, entry: bytes) -> bool:
        fd = os.memfd_create("zoned-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, entry)
            seals = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            rights = array.array("i", [fd])
            self._sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
            return True
        except OSError as exc:
            log.warning("journal %s refused a large entry: %s", self.path, exc)
            return False
        finally:
            os.close(fd)


def open_journal(path: Path = JOURNAL_SOCKET) -> Journal | None:
    """The journal if journald listens at ``path``, else None (with the reason logged)."""
    if not path.is_socket():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(str(path))
    except OSError as exc:
        log.info("journal socket %s does not answer: %s", path, exc)
        sock.close()
        return None
    return Journal(path, sock)
