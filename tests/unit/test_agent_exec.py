"""The agent's exec engine, for real: an agent channel in a subprocess, on a socketpair.

The agent reaps every child with ``waitpid(-1)``, so it cannot run inside
pytest's own process: each test starts ``zoned.agent.channel.serve_fd`` in a
subprocess, hands it one end of a socketpair as its "port" and plays the host
on the other end with :mod:`zoned.protocol` frames. The processes it runs are
real processes on this host.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.procfs import each_process
from tests.waiting import wait_until
from zoned import protocol as p
from zoned.agent.cgroups import NO_CGROUPS_ERROR
from zoned.agent.execs import DEFAULT_PATH
from zoned.agent.sandbox import DEFAULT_CAPABILITY_MASK
from zoned.agent.seccomp import DENIED

#: Generous: the host has 2 CPUs that other work shares. Not a timing assertion.
DEADLINE_S = 60.0
_AGENT_SCRIPT = (
    "import sys\nfrom zoned.agent.channel import serve_fd\n"
    "serve_fd(int(sys.argv[1]), cgroup_root=sys.argv[2])\n"
)


@dataclass
class ExecRecord:
    """What the host saw of one exec_id."""

    pid: int | None = None
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    exit: p.AgentExecExit | None = None
    #: Output bytes received, and credit granted beyond the initial window.
    output_bytes: int = 0
    granted: int = 0
    input_credit: int = 0
    #: Types of every message, in order.
    kinds: list[str] = field(default_factory=list)


class Host:
    """The host end of the agent channel, synchronous, checking the agent's promises."""

    def __init__(self, sock: socket.socket, console: Path) -> None:
        self.sock = sock
        self.console = console
        self.decoder = p.FrameDecoder(p.AGENT_MAX_FRAME)
        self.records: dict[int, ExecRecord] = {}
        self.auto_credit = True
        self.pids: list[int] = []
        self.hellos = 0
        #: The highest heartbeat seq answered.
        self.beats = 0

    def send(self, message: p.HostToAgent) -> None:
        self.sock.sendall(p.encode_frame(message, p.AGENT_MAX_FRAME))

    def start(self, exec_id: int, argv: list[str], **fields: object) -> ExecRecord:
        record = self.records[exec_id] = ExecRecord()
        self.send(p.AgentExecStart(exec_id=exec_id, argv=argv, **fields))  # type: ignore[arg-type]
        return record

    def receive(self, deadline: float) -> p.AgentToHost | None:
        """One message, or None when ``deadline`` passed first."""
        while (payload := self.decoder.next_frame()) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                return None
            if not data:
                raise ConnectionError(f"the agent closed the channel\n{self.console_text()}")
            self.decoder.feed(data)
        message = p.decode_from_agent(payload)
        self._observe(message)
        return message

    def _observe(self, message: p.AgentToHost) -> None:
        if isinstance(message, p.AgentHello):
            self.hellos += 1
            return
        if isinstance(message, p.HeartbeatReply):
            self.beats = max(self.beats, message.seq)
            return
        record = self.records[message.exec_id]
        assert record.exit is None, f"{message!r} after the exit of exec {message.exec_id}"
        record.kinds.append(type(message).__name__)
        if isinstance(message, p.AgentExecStarted):
            assert record.pid is None
            record.pid = message.pid
            self.pids.append(message.pid)
        elif isinstance(message, p.AgentExecOutput):
            assert record.pid is not None, "output before AgentExecStarted"
            (record.stdout if message.stream == "stdout" else record.stderr).extend(message.data)
            record.output_bytes += len(message.data)
            assert record.output_bytes <= p.EXEC_OUTPUT_WINDOW + record.granted, (
                f"the agent sent {record.output_bytes} bytes of output,"
                f" only {p.EXEC_OUTPUT_WINDOW + record.granted} were credited"
            )
            if self.auto_credit:
                self.credit(message.exec_id, len(message.data))
        elif isinstance(message, p.AgentExecInputCredit):
            record.input_credit += message.bytes
        elif isinstance(message, p.AgentExecExit):
            assert re.fullmatch(r"[ -~]*", message.error)
            record.exit = message

    def credit(self, exec_id: int, n: int) -> None:
        self.records[exec_id].granted += n
        self.send(p.AgentExecCredit(exec_id=exec_id, bytes=n))

    def pump_until(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not done():
            if self.receive(deadline) is None:
                pytest.fail(f"timed out waiting for {what}\n{self.console_text()}", pytrace=False)

    def wait_exit(self, exec_id: int) -> p.AgentExecExit:
        record = self.records[exec_id]
        self.pump_until(lambda: record.exit is not None, f"the exit of exec {exec_id}")
        assert record.exit is not None
        return record.exit

    def wait_started(self, exec_id: int) -> int:
        record = self.records[exec_id]
        self.pump_until(
            lambda: record.pid is not None or record.exit is not None, f"exec {exec_id} to start"
        )
        assert record.pid is not None, record.exit
        return record.pid

    def run(self, exec_id: int, argv: list[str], **fields: object) -> ExecRecord:
        record = self.start(exec_id, argv, **fields)
        self.wait_exit(exec_id)
        return record

    def write_input(self, exec_id: int, data: bytes, *, eof: bool = True) -> None:
        """Send ``data`` within the input window, then ``eof``, serving messages meanwhile."""
        record = self.records[exec_id]
        sent = 0
        deadline = time.monotonic() + DEADLINE_S
        while sent < len(data):
            outstanding = sent - record.input_credit
            chunk = data[sent : sent + min(p.MAX_EXEC_CHUNK, p.EXEC_INPUT_WINDOW - outstanding)]
            if chunk:
                self.send(p.AgentExecInput(exec_id=exec_id, data=chunk))
                sent += len(chunk)
                continue
            assert record.exit is None, "the process ended before reading its input"
            if self.receive(deadline) is None:
                pytest.fail(f"input stalled at {sent} bytes\n{self.console_text()}", pytrace=False)
        if eof:
            self.send(p.AgentExecInput(exec_id=exec_id, eof=True))

    def console_text(self) -> str:
        text = self.console.read_text(errors="replace") if self.console.exists() else ""
        return f"--- agent console ---\n{text[-3000:]}"


def _alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _group_members(pgid: int) -> list[int]:
    """Live processes of process group ``pgid``."""
    members = []
    for pid, stat in each_process("stat"):
        fields = stat.rpartition(b")")[2].split()
        if int(fields[2]) == pgid and fields[0] != b"Z":
            members.append(pid)
    return members


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[Host, subprocess.Popen[bytes]]]:
    with _running_agent(tmp_path) as running:
        yield running


@contextlib.contextmanager
def _running_agent(
    tmp_path: Path, cgroup_root: str = ""
) -> Iterator[tuple[Host, subprocess.Popen[bytes]]]:
    """An agent serving a socketpair in a subprocess (cgroups under ``cgroup_root``)."""
    host_sock, agent_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    console = tmp_path / "console.log"
    with console.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", _AGENT_SCRIPT, str(agent_sock.fileno()), cgroup_root],
            pass_fds=(agent_sock.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    agent_sock.close()
    host = Host(host_sock, console)
    try:
        message = host.receive(time.monotonic() + DEADLINE_S)
        assert isinstance(message, p.AgentHello), f"{message!r}\n{host.console_text()}"
        yield host, process
    finally:
        host_sock.close()
        for pid in host.pids:
            try:  # noqa: SIM105
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        process.kill()
        process.wait()


def test_output_on_both_streams_and_the_exit_code(agent: tuple[Host, object]) -> None:
    host, _ = agent
    record = host.run(1, ["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert bytes(record.stdout) == b"out\n"
    assert bytes(record.stderr) == b"err\n"
    assert record.exit == p.AgentExecExit(exec_id=1, exit_code=3)
    assert record.kinds[0] == "AgentExecStarted"
    assert record.kinds[-1] == "AgentExecExit"
    assert record.pid is not None and not _alive(record.pid)


def test_a_command_that_cannot_start_is_an_error_exit_and_nothing_else(
    agent: tuple[Host, object], tmp_path: Path
) -> None:
    host, _ = agent
    record = host.run(1, ["zoned-no-such-command"])
    assert record.kinds == ["AgentExecExit"]
    # The error number says what failed, for the host's exit status (127 here).
    assert record.exit == p.AgentExecExit(
        exec_id=1,
        error="cannot run 'zoned-no-such-command': No such file or directory",
        errno=errno.ENOENT,
    )

    not_executable = tmp_path / "data"
    not_executable.write_bytes(b"#!/bin/sh\n")
    not_executable.chmod(0o644)
    record = host.run(2, [str(not_executable)])
    assert record.exit is not None
    assert record.exit.error == f"cannot run '{not_executable}': Permission denied"
    assert record.exit.errno == errno.EACCES

    record = host.run(3, ["true"], cwd="/zoned-no-such-dir")
    assert record.kinds == ["AgentExecExit"]
    assert record.exit is not None
    assert record.exit.error == (
        "cannot run 'true': cannot change directory to '/zoned-no-such-dir':"
        " No such file or directory"
    )
    assert record.exit.errno == errno.ENOENT

    # Unprintable and overlong names are sanitised to the protocol's agent text.
    record = host.run(4, ["/nope/\u00e9\x01" + "x" * 2000])
    assert record.exit is not None
    assert record.exit.error.startswith("cannot run '/nope/?\\x01xxx")
    assert len(record.exit.error) == 1024

    # The agent survives all that.
    assert host.run(5, ["true"]).exit == p.AgentExecExit(exec_id=5, exit_code=0)


def test_a_signal_ends_the_process_group(agent: tuple[Host, object]) -> None:
    host, _ = agent
    host.start(1, ["sh", "-c", "sleep 100; echo never"])
    host.wait_started(1)
    host.send(p.AgentExecSignal(exec_id=1, signal=15))
    assert host.wait_exit(1) == p.AgentExecExit(exec_id=1, signal=15)
    assert bytes(host.records[1].stdout) == b""


def test_the_process_is_set_up_as_promised(agent: tuple[Host, object]) -> None:
    """Own session, only fds 0-1-2, no ignored signals, exactly the given env, cwd, ids."""
    host, _ = agent
    host.start(1, ["sleep", "100"])
    pid = host.wait_started(1)

    # While the program starts, its dynamic loader briefly holds libc open:
    # wait until that is over (the agent itself leaks nothing).
    def fds() -> dict[str, str]:
        return {fd: os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}

    wait_until(
        lambda: sorted(fds(), key=int) == ["0", "1", "2"],
        "the process holds only fds 0, 1 and 2",
        details=lambda: repr(fds()),
    )
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    assert os.readlink(f"/proc/{pid}/fd/1").startswith("pipe:")
    assert os.readlink(f"/proc/{pid}/fd/1") != os.readlink(f"/proc/{pid}/fd/2")
    assert os.getsid(pid) == pid and os.getpgid(pid) == pid
    status = Path(f"/proc/{pid}/status").read_text()
    assert re.search(r"^SigIgn:\s+0+$", status, re.M), status
    host.send(p.AgentExecSignal(exec_id=1, signal=9))
    assert host.wait_exit(1) == p.AgentExecExit(exec_id=1, signal=9)

    record = host.run(2, ["env"], env={"ZONED_A": "1 2"})
    assert sorted(bytes(record.stdout).decode().splitlines()) == [
        "HOME=/root",
        f"PATH={DEFAULT_PATH}",
        "ZONED_A=1 2",
    ]
    # A given PATH is used, for the search too.
    record = host.run(3, ["env"], env={"PATH": "/usr/bin:/bin", "HOME": "/h"})
    assert sorted(bytes(record.stdout).split()) == [b"HOME=/h", b"PATH=/usr/bin:/bin"]
    record = host.run(4, ["sh", "-c", "exec true"], env={"PATH": "/zoned-nowhere"})
    assert record.exit == p.AgentExecExit(
        exec_id=4, error="cannot run 'sh': No such file or directory", errno=errno.ENOENT
    )

    record = host.run(5, ["pwd"], cwd="/tmp")
    assert bytes(record.stdout) == b"/tmp\n"
    record = host.run(6, ["sh", "-c", "id -u; echo $HOME"], uid=65534, gid=65534)
    assert bytes(record.stdout) == b"65534\n/tmp\n"
    record = host.run(7, ["id", "-G"], uid=65534, gid=65534)
    assert bytes(record.stdout) == b"65534\n"  # no supplementary groups left
    record = host.run(8, ["id", "-u"])
    assert bytes(record.stdout) == b"0\n"


def _status_fields(text: bytes) -> dict[str, str]:
    fields = (line.split(":", 1) for line in text.decode().splitlines() if ":" in line)
    return {key: value.strip() for key, value in fields}


def test_every_process_is_confined_and_no_new_privs_is_per_process(
    agent: tuple[Host, object],
) -> None:
    """Docker's capabilities less mknod, the seccomp filter, no_new_privs on request;
    a setuid program still works without it. Real processes on this host."""
    host, _ = agent
    record = host.run(1, ["cat", "/proc/self/status"])
    status = _status_fields(bytes(record.stdout))
    assert int(status["CapEff"], 16) == DEFAULT_CAPABILITY_MASK, status
    assert int(status["CapBnd"], 16) == DEFAULT_CAPABILITY_MASK, status
    assert int(status["CapPrm"], 16) == DEFAULT_CAPABILITY_MASK, status
    assert int(status["CapInh"], 16) == 0 and int(status["CapAmb"], 16) == 0, status
    assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "0", status
    # Not root: no capabilities at all, the bounding set still limited.
    record = host.run(2, ["cat", "/proc/self/status"], uid=65534, gid=65534)
    status = _status_fields(bytes(record.stdout))
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0, status
    assert int(status["CapBnd"], 16) == DEFAULT_CAPABILITY_MASK, status

    # A setuid-root copy of the interpreter: effective uid 0 for uid 65534,
    # unless the process asked for no_new_privs.
    with tempfile.TemporaryDirectory(prefix="zoned-suid-") as place:  # pytest's tmp is 0700
        os.chmod(place, 0o755)
        suid = Path(place) / "python-suid"
        suid.write_bytes(Path(sys.executable).resolve().read_bytes())
        suid.chmod(0o4755)
        probe = [str(suid), "-S", "-c", "import os; print(os.geteuid())"]
        record = host.run(3, probe, uid=65534, gid=65534)
        assert bytes(record.stdout) == b"0\n", record.exit
        record = host.run(4, probe, uid=65534, gid=65534, no_new_privs=True)
        assert bytes(record.stdout) == b"65534\n", record.exit
    record = host.run(5, ["grep", "NoNewPrivs", "/proc/self/status"], no_new_privs=True)
    assert bytes(record.stdout).split() == [b"NoNewPrivs:", b"1"]

    # Denied system calls fail with their errno; ordinary ones work.
    script = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "for name, nr in ((n, v[0]) for n, v in DENIED.items()):\n"
        "    result = libc.syscall(nr, 0, 0, 0, 0, 0)\n"
        "    print(name, result, ctypes.get_errno())\n"
        "print('getpid', libc.syscall(39) == os.getpid())\n"
    )
    record = host.run(6, [sys.executable, "-S", "-c", f"DENIED = {DENIED!r}\n{script}"])
    lines = bytes(record.stdout).decode().splitlines()
    assert lines[-1] == "getpid True", bytes(record.stderr)
    denied = {name: (int(result), int(err)) for name, result, err in map(str.split, lines[:-1])}
    assert denied == {name: (-1, err) for name, (_, err) in DENIED.items()}


def test_agent_tools_run_the_agents_busybox_not_the_path(agent: tuple[Host, object]) -> None:
    host, _ = agent
    # No PATH at all: busybox's applets, and its shell prefers them.
    script = "tar --help 2>&1 | head -1; echo x | cat"
    record = host.run(1, ["sh", "-c", script], env={"PATH": "/zoned-nowhere"}, agent_tools=True)
    assert record.exit == p.AgentExecExit(exec_id=1, exit_code=0), record.exit
    assert bytes(record.stdout).startswith(b"BusyBox v"), bytes(record.stdout)
    assert bytes(record.stdout).endswith(b"\nx\n")


def test_stdin_round_trip_with_binary_data(agent: tuple[Host, object]) -> None:
    host, _ = agent
    data = random.Random(1).randbytes(1536 * 1024 + 7)
    host.start(1, ["cat"], stdin=True)
    host.wait_started(1)
    host.write_input(1, data)
    record = host.records[1]
    assert host.wait_exit(1) == p.AgentExecExit(exec_id=1, exit_code=0)
    assert bytes(record.stdout) == data
    assert record.input_credit == len(data)

    # Without stdin=True the process reads /dev/null.
    record = host.run(2, ["cat"])
    assert record.exit == p.AgentExecExit(exec_id=2, exit_code=0)
    assert bytes(record.stdout) == b""


def test_input_to_a_closed_stdin_is_discarded_but_credited(agent: tuple[Host, object]) -> None:
    host, _ = agent
    # The process closes its stdin and keeps running: the agent's writes fail with EPIPE.
    host.start(1, ["sh", "-c", "exec 0<&- && exec sleep 100"], stdin=True)
    host.wait_started(1)
    data = b"z" * (3 * p.EXEC_INPUT_WINDOW)
    host.write_input(1, data)  # stalls unless the discarded input is credited
    record = host.records[1]
    host.pump_until(lambda: record.input_credit == len(data), "credit for all the input")
    host.send(p.AgentExecSignal(exec_id=1, signal=15))
    assert host.wait_exit(1) == p.AgentExecExit(exec_id=1, signal=15)


def test_output_never_exceeds_the_credit_and_arrives_whole(agent: tuple[Host, object]) -> None:
    host, _ = agent
    host.auto_credit = False
    size = 8 * 1024 * 1024
    expected = hashlib.sha256(random.Random(8).randbytes(size)).hexdigest()
    writer = f"import random, sys; sys.stdout.buffer.write(random.Random(8).randbytes({size}))"
    record = host.start(1, [sys.executable, "-c", writer])
    grants = 0
    deadline = time.monotonic() + DEADLINE_S * 2
    while record.exit is None:
        # Credit only once the agent has used all it had (Host checks every message).
        if record.output_bytes == p.EXEC_OUTPUT_WINDOW + record.granted:
            host.credit(1, 128 * 1024)
            grants += 1
        if host.receive(deadline) is None:
            pytest.fail(f"stalled at {record.output_bytes} bytes\n{host.console_text()}")
    assert record.exit == p.AgentExecExit(exec_id=1, exit_code=0)
    assert len(record.stdout) == size
    assert hashlib.sha256(record.stdout).hexdigest() == expected
    assert grants >= (size - p.EXEC_OUTPUT_WINDOW) // (128 * 1024)


def test_a_background_grandchild_holding_stdout_does_not_delay_the_exit(
    agent: tuple[Host, object],
) -> None:
    host, _ = agent
    # DEADLINE_S (60 s) is longer than the sleep: keep the sleep longer still.
    record = host.run(1, ["sh", "-c", "sleep 300 & echo done"])
    assert record.exit == p.AgentExecExit(exec_id=1, exit_code=0)
    assert bytes(record.stdout) == b"done\n"


def test_concurrent_processes_each_get_their_own_output(agent: tuple[Host, object]) -> None:
    host, _ = agent
    count = 8
    script = 'i=0; while [ $i -lt 3000 ]; do echo "$1 $i"; echo "$1 e$i" >&2; i=$((i+1)); done'
    for n in range(1, count + 1):
        host.start(n, ["sh", "-c", script, "sh", f"p{n}"])
    for n in range(1, count + 1):
        host.wait_exit(n)
    for n in range(1, count + 1):
        record = host.records[n]
        assert record.exit == p.AgentExecExit(exec_id=n, exit_code=0)
        assert bytes(record.stdout) == "".join(f"p{n} {i}\n" for i in range(3000)).encode()
        assert bytes(record.stderr) == "".join(f"p{n} e{i}\n" for i in range(3000)).encode()


def test_duplicate_ids_and_too_many_processes_are_refused(agent: tuple[Host, object]) -> None:
    host, _ = agent
    for n in range(1, p.MAX_EXECS_PER_ZONE + 1):
        host.start(n, ["sleep", "100"])
    for n in range(1, p.MAX_EXECS_PER_ZONE + 1):
        host.wait_started(n)
    extra = p.MAX_EXECS_PER_ZONE + 1
    record = host.run(extra, ["true"])
    assert record.exit is not None
    assert record.exit.error == f"too many processes: {p.MAX_EXECS_PER_ZONE} are running already"

    first = host.records[1]
    host.records[1] = ExecRecord(pid=first.pid)
    host.send(p.AgentExecStart(exec_id=1, argv=["true"]))
    refusal = host.wait_exit(1)
    assert refusal.error == "exec id 1 is already in use"

    # The original exec 1 is untouched and still ends normally.
    host.records[1] = first
    host.send(p.AgentExecSignal(exec_id=1, signal=15))
    assert host.wait_exit(1) == p.AgentExecExit(exec_id=1, signal=15)
    # A heartbeat still gets its answer in between.
    host.send(p.Heartbeat(seq=4))
    record = host.run(extra + 1, ["echo", "room again"])
    assert bytes(record.stdout) == b"room again\n"


def test_a_host_disconnect_kills_the_running_processes(
    agent: tuple[Host, subprocess.Popen[bytes]],
) -> None:
    host, process = agent
    host.start(1, ["sleep", "100"])
    host.start(2, ["sh", "-c", "sleep 200 & sleep 100"])
    leader = host.wait_started(1)
    group = host.wait_started(2)
    wait_until(lambda: len(_group_members(group)) >= 2, "the background sleep starts")
    members = _group_members(group)
    assert _alive(leader)
    host.sock.close()
    wait_until(
        lambda: not any(_alive(pid) for pid in [leader, *members]),
        "the processes die with the disconnect",
        details=host.console_text,
    )
    # The agent logs it just after killing them.
    wait_until(
        lambda: "killed 2 process(es)" in host.console.read_text(),
        "the agent logs the kill",
        details=host.console_text,
    )
    assert process.poll() is None, "the agent itself must keep running"


# -- terminals --------------------------------------------------------------------


def _wait_output(host: Host, exec_id: int, text: bytes) -> None:
    record = host.records[exec_id]
    host.pump_until(
        lambda: text in record.stdout or record.exit is not None, f"{text!r} from exec {exec_id}"
    )
    assert text in record.stdout, (bytes(record.stdout), record.exit)


def test_a_terminal_of_the_asked_size_carries_input_and_output(agent: tuple[Host, object]) -> None:
    host, _ = agent
    # stdin=False: a terminal's input is enabled whatever stdin says.
    record = host.start(
        1, ["sh", "-c", "tty; stty size; read x; echo got:$x"], tty=True, rows=40, cols=100
    )
    _wait_output(host, 1, b"40 100\r\n")
    host.write_input(1, b"hello\n", eof=False)
    assert host.wait_exit(1) == p.AgentExecExit(exec_id=1, exit_code=0)
    out = bytes(record.stdout)
    assert re.match(rb"/dev/pts/\d+\r\n40 100\r\n", out), out
    # The terminal echoes the input and maps newlines to CR LF; there is no stderr.
    assert out.endswith(b"hello\r\ngot:hello\r\n"), out
    assert bytes(record.stderr) == b""
    assert record.input_credit == len(b"hello\n")

    # It is the process's controlling terminal, in its own session.
    # (tcgetpgrp works on the controlling terminal only.)
    check = "import os; print(os.getsid(0) == os.getpid(), os.tcgetpgrp(0) == os.getpgrp())"
    record = host.run(2, [sys.executable, "-c", check], tty=True)
    assert record.exit == p.AgentExecExit(exec_id=2, exit_code=0)
    assert bytes(record.stdout) == b"True True\r\n"


def test_a_resize_reaches_the_process(agent: tuple[Host, object]) -> None:
    host, _ = agent
    script = 'trap "stty size" WINCH; echo ready; while :; do sleep 0.1; done'
    record = host.start(1, ["sh", "-c", script], tty=True)
    _wait_output(host, 1, b"ready")
    host.send(p.AgentExecResize(exec_id=1, rows=50, cols=132))
    _wait_output(host, 1, b"50 132")
    host.send(p.AgentExecResize(exec_id=1, rows=7, cols=9))
    _wait_output(host, 1, b"7 9")
    host.send(p.AgentExecSignal(exec_id=1, signal=9))
    assert host.wait_exit(1) == p.AgentExecExit(exec_id=1, signal=9)
    assert bytes(record.stderr) == b""


def test_terminal_eof_ends_cat_and_is_not_credited(agent: tuple[Host, object]) -> None:
    host, _ = agent
    record = host.start(1, ["cat"], tty=True)
    host.wait_started(1)
    host.write_input(1, b"abc\n", eof=True)
    assert host.wait_exit(1) == p.AgentExecExit(exec_id=1, exit_code=0)
    # Echoed once by the terminal, once by cat.
    assert bytes(record.stdout) == b"abc\r\nabc\r\n"
    assert record.input_credit == 4

    # A shell reading lines survives an EOF in the middle (the terminal stays open).
    record = host.start(2, ["sh", "-c", "cat; echo after; read y; echo y=$y"], tty=True)
    host.wait_started(2)
    host.write_input(2, b"", eof=True)
    _wait_output(host, 2, b"after")
    host.write_input(2, b"zz\n", eof=False)
    assert host.wait_exit(2) == p.AgentExecExit(exec_id=2, exit_code=0)
    assert bytes(record.stdout).endswith(b"y=zz\r\n"), bytes(record.stdout)
    assert record.input_credit == 3


def test_a_leader_that_closed_its_terminal_is_not_hung_up_before_it_exits(
    agent: tuple[Host, object], tmp_path: Path
) -> None:
    """GNU cat closes stdin, stdout and stderr before it exits: the terminal's slave
    is then closed everywhere while its leader still runs. Closing the master then
    would hang the terminal up and SIGHUP the leader (seen as signal=1 under load)."""
    host, _ = agent
    closed, go = tmp_path / "closed", tmp_path / "go"
    os.mkfifo(go)
    script = f'exec 0<&- 1>&- 2>&-; : > "{closed}"; read line < "{go}"; exit 7'
    host.start(1, ["sh", "-c", script], tty=True)
    host.wait_started(1)
    wait_until(closed.exists, "the process to close its terminal")
    # Two heartbeat round trips: the agent has polled the master's hang-up since.
    for seq in (1, 2):
        host.send(p.Heartbeat(seq=seq))
        host.pump_until(
            lambda seq=seq: host.records[1].exit is not None or host.beats >= seq,  # type: ignore[misc]
            f"heartbeat {seq}",
        )
    assert host.records[1].exit is None, host.records[1].exit
    # Non-blocking: it fails (ENXIO) rather than hangs if the reader is gone.
    fifo = os.open(go, os.O_WRONLY | os.O_NONBLOCK)
    os.write(fifo, b"go\n")
    os.close(fifo)
    assert host.wait_exit(1) == p.AgentExecExit(exec_id=1, exit_code=7)


def test_a_background_process_holding_the_terminal_does_not_delay_the_exit(
    agent: tuple[Host, object],
) -> None:
    host, _ = agent
    # nohup-like: the background sleep ignores the SIGHUP of the session's end.
    record = host.run(1, ["sh", "-c", "trap '' HUP; sleep 300 & echo done"], tty=True)
    assert record.exit == p.AgentExecExit(exec_id=1, exit_code=0)
    assert bytes(record.stdout) == b"done\r\n"


def test_resizing_a_process_without_a_terminal_is_ignored_and_logged_once(
    agent: tuple[Host, object],
) -> None:
    host, _ = agent
    host.start(1, ["sleep", "100"])
    host.wait_started(1)
    host.send(p.AgentExecResize(exec_id=1, rows=10, cols=10))
    host.send(p.AgentExecResize(exec_id=99, rows=10, cols=10))
    host.send(p.AgentExecSignal(exec_id=1, signal=15))
    assert host.wait_exit(1) == p.AgentExecExit(exec_id=1, signal=15)
    assert host.console.read_text().count("resize ignored") == 1, host.console_text()


def test_limits_are_refused_without_cgroups(agent: tuple[Host, object]) -> None:
    host, _ = agent
    record = host.run(1, ["true"], memory_limit_mib=32)
    assert record.kinds == ["AgentExecExit"]
    assert record.exit == p.AgentExecExit(exec_id=1, error=NO_CGROUPS_ERROR)
    record = host.run(2, ["true"], pids_limit=8)
    assert record.exit == p.AgentExecExit(exec_id=2, error=NO_CGROUPS_ERROR)
    # No cgroups: no usage figures either.
    record = host.run(3, ["true"])
    assert record.exit == p.AgentExecExit(exec_id=3, exit_code=0)


# -- cgroups on this host -----------------------------------------------------------
#
# The memory and pids controllers (limits, OOM, memory.peak) are tested in the
# guest (tests/integration/test_agent_boot.py): this host's cgroup2 hierarchy
# may not offer them. What any writable cgroup2 hierarchy offers is tested
# here, in a scratch cgroup of the test's own that stands for the agent's root.


def _cgroup2_mount() -> Path:
    """This host's cgroup2 mount point; fails the test (no skip) without a usable one."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        separator = fields.index("-")
        if fields[separator + 1] == "cgroup2":
            mount = Path(fields[4])
            if os.access(mount / "cgroup.procs", os.W_OK):
                return mount
    pytest.fail(
        "no writable cgroup2 hierarchy on this host: the agent's cgroup handling cannot be"
        " tested here (it still is in the guest, by tests/integration/test_agent_boot.py)",
        pytrace=False,
    )


def _remove_cgroup_tree(path: Path) -> None:
    for child in sorted(path.iterdir()):
        if child.is_dir():
            _remove_cgroup_tree(child)

    def removed() -> bool:
        try:
            path.rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            with contextlib.suppress(OSError):
                (path / "cgroup.kill").write_text("1")
            return False
        return True

    wait_until(removed, f"{path} removed")


@pytest.fixture
def cgroup_root() -> Iterator[Path]:
    root = _cgroup2_mount() / f"zt-agent-test-{os.getpid()}"
    root.mkdir()
    try:
        yield root
    finally:
        _remove_cgroup_tree(root)


def _wait_gone(path: Path, host: Host) -> None:
    wait_until(lambda: not path.exists(), f"{path} removed", details=host.console_text)


def _wait_dead(pid: int, host: Host) -> None:
    wait_until(lambda: not _alive(pid), f"process {pid} dies", details=host.console_text)


def test_each_process_runs_in_a_cgroup_of_its_own_that_ends_with_it(
    tmp_path: Path, cgroup_root: Path
) -> None:
    controllers = set((cgroup_root / "cgroup.controllers").read_text().split())
    with _running_agent(tmp_path, str(cgroup_root)) as (host, _):
        # Its cgroup, joined before exec; usage figures in the exit.
        record = host.run(1, ["sh", "-c", "cat /proc/self/cgroup; sleep 300 & echo $!"])
        assert record.exit is not None
        assert record.exit.exit_code == 0, record.exit
        lines = bytes(record.stdout).decode().splitlines()
        relative = cgroup_root.relative_to(_cgroup2_mount())
        assert f"0::/{relative}/exec-1" in lines, lines
        assert record.exit.cpu_time_s is not None and record.exit.cpu_time_s >= 0.0
        assert record.exit.oom_killed is False
        if "memory" in controllers:
            assert record.exit.memory_peak_kib is not None and record.exit.memory_peak_kib > 0
        else:
            assert record.exit.memory_peak_kib is None
        # What it left behind is killed with its cgroup, which is then removed.
        background = int(lines[-1])
        _wait_gone(cgroup_root / "exec-1", host)
        _wait_dead(background, host)

        # Even a process that left the session dies with its cgroup.
        record = host.run(2, [sys.executable, "-c", _ESCAPE])
        assert record.exit == p.AgentExecExit(
            exec_id=2,
            exit_code=0,
            cpu_time_s=record.exit.cpu_time_s if record.exit else None,
            memory_peak_kib=record.exit.memory_peak_kib if record.exit else None,
        )
        escaped = int(bytes(record.stdout))
        assert os.getsid(escaped) == escaped
        _wait_gone(cgroup_root / "exec-2", host)
        _wait_dead(escaped, host)

        # A terminal process gets one too.
        record = host.run(3, ["sh", "-c", "cat /proc/self/cgroup"], tty=True)
        assert f"0::/{relative}/exec-3\r\n".encode() in record.stdout
        assert record.exit is not None and record.exit.cpu_time_s is not None

        # A limit whose controller the root lacks is refused, clearly.
        for limit, controller in (
            ({"memory_limit_mib": 16}, "memory"),
            ({"pids_limit": 4}, "pids"),
        ):
            if controller in controllers:
                continue
            record = host.run(4, ["true"], **limit)
            assert record.exit == p.AgentExecExit(
                exec_id=4,
                error=f"{controller} limits need the cgroup {controller} controller,"
                " which this agent does not have",
            )

        # A host that goes away takes the cgroups of its processes with it.
        host.start(5, ["sh", "-c", "sleep 300 & sleep 300"])
        host.wait_started(5)
        assert (cgroup_root / "exec-5").is_dir()
        host.sock.close()
        _wait_gone(cgroup_root / "exec-5", host)
    assert sorted(p.name for p in cgroup_root.iterdir() if p.is_dir()) == []


# Starts a sleep in a session of its own (out of the exec's process group) and prints its pid.
_ESCAPE = """\
import os, subprocess
child = subprocess.Popen(["sleep", "300"], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(child.pid)
"""
