"""Boot the agent's image on the project's guest kernel with bare QEMU (TCG) and talk to it.

No libvirt here: this checks the boot image, the agent and the handshake on
both machine types, with the same kernel command line the daemon uses.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tests.waiting import wait_until
from zoned import bareboot
from zoned import protocol as p
from zoned.hostinfo import host_tsc_khz
from zoned.images.bootimage import build_boot_image
from zoned.kernel.cmdline import hardened_cmdline
from zoned.kernel.store import DEFAULT_STORE

pytestmark = pytest.mark.integration

KERNEL_STORE = Path(os.environ.get("ZONED_KERNEL_STORE", DEFAULT_STORE))
PROFILE = "strict"
# Generous: TCG on a loaded 2-CPU host; a healthy boot takes a few seconds.
BOOT_TIMEOUT_S = 120.0
REPLY_TIMEOUT_S = 30.0


@dataclass
class BootResult:
    hello: p.AgentHello
    #: Host spawn of QEMU -> AgentHello received.
    spawn_to_hello_s: float
    console_log: str


class AgentConnection:
    """The host end of the agent channel, synchronous, for tests."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = p.FrameDecoder(p.AGENT_MAX_FRAME)
        #: AgentHello messages received.
        self.hellos = 0

    def send(self, message: p.HostToAgent) -> None:
        self.sock.sendall(p.encode_frame(message, p.AGENT_MAX_FRAME))

    def receive(self, deadline: float) -> p.AgentToHost:
        while (payload := self.decoder.next_frame()) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no message from the agent in time")
            self.sock.settimeout(remaining)
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the agent channel closed (QEMU exited?)")
            self.decoder.feed(data)
        message = p.decode_from_agent(payload)
        if isinstance(message, p.AgentHello):
            self.hellos += 1
        return message


@dataclass
class ExecResult:
    stdout: bytes
    stderr: bytes
    exit: p.AgentExecExit
    #: AgentExecStarted received -> AgentExecExit received.
    seconds: float


def run_exec(
    agent: AgentConnection,
    exec_id: int,
    argv: list[str],
    deadline: float,
    *,
    after_output: Callable[[bytes], list[p.HostToAgent]] | None = None,
    **fields: Any,
) -> ExecResult:
    """Run one process through the agent, crediting its output as it arrives.

    ``after_output(stdout so far)`` returns the messages to send after each output.
    """
    agent.send(p.AgentExecStart(exec_id=exec_id, argv=argv, **fields))
    out = {"stdout": bytearray(), "stderr": bytearray()}
    started = None
    while True:
        message = agent.receive(deadline)
        if isinstance(message, p.AgentHello | p.HeartbeatReply):
            continue
        assert message.exec_id == exec_id, message
        if isinstance(message, p.AgentExecStarted):
            started = time.monotonic()
        elif isinstance(message, p.AgentExecOutput):
            assert started is not None, "output before AgentExecStarted"
            out[message.stream] += message.data
            agent.send(p.AgentExecCredit(exec_id=exec_id, bytes=len(message.data)))
            if after_output is not None:
                for reply in after_output(bytes(out["stdout"])):
                    agent.send(reply)
        elif isinstance(message, p.AgentExecExit):
            assert started is not None, message
            return ExecResult(
                bytes(out["stdout"]), bytes(out["stderr"]), message, time.monotonic() - started
            )


def without_usage(exit: p.AgentExecExit) -> p.AgentExecExit:
    """``exit`` without its usage figures (which vary), for comparisons."""
    assert exit.cpu_time_s is not None and exit.memory_peak_kib is not None, exit
    return msgspec.structs.replace(exit, cpu_time_s=None, memory_peak_kib=None)


def kernel_image() -> Path:
    """The strict profile's kernel from the store; fails the test (no skip) when absent."""
    image = KERNEL_STORE / PROFILE / "bzImage"
    if not image.is_file():
        pytest.fail(
            f"guest kernel missing: {image} does not exist. Build the kernel store first"
            f" (`zoned-kernel`, see guest-kernel/) or point ZONED_KERNEL_STORE at one.",
            pytrace=False,
        )
    return image


def kernel_cmdline(machine: str) -> list[str]:
    args = hardened_cmdline(PROFILE, machine, host_tsc_khz())
    if "console=ttyS0" not in args:
        args.append("console=ttyS0")
    return args


def qemu_command(machine: str, kernel: Path, initrd: Path, workdir: Path) -> list[str]:
    """A bare boot of ``machine`` (zoned.bareboot) with its console in ``workdir/console.log``
    and the agent channel listening at ``workdir/agent.sock``."""
    return bareboot.qemu_command(
        kernel=kernel,
        initrd=initrd,
        cmdline=kernel_cmdline(machine),
        machine=machine,
        serial_log=workdir / "console.log",
        agent_socket=workdir / "agent.sock",
    )


@contextlib.contextmanager
def running_qemu(command: Sequence[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=stderr, stderr=subprocess.STDOUT
        )
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def connect(path: Path, process: subprocess.Popen[bytes], deadline: float) -> socket.socket:
    """Connect to QEMU's listening socket as soon as it exists."""
    connected: list[socket.socket] = []

    def attempt() -> bool:
        if process.poll() is not None:
            raise ConnectionError(f"QEMU exited with status {process.returncode}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            return False
        connected.append(sock)
        return True

    wait_until(attempt, f"QEMU creates {path}", timeout=max(0.0, deadline - time.monotonic()))
    return connected[0]


def _diagnostics(workdir: Path) -> str:
    parts = []
    for name in ("console.log", "qemu.log"):
        path = workdir / name
        text = path.read_text(errors="replace") if path.exists() else "(missing)"
        parts.append(f"--- {name} (last 3000 chars) ---\n{text[-3000:]}")
    return "\n".join(parts)


def boot_and_greet(machine: str, kernel: Path, initrd: Path, workdir: Path) -> BootResult:
    """Boot, receive the hello, exchange heartbeats (both kinds), return what was seen."""
    workdir.mkdir(parents=True, exist_ok=True)
    console_log = workdir / "console.log"
    agent_sock = workdir / "agent.sock"
    command = qemu_command(machine, kernel, initrd, workdir)
    spawned = time.monotonic()
    with running_qemu(command, workdir / "qemu.log") as process:
        try:
            sock = connect(agent_sock, process, spawned + BOOT_TIMEOUT_S)
            with sock:
                agent = AgentConnection(sock)
                hello = agent.receive(spawned + BOOT_TIMEOUT_S)
                hello_at = time.monotonic()
                assert isinstance(hello, p.AgentHello), hello

                agent.send(p.Heartbeat(seq=7))
                reply = agent.receive(time.monotonic() + REPLY_TIMEOUT_S)
                assert isinstance(reply, p.HeartbeatReply), reply
                assert reply.seq == 7
                assert reply.mem_total_kib > 0
                assert reply.uptime_s >= hello.boot_s

                # seq 0 asks the agent to introduce itself again, then answer.
                agent.send(p.Heartbeat(seq=0))
                again = agent.receive(time.monotonic() + REPLY_TIMEOUT_S)
                assert isinstance(again, p.AgentHello), again
                reply = agent.receive(time.monotonic() + REPLY_TIMEOUT_S)
                assert isinstance(reply, p.HeartbeatReply), reply
                assert reply.seq == 0
        except (AssertionError, OSError, TimeoutError) as exc:
            pytest.fail(f"{machine}: {exc!r}\n{_diagnostics(workdir)}", pytrace=False)
    return BootResult(
        hello=hello,
        spawn_to_hello_s=hello_at - spawned,
        console_log=console_log.read_text(errors="replace"),
    )


@contextlib.contextmanager
def greeted_agent(boot_image: Path, workdir: Path) -> Iterator[AgentConnection]:
    """Boot a microvm zone on bare QEMU; its agent channel once the agent said hello.

    An assertion or IO failure inside fails the test with the console and QEMU logs.
    """
    machine = "microvm"
    agent_sock = workdir / "agent.sock"
    command = qemu_command(machine, kernel_image(), boot_image, workdir)
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    with running_qemu(command, workdir / "qemu.log") as process:
        try:
            with connect(agent_sock, process, deadline) as sock:
                agent = AgentConnection(sock)
                hello = agent.receive(deadline)
                assert isinstance(hello, p.AgentHello), hello
                yield agent
        except (AssertionError, OSError, TimeoutError) as exc:
            pytest.fail(f"{machine}: {exc!r}\n{_diagnostics(workdir)}", pytrace=False)


@pytest.fixture(scope="module")
def boot_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_boot_image(tmp_path_factory.mktemp("bootimage"))


@pytest.mark.parametrize("machine", ["microvm", "q35"])
def test_agent_says_hello_and_answers_heartbeats(
    machine: str, boot_image: Path, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    kernel = kernel_image()
    result = boot_and_greet(machine, kernel, boot_image, tmp_path)

    assert result.hello.pid == 1
    assert result.hello.agent.startswith("zoned-agent/")
    assert result.hello.kernel_release
    assert "zoned-agent: starting" in result.console_log, result.console_log[-3000:]
    record_property("spawn_to_hello_s", round(result.spawn_to_hello_s, 3))
    record_property("guest_boot_s", result.hello.boot_s)
    print(
        f"{machine}: spawn->hello {result.spawn_to_hello_s:.3f}s,"
        f" guest boot_s {result.hello.boot_s:.3f}s, kernel {result.hello.kernel_release}"
    )


def _wait_for_console(
    log: Path, text: str, process: subprocess.Popen[bytes], deadline: float, count: int = 1
) -> None:
    """Until ``text`` is on the console ``count`` times (the agent's own account)."""

    def shown() -> bool:
        if process.poll() is not None:
            raise ConnectionError(f"QEMU exited with status {process.returncode}")
        return log.exists() and log.read_text(errors="replace").count(text) >= count

    wait_until(
        shown,
        f"{text!r} on the console",
        timeout=max(0.0, deadline - time.monotonic()),
        details=lambda: _diagnostics(log.parent),
    )


def test_agent_greets_a_host_that_connects_late_and_again_after_reconnecting(
    boot_image: Path, tmp_path: Path
) -> None:
    """The agent is up before the host connects; the host then drops and re-opens the channel."""
    machine = "microvm"
    kernel = kernel_image()
    console_log = tmp_path / "console.log"
    agent_sock = tmp_path / "agent.sock"
    command = qemu_command(machine, kernel, boot_image, tmp_path)
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    with running_qemu(command, tmp_path / "qemu.log") as process:
        try:
            # The agent has found its port and is waiting for the host.
            _wait_for_console(console_log, "zoned-agent: agent port", process, deadline)
            for attempt in range(1, 3):
                with connect(agent_sock, process, deadline) as sock:
                    agent = AgentConnection(sock)
                    # seq 0 guarantees a hello even if the agent missed the reconnection.
                    agent.send(p.Heartbeat(seq=0))
                    first = agent.receive(time.monotonic() + REPLY_TIMEOUT_S)
                    assert isinstance(first, p.AgentHello), first
                    message = agent.receive(time.monotonic() + REPLY_TIMEOUT_S)
                    while not isinstance(message, p.HeartbeatReply):
                        assert isinstance(message, p.AgentHello), message
                        message = agent.receive(time.monotonic() + REPLY_TIMEOUT_S)
                    assert message.seq == 0
                # The agent notices the host going away before it comes back.
                _wait_for_console(
                    console_log, "zoned-agent: host disconnected", process, deadline, attempt
                )
        except (AssertionError, OSError, TimeoutError) as exc:
            pytest.fail(f"{machine}: {exc!r}\n{_diagnostics(tmp_path)}", pytrace=False)
    log = console_log.read_text(errors="replace")
    assert "zoned-agent: host disconnected" in log, log[-3000:]


def test_agent_runs_processes_in_the_zone(
    boot_image: Path, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    """One boot: python3 and busybox sh from the image, and 16 MiB of output, checksummed."""
    size = 16 * 1024 * 1024
    with greeted_agent(boot_image, tmp_path) as agent:
        deadline = time.monotonic() + 600.0

        result = run_exec(agent, 1, ["python3", "-c", "print(2+2)"], deadline)
        assert without_usage(result.exit) == p.AgentExecExit(exec_id=1, exit_code=0), result
        assert (result.stdout, result.stderr) == (b"4\n", b"")

        result = run_exec(agent, 2, ["sh", "-c", "echo err >&2; exit 7"], deadline)
        assert without_usage(result.exit) == p.AgentExecExit(exec_id=2, exit_code=7), result
        assert (result.stdout, result.stderr) == (b"", b"err\n")

        generate = f"head -c {size} /dev/urandom | tee /tmp/blob"
        big = run_exec(agent, 3, ["sh", "-c", generate], deadline)
        assert without_usage(big.exit) == p.AgentExecExit(exec_id=3, exit_code=0), big.exit
        assert big.stderr == b""
        assert len(big.stdout) == size

        replay = run_exec(agent, 4, ["cat", "/tmp/blob"], deadline)
        assert without_usage(replay.exit) == p.AgentExecExit(exec_id=4, exit_code=0), replay.exit
        assert replay.stdout == big.stdout

        checksum = run_exec(agent, 5, ["sha256sum", "/tmp/blob"], deadline)
        assert without_usage(checksum.exit) == p.AgentExecExit(exec_id=5, exit_code=0), checksum
        digest = hashlib.sha256(big.stdout).hexdigest()
        assert checksum.stdout == f"{digest}  /tmp/blob\n".encode()
    generate_mb_s = size / big.seconds / 1e6
    cat_mb_s = size / replay.seconds / 1e6
    record_property("exec_urandom_tee_mb_s", round(generate_mb_s, 1))
    record_property("exec_cat_mb_s", round(cat_mb_s, 1))
    print(
        f"microvm: 16 MiB from head|tee in {big.seconds:.2f}s ({generate_mb_s:.1f} MB/s),"
        f" cat in {replay.seconds:.2f}s ({cat_mb_s:.1f} MB/s)"
    )


# Forks sleeps until the pids limit refuses one; prints how many started.
_FORK_UNTIL_REFUSED = """\
import os
started = 0
for _ in range(100):
    try:
        pid = os.fork()
    except OSError as exc:
        print("refused", exc.errno)
        break
    if pid == 0:
        try:
            os.execv("/bin/sleep", ["sleep", "30"])
        finally:
            os._exit(127)
    started += 1
print("started", started)
"""


def _heartbeat(agent: AgentConnection, seq: int, deadline: float) -> p.HeartbeatReply:
    agent.send(p.Heartbeat(seq=seq))
    while True:
        message = agent.receive(deadline)
        if isinstance(message, p.HeartbeatReply) and message.seq == seq:
            return message
        assert isinstance(message, p.AgentHello | p.HeartbeatReply), message


def test_agent_limits_measures_and_gives_terminals_to_processes(
    boot_image: Path, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    """One boot: cgroup limits (memory -> OOM kill, pids -> refused forks, a fork bomb
    cleaned up), usage figures, and a terminal, in the real guest."""
    with greeted_agent(boot_image, tmp_path) as agent:
        deadline = time.monotonic() + 600.0

        # Usage figures on every exit.
        plain = run_exec(agent, 1, ["sh", "-c", "cat /proc/self/cgroup"], deadline)
        assert plain.exit.exit_code == 0, plain
        assert plain.stdout == b"0::/exec-1\n"
        assert plain.exit.cpu_time_s is not None, plain.exit
        assert plain.exit.memory_peak_kib is not None, plain.exit
        assert plain.exit.memory_peak_kib > 0
        assert plain.exit.oom_killed is False

        # A memory hog beyond its limit: the OOM killer ends it (SIGKILL). It
        # grows 1 MiB at a time: one 256 MiB bytearray is refused by the guest's
        # overcommit heuristic (256 MiB of RAM) with a MemoryError instead.
        hog = run_exec(
            agent,
            2,
            ["python3", "-c", "b = [bytearray(1 << 20) for _ in range(256)]"],
            deadline,
            memory_limit_mib=32,
        )
        assert hog.exit.signal == 9, hog
        assert hog.exit.oom_killed is True, hog.exit
        assert hog.exit.memory_peak_kib is not None
        assert hog.exit.memory_peak_kib <= 32 * 1024, hog.exit

        # Forks beyond the pids limit are refused (EAGAIN): 31 sleeps + python = 32.
        forks = run_exec(agent, 3, ["python3", "-c", _FORK_UNTIL_REFUSED], deadline, pids_limit=32)
        assert forks.exit.exit_code == 0, forks
        assert forks.stdout == b"refused 11\nstarted 31\n", forks

        # A real fork bomb, held at its pids limit while its leader spins (no fork):
        # forks get refused, the agent keeps answering, and killing the leader
        # kills the whole swarm with the cgroup.
        agent.send(
            p.AgentExecStart(
                exec_id=4,
                argv=[
                    "sh",
                    "-c",
                    "exec 2>/dev/null; bomb() { bomb | bomb & }; bomb; while :; do :; done",
                ],
                pids_limit=32,
            )
        )
        started = agent.receive(deadline)
        assert isinstance(started, p.AgentExecStarted) and started.exec_id == 4, started

        def forks_refused() -> int:
            events = run_exec(agent, 7, ["cat", "/sys/fs/cgroup/exec-4/pids.events"], deadline)
            assert events.exit.exit_code == 0, events
            return int(events.stdout.split()[1])

        wait_until(forks_refused, "the bomb reaches its pids limit")
        refused = forks_refused()
        _heartbeat(agent, 10, deadline)
        agent.send(p.AgentExecSignal(exec_id=4, signal=9))
        while not isinstance(bomb := agent.receive(deadline), p.AgentExecExit):
            assert isinstance(bomb, p.AgentHello | p.HeartbeatReply), bomb
        assert bomb.exec_id == 4 and bomb.signal == 9, bomb
        _heartbeat(agent, 11, deadline)
        # The bomb's cgroup (and the sleeps' of exec 3) go away.
        listings: list[bytes] = []

        def only_its_own_cgroup() -> bool:
            listing = run_exec(agent, 5, ["sh", "-c", "ls -d /sys/fs/cgroup/exec-*"], deadline)
            assert listing.exit.exit_code == 0, listing
            listings.append(listing.stdout)
            return listing.stdout == b"/sys/fs/cgroup/exec-5\n"

        wait_until(
            only_its_own_cgroup,
            "no cgroups left behind",
            details=lambda: repr(listings[-1]),
        )
        _heartbeat(agent, 12, deadline)

        # A terminal of the asked size, with input, then resized. (The resize
        # comes after the read: a trapped signal interrupts ash's read builtin.)
        sent: list[str] = []

        def converse(stdout: bytes) -> list[p.HostToAgent]:
            if b"33 77" in stdout and "input" not in sent:
                sent.append("input")
                return [p.AgentExecInput(exec_id=6, data=b"hello\n")]
            if b"ready" in stdout and "resize" not in sent:
                sent.append("resize")
                return [p.AgentExecResize(exec_id=6, rows=50, cols=132)]
            return []

        script = (
            "tty; stty size; read x; echo got:$x;"
            ' trap "stty size; exit 0" WINCH; echo ready; while :; do sleep 0.1; done'
        )
        term = run_exec(
            agent,
            6,
            ["sh", "-c", script],
            deadline,
            after_output=converse,
            tty=True,
            rows=33,
            cols=77,
        )
        assert term.exit.exit_code == 0, term
        assert term.stdout == (
            b"/dev/pts/0\r\n33 77\r\nhello\r\ngot:hello\r\nready\r\n50 132\r\n"
        ), term.stdout
        assert term.stderr == b""
    record_property("hog_memory_peak_kib", hog.exit.memory_peak_kib)
    record_property("plain_cpu_time_s", plain.exit.cpu_time_s)
    print(
        f"microvm: sh cat: cpu {plain.exit.cpu_time_s}s peak {plain.exit.memory_peak_kib} KiB;"
        f" hog (32 MiB limit): {hog.exit}; bomb: {bomb}, {refused} forks refused by then"
    )


# Every signal a workload may send (the kernel drops, for PID 1, all it does not
# handle; SIGKILL and SIGSTOP included), SIGINT first: it used to be the one.
_SIGNAL_PID_1 = "kill -INT 1; for s in $(seq 1 64); do kill -$s 1 2>/dev/null; done; echo sent"


def test_agent_survives_the_signals_a_workload_sends_it(boot_image: Path, tmp_path: Path) -> None:
    """A workload signals PID 1 with everything it can while another process
    runs: that process and the channel go on as if nothing happened."""
    with greeted_agent(boot_image, tmp_path) as agent:
        deadline = time.monotonic() + BOOT_TIMEOUT_S

        # The bystander waits for its input while PID 1 is being signalled.
        agent.send(
            p.AgentExecStart(
                exec_id=1, argv=["sh", "-c", "read line; echo survived:$line"], stdin=True
            )
        )
        started = agent.receive(deadline)
        assert isinstance(started, p.AgentExecStarted) and started.exec_id == 1, started

        signaller = run_exec(agent, 2, ["sh", "-c", _SIGNAL_PID_1], deadline)
        assert signaller.exit.exit_code == 0, signaller
        assert signaller.stdout == b"sent\n", signaller

        agent.send(p.AgentExecInput(exec_id=1, data=b"yes\n", eof=True))
        output = bytearray()
        while not isinstance(end := agent.receive(deadline), p.AgentExecExit):
            if isinstance(end, p.AgentExecOutput):
                output += end.data
                agent.send(p.AgentExecCredit(exec_id=1, bytes=len(end.data)))
            else:
                assert isinstance(end, p.HeartbeatReply | p.AgentExecInputCredit), end
        assert end.exec_id == 1 and end.exit_code == 0, end
        assert bytes(output) == b"survived:yes\n"

        # Still the same session: no second hello, heartbeats answered.
        assert _heartbeat(agent, 5, deadline).seq == 5
        assert agent.hellos == 1
    log = (tmp_path / "console.log").read_text(errors="replace")
    assert "agent channel failed" not in log, log[-3000:]
