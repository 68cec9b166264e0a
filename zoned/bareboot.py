"""Bare QEMU boots without libvirt: the baseline for benchmarks and kernel tests.

The daemon never uses this module. It exists so that tools and tests can boot
the same kernel and boot image with the same accelerator and machine type as
a zone, but straight from ``qemu-system-x86_64``, and compare.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from zoned.agent import AGENT_PORT_NAME
from zoned.domain import EMULATOR
from zoned.images.hostfiles import busybox_binary

if TYPE_CHECKING:
    from zoned.agentlink import AgentLink
    from zoned.protocol import AgentExecExit, AgentHello


def qemu_command(
    *,
    kernel: Path,
    initrd: Path,
    cmdline: Sequence[str],
    machine: str,
    serial_log: Path,
    accelerator: str = "tcg",
    memory_mib: int = 256,
    vcpus: int = 1,
    agent_socket: Path | None = None,
    disk: Path | None = None,
    free_page_reporting: bool = False,
    tcg_tb_cache_mib: int | None = None,
) -> list[str]:
    """The argv of a bare boot matching a zone's devices on ``machine``
    (the balloon and the TCG cache bound as :class:`zoned.domain.DomainSpec` has them)."""
    mmio = machine == "microvm"
    bus = "device" if mmio else "pci"
    machine_arg = "microvm,rtc=on" if mmio else "q35"
    argv = [
        EMULATOR,
        "-M",
        machine_arg,
        "-accel",
        accelerator
        if accelerator != "tcg" or tcg_tb_cache_mib is None
        else f"tcg,tb-size={tcg_tb_cache_mib}",
        "-cpu",
        "max" if accelerator == "tcg" else "host",
        "-m",
        str(memory_mib),
        "-smp",
        str(vcpus),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        " ".join(cmdline),
        "-chardev",
        f"file,id=serial0,path={serial_log}",
        "-serial",
        "chardev:serial0",
        "-object",
        "rng-random,id=rng0,filename=/dev/urandom",
        "-device",
        f"virtio-rng-{bus},rng=rng0",
    ]
    if agent_socket is not None:
        argv += [
            "-device",
            f"virtio-serial-{bus},id=vser0",
            "-chardev",
            f"socket,id=agent0,path={agent_socket},server=on,wait=off",
            "-device",
            f"virtserialport,bus=vser0.0,chardev=agent0,name={AGENT_PORT_NAME}",
        ]
    if free_page_reporting:
        argv += ["-device", f"virtio-balloon-{bus},free-page-reporting=on"]
    if disk is not None:
        argv += [
            "-drive",
            f"file={disk},if=none,id=disk0,format=raw,readonly=on",
            "-device",
            f"virtio-blk-{bus},drive=disk0",
        ]
    return argv


@dataclass(frozen=True)
class BootResult:
    seconds: float  # spawn to marker (or to exit/timeout when not seen)
    console: bytes
    seen: bool
    returncode: int | None


def boot_until(argv: list[str], serial_log: Path, marker: bytes, timeout: float) -> BootResult:
    """Spawn QEMU, wait until ``marker`` appears on the console (or QEMU exits), kill it."""
    serial_log.unlink(missing_ok=True)
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    seen = False
    try:
        while time.monotonic() - started < timeout:
            if serial_log.exists() and marker in serial_log.read_bytes():
                seen = True
                break
            if proc.poll() is not None:
                break
            time.sleep(0.01)
        elapsed = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return BootResult(
        elapsed,
        serial_log.read_bytes() if serial_log.exists() else b"",
        seen,
        proc.poll(),
    )


def wait_exit(argv: list[str], serial_log: Path, timeout: float) -> BootResult:
    """Boot until the guest stops by itself (with ``-no-reboot``, a reboot or a
    panic ends QEMU) or ``timeout`` passes (then QEMU is killed, ``seen`` False)."""
    serial_log.unlink(missing_ok=True)
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        returncode: int | None = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        returncode = None
    elapsed = time.monotonic() - started
    console = serial_log.read_bytes() if serial_log.exists() else b""
    if proc.stderr is not None:
        console += b"\n[qemu stderr] " + proc.stderr.read()
    return BootResult(elapsed, console, returncode is not None, returncode)


def busybox_initramfs(init_script: str, dest: Path) -> Path:
    """A minimal initramfs: Debian's static busybox and ``init_script`` as /init.

    The script runs under ``/bin/busybox sh``; it gets ``/bin`` with the
    busybox applets, an empty ``/proc``, ``/sys``, ``/dev`` (with a console
    node, or init would have no stdio) and ``/tmp``.
    """
    from zoned.cpio import CpioWriter

    busybox = busybox_binary()
    with dest.open("wb") as out:
        archive = CpioWriter(out)
        for directory in ("bin", "dev", "proc", "sys", "tmp", "mnt"):
            archive.directory(directory)
        archive.char_device("dev/console", 5, 1)
        archive.char_device("dev/null", 1, 3, mode=0o666)
        archive.file("bin/busybox", busybox.read_bytes(), mode=0o755)
        archive.symlink("bin/sh", "busybox")
        archive.file("init", ("#!/bin/busybox sh\n" + init_script).encode(), mode=0o755)
        archive.finish()
    return dest


class BareAgentBoot:
    """One bare QEMU of a zone's kernel and boot image, with its agent channel.

    For tools that compare with zoned (trio; imported lazily so that the
    synchronous helpers above stay light). :meth:`boot` spawns QEMU and
    waits for the agent's hello; :meth:`stop` ends it. ``argv`` comes from
    :func:`qemu_command` with ``agent_socket=socket``.
    """

    def __init__(self, argv: list[str], socket: Path) -> None:
        self.argv = argv
        self.socket = socket
        self.proc: subprocess.Popen[bytes] | None = None
        self.link: AgentLink | None = None
        self.hello: AgentHello | None = None

    async def boot(self) -> float:
        """Spawn to the agent's hello, in seconds (the hello is :attr:`hello`)."""
        import trio

        from zoned.agentlink import AgentLink
        from zoned.protocol import AgentHello

        self.socket.unlink(missing_ok=True)
        start = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        with trio.fail_after(120):
            self.link = await AgentLink.connect(self.socket, "bench")
            while not isinstance(message := await self.link.receive(), AgentHello):
                pass
        self.hello = message
        return time.monotonic() - start

    async def echo(self, seq: int) -> float:
        """A heartbeat's round trip on the channel, in seconds."""
        from zoned.protocol import Heartbeat, HeartbeatReply

        assert self.link is not None
        start = time.monotonic()
        await self.link.send(Heartbeat(seq=seq))
        while True:
            reply = await self.link.receive()
            if isinstance(reply, HeartbeatReply) and reply.seq == seq:
                return time.monotonic() - start

    async def stop(self) -> None:
        if self.link is not None:
            await self.link.aclose()
            self.link = None
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@dataclass(frozen=True)
class ExecBoot:
    """A bare boot to the agent's hello and one process run through the agent."""

    #: Spawn to the agent's hello, and to the process's end (seconds).
    hello_s: float
    done_s: float
    exit: AgentExecExit


class BareBootFailed(Exception):
    """The bare guest did not reach the agent, or the process was lost; says why."""


async def boot_and_exec(argv: list[str], agent_socket: Path, exec_argv: list[str]) -> ExecBoot:
    """Spawn QEMU (``argv`` with ``agent_socket``), wait for the agent's hello,
    run ``exec_argv`` through the agent to its end, kill QEMU.

    As a zone's ``run`` does without zoned. The caller bounds it with a cancel
    scope; :class:`BareBootFailed` if the guest dies or breaks the protocol.
    """
    import trio

    from zoned.agentlink import AgentLink, AgentMux, ExecLost
    from zoned.protocol import AgentExecExit, AgentExecStart, AgentHello

    started = time.monotonic()
    proc = await trio.lowlevel.open_process(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        link = await AgentLink.connect(agent_socket, "bare")
        try:
            hello = await link.receive()
            if not isinstance(hello, AgentHello):
                raise BareBootFailed(f"expected the agent's hello, got {type(hello).__name__}")
            hello_s = time.monotonic() - started
            mux = AgentMux(link, "bare")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(mux.receive_forever)
                session = await mux.start_exec(
                    lambda exec_id: AgentExecStart(exec_id=exec_id, argv=exec_argv)
                )
                while True:
                    event = await session.next_event()
                    if isinstance(event, ExecLost):
                        raise BareBootFailed(f"the process was lost: {event.reason}")
                    if isinstance(event, AgentExecExit):
                        break
                nursery.cancel_scope.cancel()
            return ExecBoot(hello_s, time.monotonic() - started, event)
        except Exception as exc:
            if isinstance(exc, BareBootFailed):
                raise
            raise BareBootFailed(f"{type(exc).__name__}: {exc}") from exc
        finally:
            with trio.CancelScope(shield=True):
                await link.aclose()
    finally:
        with trio.CancelScope(shield=True):
            proc.kill()
            await proc.wait()
            agent_socket.unlink(missing_ok=True)
