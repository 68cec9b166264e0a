"""Why real zones fail: each failure made real, its cause and words asserted.

One private zoned serves the module (its agents may be silent 10 s); a second
one gives each QEMU only 64 MiB beyond its guest's RAM, which the host's OOM
killer enforces during the boot. Every zone is created at the smallest
memory its profile and machine accept (:mod:`zoned.sizes`), so the module
also shows that each of those sizes boots and runs Python; a size below it
is booted bare (zoned refuses it) to show what its console says.

What a workload can still do to its zone, from inside the workload sandbox
(docs/workloads.md): hold most of the RAM in SysV shared memory, which the
zone's workloads share and which outlives the process that filled it; its
processes are OOM-killed and the zone lives. What it no longer can: reach
the agent. Zeroing PID 1's stack through ``/proc/1/mem`` killed the agent
before the sandbox (the capture ``tests/data/failures/agent-killed.console.log``
is what the unit tests classify as ``agent_died``); now PID 1 of a
workload's PID namespace is the sandbox's init, which is not dumpable, and
the agent is outside it. Signals cannot kill the agent either
(``test_exec.py``). A guest that panics out of memory after its boot is
classified from captures only: no workload here brings one about any more.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from tests.integration.conftest import open_libvirt, private_zoned, qemu_pid
from tests.zone_events import EventLog, watching
from tests.zonectl_run import zonectl
from zoned import protocol as p
from zoned import sizes
from zoned.bareboot import qemu_command, wait_exit
from zoned.client import Client
from zoned.config import Config
from zoned.failures import CONSOLE_TAIL_BYTES, Evidence, diagnose
from zoned.hostinfo import host_tsc_khz
from zoned.images.bootimage import build_boot_image
from zoned.images.workloadroot import build_workload_root
from zoned.kernel.cmdline import hardened_cmdline
from zoned.kernel.store import DEFAULT_STORE, find_kernel
from zoned.localdaemon import LocalDaemon

pytestmark = pytest.mark.integration

CALL_TIMEOUT_S = 180.0
#: The host's zones' default machine.
MACHINE: p.Machine = "microvm"

# Zeroes PID 1's stack through /proc/1/mem: the agent faults and dies.
KILL_PID_1 = """
with open("/proc/1/maps") as maps:
    for line in maps:
        if line.rstrip().endswith("[stack]"):
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
with open("/proc/1/mem", "r+b", buffering=0) as mem:
    mem.seek(start)
    mem.write(b"\\0" * (end - start))
"""

# A SysV shared memory segment as large as the guest's RAM, touched page by
# page: its toucher is OOM-killed, the segment (and what it touched) stays.
FILL_SHM = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.shmget.restype = ctypes.c_int
libc.shmget.argtypes = (ctypes.c_int, ctypes.c_size_t, ctypes.c_int)
libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
with open("/proc/meminfo") as f:
    total = int(f.readline().split()[1]) * 1024
segment = libc.shmget(0, total, 0o1000 | 0o600)  # IPC_PRIVATE, IPC_CREAT
assert segment >= 0, ctypes.get_errno()
ctypes.memset(libc.shmat(segment, None, 0), 1, total)
"""

PROBE = ["python3", "-c", "print(sum(range(10)))"]
# A run of the profile whose boot touches all of the guest's RAM (init_on_free).
TIGHT_RUN = ["--name", "fo-tight", "--profile", "containers", "--", "true"]


@pytest.fixture(scope="module")
def zoned() -> Iterator[LocalDaemon]:
    with private_zoned("fz-", extra_config="agent_silence_s = 10.0") as daemon:
        yield daemon


@contextlib.asynccontextmanager
async def zone_at_minimum(
    daemon: LocalDaemon, name: str, profile: str, machine: p.Machine, memory: int | None = None
) -> AsyncIterator[tuple[Client, EventLog]]:
    """A zone of the smallest size its profile and machine accept (or of
    ``memory`` MiB), shown to run Python, with an event log; destroyed after."""
    async with Client(daemon.socket, client_name="it") as client, watching(client) as events:
        with trio.fail_after(CALL_TIMEOUT_S):
            memory = memory or sizes.minimum_memory_mib(profile, machine)
            zone = await client.create_zone(
                name,
                memory_mib=memory,
                profile=profile,
                machine=machine,
            )
            assert (zone.state, zone.memory_mib) == ("ready", memory), zone
            ran = await client.exec(name, PROBE)
            assert (ran.exit.exit_code, ran.stdout) == (0, b"45\n"), ran
        try:
            yield client, events
        finally:
            with trio.fail_after(CALL_TIMEOUT_S):
                await client.destroy_zone(name)


async def failed(client: Client, events: EventLog, name: str) -> p.ZoneInfo:
    with trio.fail_after(CALL_TIMEOUT_S):
        await events.wait_for_state(name, "failed")
    return await client.get_zone(name)


def console(daemon: LocalDaemon, zone: p.ZoneInfo) -> str:
    return Path(zone.console_log).read_text(errors="replace")[-3000:]


async def test_a_full_writable_layer_is_enospc_and_the_zone_lives(zoned: LocalDaemon) -> None:
    """/ and /tmp filled to the end: the writer gets ENOSPC, the zone carries
    on (one tmpfs, half the RAM, holds all a workload writes); once the files
    are gone Python runs again. 256 MiB: in the smallest zone, half the RAM
    is about all that is free, and the writer may be OOM-killed before the
    layer is full (the zone lives then too)."""
    name = "fz-full"
    async with zone_at_minimum(zoned, name, "strict", MACHINE, 256) as (client, _events):
        with trio.fail_after(CALL_TIMEOUT_S):
            filled = await client.exec(
                name,
                [
                    "sh",
                    "-c",
                    "cat /dev/zero > /big; echo root=$?; cat /dev/zero > /tmp/big; echo tmp=$?;"
                    " df -k / /tmp | tail -n 2",
                ],
            )
            await client.exec(name, ["rm", "/big", "/tmp/big"])
            after = await client.exec(name, PROBE)
            zone = await client.get_zone(name)
    lines = filled.stdout.decode().splitlines()
    assert lines[:2] == ["root=1", "tmp=1"], filled
    assert filled.stderr.count(b"No space left on device") == 2, filled
    # Both full, and both the same filesystem's figures: one limit for both.
    root, tmp = (line.split()[1:4] for line in lines[2:4])
    assert root == tmp and root[2] == "0", lines
    assert (after.exit.exit_code, after.stdout) == (0, b"45\n"), after
    assert zone.state == "ready", zone


async def test_what_killed_the_agent_is_refused_by_the_sandbox(zoned: LocalDaemon) -> None:
    """The workload that zeroed the agent's stack (and made the capture the
    ``agent_died`` unit tests classify) is refused: its PID 1 is the sandbox's
    undumpable init. The zone lives, at q35's smallest strict size."""
    name = "fz-agent"
    async with zone_at_minimum(zoned, name, "strict", "q35") as (client, _events):
        with trio.fail_after(CALL_TIMEOUT_S):
            tried = await client.exec(name, ["python3", "-c", KILL_PID_1])
            after = await client.exec(name, PROBE)
            zone = await client.get_zone(name)
    assert tried.exit.exit_code == 1 and b"PermissionError" in tried.stderr, tried
    assert (after.exit.exit_code, after.stdout) == (0, b"45\n"), after
    assert (zone.state, zone.failure) == ("ready", ""), zone


async def test_shared_memory_that_fills_the_ram_is_oom_killed_and_the_zone_lives(
    zoned: LocalDaemon,
) -> None:
    """A SysV segment as large as the RAM, touched: its toucher is OOM-killed
    (what it touched stays in the segment, nothing frees it), and the zone
    lives: the agent and the sandbox's init are not the OOM killer's to
    take. (Touching it again leaves the guest with ~3 MiB: it thrashes for
    minutes before the OOM killer acts, under TCG.)"""
    name = "fz-oom"
    async with zone_at_minimum(zoned, name, "containers", MACHINE) as (client, _events):
        with trio.fail_after(CALL_TIMEOUT_S):
            filled = await client.exec(name, ["python3", "-c", FILL_SHM])
            # Whatever runs next may be OOM-killed too (a few MiB are left).
            zone = await client.get_zone(name)
    assert filled.exit.oom_killed, filled
    assert (zone.state, zone.failure) == ("ready", ""), zone


def test_a_zone_too_small_to_boot_is_told_so(tmp_path: Path) -> None:
    """What zoned.sizes refuses (so zoned cannot boot it), booted bare: the
    zone's kernel, boot image, workload root and command line in 48 MiB on
    microvm. The guest stops by itself, and the diagnosis of its console says
    the zone is too small (the capture boot-48mib-microvm.console.log)."""
    memory = 48
    assert memory < sizes.minimum_memory_mib("strict", MACHINE)
    cache = Path(Config().image_cache)
    serial = tmp_path / "serial.log"
    argv = qemu_command(
        kernel=find_kernel(DEFAULT_STORE, "strict").image,
        initrd=build_boot_image(cache),
        cmdline=hardened_cmdline("strict", MACHINE, host_tsc_khz()),
        machine=MACHINE,
        serial_log=serial,
        memory_mib=memory,
        agent_socket=tmp_path / "agent.sock",
        disk=build_workload_root(cache),
    )
    done = wait_exit(argv, serial, CALL_TIMEOUT_S)
    assert done.seen, done  # QEMU ended by itself (the guest's panic, -no-reboot)
    found = diagnose(
        Evidence(
            observed="domain_stopped",
            stop="shutdown: guest",
            console_tail=serial.read_bytes()[-CONSOLE_TAIL_BYTES:],
            memory_mib=memory,
        )
    )
    assert found.cause == "guest_oom", (found, done.console[-2000:])
    assert found.reason.startswith("the zone's 48 MiB are too small to boot"), found.reason


async def test_a_qemu_killed_on_the_host(zoned: LocalDaemon) -> None:
    name = "fz-qemu"
    async with zone_at_minimum(zoned, name, "containers", "q35") as (client, events):
        pid = qemu_pid(zoned.domain_name(name))
        assert pid is not None
        subprocess.run(["kill", "-KILL", str(pid)], check=True)
        zone = await failed(client, events, name)
    assert zone.failure == "qemu_crashed", zone.reason
    # libvirt says it as its event ("stopped: failed") or its log ("crashed"),
    # whichever reached the daemon first.
    assert zone.reason.startswith("domain stopped: the zone's QEMU crashed (libvirt: "), zone.reason
    assert zone.reason.endswith("): the zone's guest is lost"), zone.reason


async def test_an_agent_silent_because_its_qemu_was_paused(zoned: LocalDaemon) -> None:
    name = "fz-silent"
    async with zone_at_minimum(zoned, name, "strict", MACHINE) as (client, events):

        def pause() -> None:
            conn = open_libvirt()
            try:
                conn.lookupByName(zoned.domain_name(name)).suspend()
            finally:
                conn.close()

        await trio.to_thread.run_sync(pause)
        zone = await failed(client, events, name)
    assert zone.failure == "agent_silent", zone.reason
    assert zone.reason == (
        "agent went silent: no heartbeat reply within 10 s, and its QEMU was paused:"
        " something outside zoned paused the domain"
    ), zone.reason


def test_the_host_oom_killer_taking_qemu(tmp_path: Path) -> None:
    """QEMU may use 64 MiB beyond the guest's RAM; under TCG it needs more while
    a containers zone boots (its init_on_free touches all of the guest's RAM),
    and the memory cgroup's OOM killer takes it. ``run`` then leaves nothing
    behind."""
    with private_zoned("fo-", extra_config="qemu_memory_overhead_mib = 64") as daemon:
        done = zonectl(daemon, "run", *TIGHT_RUN)
        assert done.returncode == 1, done
        error = done.stderr.decode()
        assert "failed to boot: domain stopped: the host's OOM killer killed the zone's QEMU" in (
            error
        ), error
        assert "Memory cgroup out of memory: Killed process" in error, error
        assert "raise qemu_memory_overhead_mib" in error, error
        for part in ("state/zones", "run/zones"):
            assert list((daemon.root / part).glob("*")) == [], part
        assert "could not destroy" not in daemon.log_text()
