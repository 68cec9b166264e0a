"""Other users on the host, for tests: a control-socket peer with another uid,
and a process with a zone's QEMU uid.

The venv may live where another uid cannot read it (under ``/root``), so
what runs as another uid is Debian's ``/usr/bin/python3`` with the standard
library only:

- :func:`relay_as` runs a relay as a given uid, gid and supplementary
  groups: it listens on a socket of its own and connects every client it
  accepts to the daemon, as that uid. The daemon sees the relay's
  ``SO_PEERCRED`` (and its groups in ``/proc``); the test talks through it
  with the real client, as root.
- :func:`probe_as` runs a few file and process operations as a given uid
  and gid with no supplementary groups (what a zone's QEMU is) and reports
  each one's outcome.

No account is created: the kernel needs none for a uid, and the daemon
decides by the numbers it is given.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SYSTEM_PYTHON = "/usr/bin/python3"

RELAY = r"""
import socket, sys, threading
listen, target = sys.argv[1], sys.argv[2]
server = socket.socket(socket.AF_UNIX)
server.bind(listen)
server.listen(16)
print("ready", flush=True)

def pump(source, sink):
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock, how in ((sink, socket.SHUT_WR), (source, socket.SHUT_RD)):
            try:
                sock.shutdown(how)
            except OSError:
                pass

while True:
    client, _ = server.accept()
    upstream = socket.socket(socket.AF_UNIX)
    try:
        upstream.connect(target)
    except OSError as exc:
        print("connect failed:", exc, flush=True)
        client.close()
        continue
    threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
    threading.Thread(target=pump, args=(upstream, client), daemon=True).start()
"""


def unused_uids(count: int, start: int = 59900) -> list[int]:
    """``count`` uids below 60000 that no account of the host has."""
    found: list[int] = []
    uid = start
    while len(found) < count:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            found.append(uid)
        uid += 1
    return found


def _demote(uid: int, gid: int, groups: Sequence[int]) -> Any:
    def demote() -> None:
        os.setgroups(list(groups))
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)

    return demote


@contextlib.contextmanager
def relay_as(uid: int, gid: int, groups: Sequence[int], daemon_socket: Path) -> Iterator[Path]:
    """A socket that reaches the daemon as ``uid`` (with ``gid`` and ``groups``).

    The daemon's socket must be reachable for that uid: its directories
    traversable, the socket in one of ``groups``.
    """
    directory = Path(tempfile.mkdtemp(prefix="zt-peer-", dir="/tmp"))
    os.chown(directory, uid, gid)
    path = directory / "relay.sock"
    relay = subprocess.Popen(
        [SYSTEM_PYTHON, "-I", "-c", RELAY, str(path), str(daemon_socket)],
        preexec_fn=_demote(uid, gid, groups),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert relay.stdout is not None
        line = relay.stdout.readline()
        assert line == "ready\n", f"the relay as uid {uid} did not start: {line}"
        yield path
    finally:
        relay.kill()
        relay.wait()
        path.unlink(missing_ok=True)
        directory.rmdir()


PROBE = r"""
import errno, json, os, socket, sys

def attempt(kind, target):
    try:
        if kind == "read":
            with open(target, "rb") as f:
                f.read(4096)
        elif kind == "open":
            os.close(os.open(target, os.O_RDONLY))
        elif kind == "write":
            os.close(os.open(target, os.O_WRONLY))
        elif kind == "list":
            os.listdir(target)
        elif kind == "create":
            os.close(os.open(os.path.join(target, "planted"), os.O_WRONLY | os.O_CREAT, 0o600))
        elif kind == "connect":
            s = socket.socket(socket.AF_UNIX)
            s.connect(target)
            s.close()
        elif kind == "signal":
            os.kill(int(target), 0)
        else:
            raise ValueError(kind)
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))

print(json.dumps([attempt(kind, target) for kind, target in json.loads(sys.argv[1])]))
"""


@dataclass(frozen=True)
class Attempt:
    """One operation to try: ``read`` a file, ``open`` it for reading (for
    ``/proc/<pid>/mem``, whose first page is never mapped), open it for
    ``write``, ``list`` a directory, ``create`` a file in it, ``connect`` to a
    unix socket, ``signal`` a pid (signal 0)."""

    kind: str
    target: str


def probe_as(uid: int, gid: int, attempts: Sequence[Attempt]) -> list[str]:
    """Each attempt's outcome as ``uid``:``gid`` with no groups: ``ok`` or the errno's name."""
    result = subprocess.run(
        [SYSTEM_PYTHON, "-I", "-c", PROBE, json.dumps([(a.kind, a.target) for a in attempts])],
        preexec_fn=_demote(uid, gid, []),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    outcomes: list[str] = json.loads(result.stdout)
    return outcomes


# Runs under Debian's /usr/bin/python3 as "nobody" (the venv may live where
# nobody cannot read it), so the hello is msgpack written out by hand:
# {"type": "hello", "id": 1, "versions": [1]}.
HELLO_SCRIPT = """
import socket, struct, sys
hello = bytes([0x83, 0xa4]) + b"type" + bytes([0xa5]) + b"hello" + bytes([0xa2]) + b"id"
hello += bytes([0x01, 0xa8]) + b"versions" + bytes([0x91, 0x01])
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(struct.pack(">I", len(hello)) + hello)
reply = b""
while chunk := s.recv(65536):
    reply += chunk
print(reply)
"""


def hello_as_nobody(daemon_socket: Path) -> str:
    """Say hello to the daemon as ``nobody`` (no group of the daemon's); what it answers,
    as printed by the peer (its raw reply)."""
    nobody = pwd.getpwnam("nobody")
    result = subprocess.run(
        [SYSTEM_PYTHON, "-c", HELLO_SCRIPT, str(daemon_socket)],
        preexec_fn=_demote(nobody.pw_uid, nobody.pw_gid, []),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout
