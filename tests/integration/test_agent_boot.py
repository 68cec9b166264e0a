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

import pytest

from zoned.agent import AGENT_PORT_NAME
from zoned.bootimage import build_boot_image
from zoned.hostinfo import host_tsc_khz
from zoned.kernel.cmdline import hardened_cmdline
from zoned.protocol import (
    AGENT_MAX_FRAME,
    AgentExecCredit,
    AgentExecExit,
    AgentExecOutput,
    AgentExecStart,
    AgentExecStarted,
    AgentHello,
    AgentToHost,
    FrameDecoder,
    Heartbeat,
    HeartbeatReply,
    HostToAgent,
    decode_from_agent,
    encode_frame,
)

pytestmark = pytest.mark.integration

KERNEL_STORE = Path(os.environ.get("ZONED_KERNEL_STORE", "/var/lib/zoned/kernels"))
PROFILE = "strict"
QEMU = "qemu-system-x86_64"
# Generous: TCG on a loaded 2-CPU host; a healthy boot takes a few seconds.
BOOT_TIMEOUT_S = 120.0
REPLY_TIMEOUT_S = 30.0


@dataclass
class BootResult:
    hello: AgentHello
    #: Host spawn of QEMU -> AgentHello received.
    spawn_to_hello_s: float
    console_log: str


class AgentConnection:
    """The host end of the agent channel, synchronous, for tests."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = FrameDecoder(AGENT_MAX_FRAME)

    def send(self, message: HostToAgent) -> None:
        self.sock.sendall(encode_frame(message, AGENT_MAX_FRAME))

    def receive(self, deadline: float) -> AgentToHost:
        while (payload := self.decoder.next_frame()) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no message from the agent in time")
            self.sock.settimeout(remaining)
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the agent channel closed (QEMU exited?)")
            self.decoder.feed(data)
        return decode_from_agent(payload)


@dataclass
class ExecResult:
    stdout: bytes
    stderr: bytes
    exit: AgentExecExit
    #: AgentExecStarted received -> AgentExecExit received.
    seconds: float


def run_exec(agent: AgentConnection, exec_id: int, argv: list[str], deadline: float) -> ExecResult:
    """Run one process through the agent, crediting its output as it arrives."""
    agent.send(AgentExecStart(exec_id=exec_id, argv=argv))
    out = {"stdout": bytearray(), "stderr": bytearray()}
    started = None
    while True:
        message = agent.receive(deadline)
        if isinstance(message, AgentHello | HeartbeatReply):
            continue
        assert message.exec_id == exec_id, message
        if isinstance(message, AgentExecStarted):
            started = time.monotonic()
        elif isinstance(message, AgentExecOutput):
            assert started is not None, "output before AgentExecStarted"
            out[message.stream] += message.data
            agent.send(AgentExecCredit(exec_id=exec_id, bytes=len(message.data)))
        elif isinstance(message, AgentExecExit):
            assert started is not None, message
            return ExecResult(
                bytes(out["stdout"]), bytes(out["stderr"]), message, time.monotonic() - started
            )


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


def kernel_cmdline(machine: str) -> str:
    args = hardened_cmdline(PROFILE, machine, host_tsc_khz())
    if "console=ttyS0" not in args:
        args.append("console=ttyS0")
    return " ".join(args)


def qemu_command(
    machine: str, kernel: Path, initrd: Path, cmdline: str, console_log: Path, agent_sock: Path
) -> list[str]:
    serial_bus = "virtio-serial-device" if machine == "microvm" else "virtio-serial-pci"
    return [
        QEMU,
        "-accel",
        "tcg",
        "-M",
        machine,
        "-m",
        "256",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-monitor",
        "none",
        "-no-reboot",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        cmdline,
        "-serial",
        f"file:{console_log}",
        "-device",
        serial_bus,
        "-chardev",
        f"socket,id=agent,path={agent_sock},server=on,wait=off",
        "-device",
        f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
    ]


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
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
        if process.poll() is not None:
            raise ConnectionError(f"QEMU exited with status {process.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"QEMU did not create {path}")
        time.sleep(0.005)


def _diagnostics(workdir: Path) -> str:
    parts = []
    for name in ("console.log", "qemu.log"):
        path = workdir / name
        text = path.read_text(errors="replace") if path.exists() else "(missing)"
        parts.append(f"--- {name} (last 3000 chars) ---\n{text[-3000:]}")
    return "\n".join(parts)


def boot_and_greet(
    machine: str, kernel: Path, initrd: Path, cmdline: str, workdir: Path
) -> BootResult:
    """Boot, receive the hello, exchange heartbeats (both kinds), return what was seen."""
    workdir.mkdir(parents=True, exist_ok=True)
    console_log = workdir / "console.log"
    agent_sock = workdir / "agent.sock"
    command = qemu_command(machine, kernel, initrd, cmdline, console_log, agent_sock)
    spawned = time.monotonic()
    with running_qemu(command, workdir / "qemu.log") as process:
        try:
            sock = connect(agent_sock, process, spawned + BOOT_TIMEOUT_S)
            with sock:
                agent = AgentConnection(sock)
                hello = agent.receive(spawned + BOOT_TIMEOUT_S)
                hello_at = time.monotonic()
                assert isinstance(hello, AgentHello), hello

                agent.send(Heartbeat(seq=7))
                reply = agent.receive(time.monotonic() + REPLY_TIMEOUT_S)
                assert isinstance(reply, HeartbeatReply), reply
                assert reply.seq == 7
                assert reply.mem_total_kib > 0
                assert reply.uptime_s >= hello.boot_s

                # seq 0 asks the agent to introduce itself again, then answer.
                agent.send(Heartbeat(seq=0))
                again = agent.receive(time.monotonic() + REPLY_TIMEOUT_S)
                assert isinstance(again, AgentHello), again
                reply = agent.receive(time.monotonic() + REPLY_TIMEOUT_S)
                assert isinstance(reply, HeartbeatReply), reply
                assert reply.seq == 0
        except (AssertionError, OSError, TimeoutError) as exc:
            pytest.fail(f"{machine}: {exc!r}\n{_diagnostics(workdir)}", pytrace=False)
    return BootResult(
        hello=hello,
        spawn_to_hello_s=hello_at - spawned,
        console_log=console_log.read_text(errors="replace"),
    )


@pytest.fixture(scope="module")
def boot_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_boot_image(tmp_path_factory.mktemp("bootimage"))


@pytest.mark.parametrize("machine", ["microvm", "q35"])
def test_agent_says_hello_and_answers_heartbeats(
    machine: str, boot_image: Path, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    kernel = kernel_image()
    result = boot_and_greet(machine, kernel, boot_image, kernel_cmdline(machine), tmp_path)

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
    log: Path, text: str, process: subprocess.Popen[bytes], deadline: float
) -> None:
    while not (log.exists() and text in log.read_text(errors="replace")):
        if process.poll() is not None:
            raise ConnectionError(f"QEMU exited with status {process.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{text!r} never appeared on the console")
        time.sleep(0.05)


def test_agent_greets_a_host_that_connects_late_and_again_after_reconnecting(
    boot_image: Path, tmp_path: Path
) -> None:
    """The agent is up before the host connects; the host then drops and re-opens the channel."""
    machine = "microvm"
    kernel = kernel_image()
    console_log = tmp_path / "console.log"
    agent_sock = tmp_path / "agent.sock"
    command = qemu_command(
        machine, kernel, boot_image, kernel_cmdline(machine), console_log, agent_sock
    )
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    with running_qemu(command, tmp_path / "qemu.log") as process:
        try:
            # The agent has found its port and is waiting for the host.
            _wait_for_console(console_log, "zoned-agent: agent port", process, deadline)
            time.sleep(0.5)
            for _attempt in range(2):
                with connect(agent_sock, process, deadline) as sock:
                    agent = AgentConnection(sock)
                    # seq 0 guarantees a hello even if the agent missed the reconnection.
                    agent.send(Heartbeat(seq=0))
                    first = agent.receive(time.monotonic() + REPLY_TIMEOUT_S)
                    assert isinstance(first, AgentHello), first
                    message = agent.receive(time.monotonic() + REPLY_TIMEOUT_S)
                    while not isinstance(message, HeartbeatReply):
                        assert isinstance(message, AgentHello), message
                        message = agent.receive(time.monotonic() + REPLY_TIMEOUT_S)
                    assert message.seq == 0
                time.sleep(0.5)
        except (AssertionError, OSError, TimeoutError) as exc:
            pytest.fail(f"{machine}: {exc!r}\n{_diagnostics(tmp_path)}", pytrace=False)
    log = console_log.read_text(errors="replace")
    assert "zoned-agent: host disconnected" in log, log[-3000:]


def test_agent_runs_processes_in_the_zone(
    boot_image: Path, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    """One boot: python3 and busybox sh from the image, and 16 MiB of output, checksummed."""
    machine = "microvm"
    kernel = kernel_image()
    console_log = tmp_path / "console.log"
    agent_sock = tmp_path / "agent.sock"
    command = qemu_command(
        machine, kernel, boot_image, kernel_cmdline(machine), console_log, agent_sock
    )
    size = 16 * 1024 * 1024
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    with running_qemu(command, tmp_path / "qemu.log") as process:
        try:
            with connect(agent_sock, process, deadline) as sock:
                agent = AgentConnection(sock)
                hello = agent.receive(deadline)
                assert isinstance(hello, AgentHello), hello
                deadline = time.monotonic() + 600.0

                result = run_exec(agent, 1, ["python3", "-c", "print(2+2)"], deadline)
                assert result.exit == AgentExecExit(exec_id=1, exit_code=0), result
                assert (result.stdout, result.stderr) == (b"4\n", b"")

                result = run_exec(agent, 2, ["sh", "-c", "echo err >&2; exit 7"], deadline)
                assert result.exit == AgentExecExit(exec_id=2, exit_code=7), result
                assert (result.stdout, result.stderr) == (b"", b"err\n")

                generate = f"head -c {size} /dev/urandom | tee /tmp/blob"
                big = run_exec(agent, 3, ["sh", "-c", generate], deadline)
                assert big.exit == AgentExecExit(exec_id=3, exit_code=0), big.exit
                assert big.stderr == b""
                assert len(big.stdout) == size

                replay = run_exec(agent, 4, ["cat", "/tmp/blob"], deadline)
                assert replay.exit == AgentExecExit(exec_id=4, exit_code=0), replay.exit
                assert replay.stdout == big.stdout

                checksum = run_exec(agent, 5, ["sha256sum", "/tmp/blob"], deadline)
                assert checksum.exit == AgentExecExit(exec_id=5, exit_code=0), checksum
                digest = hashlib.sha256(big.stdout).hexdigest()
                assert checksum.stdout == f"{digest}  /tmp/blob\n".encode()
        except (AssertionError, OSError, TimeoutError) as exc:
            pytest.fail(f"{machine}: {exc!r}\n{_diagnostics(tmp_path)}", pytrace=False)
    generate_mb_s = size / big.seconds / 1e6
    cat_mb_s = size / replay.seconds / 1e6
    record_property("exec_urandom_tee_mb_s", round(generate_mb_s, 1))
    record_property("exec_cat_mb_s", round(cat_mb_s, 1))
    print(
        f"{machine}: 16 MiB from head|tee in {big.seconds:.2f}s ({generate_mb_s:.1f} MB/s),"
        f" cat in {replay.seconds:.2f}s ({cat_mb_s:.1f} MB/s)"
    )
