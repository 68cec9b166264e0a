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

from zoned.agent import AGENT_PORT_NAME
from zoned.domain import EMULATOR
from zoned.images.hostfiles import busybox_binary


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
) -> list[str]:
    """The argv of a bare boot matching a zone's devices on ``machine``."""
    mmio = machine == "microvm"
    bus = "device" if mmio else "pci"
    machine_arg = "microvm,rtc=on" if mmio else "q35"
    argv = [
        EMULATOR,
        "-M",
        machine_arg,
        "-accel",
        accelerator,
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
