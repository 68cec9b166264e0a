"""Why a zone failed: the classifier on real captures (tests/data/failures), and
the shell's readers of what a failed zone left behind."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from zoned.failures import (
    CAUSES,
    CONSOLE_TAIL_BYTES,
    MAX_QUOTE_CHARS,
    QEMU_LOG_TAIL_BYTES,
    Diagnosis,
    Evidence,
    clean,
    diagnose,
)
from zoned.postmortem import host_kernel_lines, parse_kmsg_record, read_tail

DATA = Path(__file__).resolve().parent.parent / "data" / "failures"
#: The domain and QEMU pid of the zone in host-oom.kmsg.
OOM_DOMAIN = "ztr12x-h1"
OOM_PID = 5583


def capture(name: str) -> bytes:
    return (DATA / name).read_bytes()


def dmesg_messages(name: str) -> list[tuple[float, str]]:
    """A ``dmesg`` capture as (seconds, message), the way /dev/kmsg yields them."""
    found = []
    for line in capture(name).decode().splitlines():
        stamp, _, message = line.partition("] ")
        found.append((float(stamp.strip("[ ")), message))
    return found


def diagnosed(console: str = "", **fields: Any) -> Diagnosis:
    """:func:`diagnose` of evidence with the console capture ``console``."""
    if console:
        fields["console_tail"] = capture(console)
    return diagnose(Evidence(**fields))


def printable(reason: str) -> bool:
    return re.fullmatch(r"[ -~]*", reason) is not None


def test_init_exiting_with_a_status_is_told_apart_from_a_signal() -> None:
    console = (
        b"[    3.1] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\r\n"
    )
    found = diagnose(
        Evidence(observed="domain_stopped", stop="shutdown: guest", console_tail=console)
    )
    assert found.cause == "agent_died"
    assert "exited with status 1" in found.reason


#: Captures of real failures, what else the daemon knew, and what the
#: diagnosis must say: (capture, evidence, cause, fragments of the reason).
CAPTURED: list[tuple[str, dict[str, Any], str, list[str]]] = [
    (
        "agent-killed.console.log",
        {"observed": "channel_closed", "stop": "vanished", "booted": True, "memory_mib": 256},
        "agent_died",
        [
            "was killed by SIGSEGV",
            "Attempted to kill init! exitcode=0x0000000b",
            "init[1]: segfault at 0",
        ],
    ),
    (
        "boot-64mib.console.log",
        {"observed": "domain_stopped", "stop": "shutdown: guest", "memory_mib": 64},
        "guest_oom",
        ["the zone's 64 MiB are too small to boot", "System is deadlocked on memory"],
    ),
    (  # the boot image did not fit: a zone too small as well
        "boot-56mib-q35.console.log",
        {"observed": "domain_stopped", "stop": "shutdown: guest", "memory_mib": 56},
        "guest_oom",
        ["the zone's 56 MiB are too small to boot", "No working init found"],
    ),
    (  # the boot image, overwritten while the kernel decompressed itself
        "boot-48mib-microvm.console.log",
        {"observed": "domain_stopped", "stop": "shutdown: guest", "memory_mib": 48},
        "guest_oom",
        ["the zone's 48 MiB are too small to boot", "Unable to mount root fs"],
    ),
    (  # the victims the kernel named, once each; "init" (a child not yet
        # started) is not the agent and is left out
        "guest-oom-panic.console.log",
        {"observed": "channel_closed", "stop": "vanished", "booted": True, "memory_mib": 256},
        "guest_oom",
        [
            "the guest ran out of memory (256 MiB)",
            "the OOM killer had killed: dd, sh;",
            "give the zone more memory",
        ],
    ),
    (  # the agent's report after the OOM kill says what held the RAM
        "guest-oom-panic-agent-report.console.log",
        {
            "observed": "domain_stopped",
            "stop": "shutdown: guest",
            "booted": True,
            "memory_mib": 128,
        },
        "guest_oom",
        [
            "tmpfs held 80 MiB of its 109 MiB of RAM, which no OOM kill frees",
            "to the zone's root, /tmp or /dev/shm, and its shared memory, live in RAM",
        ],
    ),
]


@pytest.mark.parametrize(("console", "fields", "cause", "fragments"), CAPTURED)
def test_a_captured_failure_says_why(
    console: str, fields: dict[str, Any], cause: str, fragments: list[str]
) -> None:
    found = diagnosed(console, **fields)
    assert found.cause == cause, found
    for fragment in fragments:
        assert fragment in found.reason, (fragment, found.reason)
    if cause == "guest_oom" and not fields.get("booted"):
        # Before the agent's hello, the reason leads with the size.
        assert found.reason.startswith(fragments[0]), found.reason
    assert "[" not in found.reason.split("(")[0]  # no kernel timestamps quoted


def test_a_kernel_panic_that_is_not_about_memory_or_init() -> None:
    console = capture("guest-panic-vfs.console.log")
    assert b"\x1b" in console  # SeaBIOS's escape sequences are in the capture
    found = diagnose(
        Evidence(observed="domain_stopped", stop="shutdown: guest", console_tail=console)
    )
    assert found.cause == "guest_panic"
    assert "VFS: Unable to mount root fs on unknown-block(0,0)" in found.reason
    assert printable(found.reason)


def test_the_host_oom_killer_outranks_what_the_guest_says() -> None:
    lines = host_kernel_lines(OOM_DOMAIN, OOM_PID, 0.0, iter(dmesg_messages("host-oom.kmsg")))
    assert len(lines) == 2 and lines[0].startswith("oom-kill:"), lines
    # A guest that forged a panic of its own on the console does not change the answer.
    forged = b"[ 1.0] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000009\n"
    found = diagnosed(
        observed="domain_stopped",
        stop="stopped: failed",
        console_tail=forged,
        qemu_log_tail=capture("host-oom.qemu.log"),
        host_kernel_lines=lines,
        memory_mib=256,
        qemu_memory_limit_mib=320,
    )
    assert found.cause == "host_oom"
    assert "Memory cgroup out of memory: Killed process 5583 (qemu-system-x86)" in found.reason
    assert "its memory limit of 320 MiB" in found.reason
    assert "raise qemu_memory_overhead_mib" in found.reason


def test_the_host_oom_killer_without_the_pid_is_found_by_the_cgroup() -> None:
    lines = host_kernel_lines(OOM_DOMAIN, None, 0.0, iter(dmesg_messages("host-oom.kmsg")))
    assert [line.split(",")[0] for line in lines] == ["oom-kill:constraint=CONSTRAINT_MEMCG"]
    found = diagnose(
        Evidence(observed="domain_stopped", stop="stopped: failed", host_kernel_lines=lines)
    )
    assert found.cause == "host_oom"


def test_host_lines_of_other_zones_and_of_earlier_times_are_not_this_zones() -> None:
    messages = dmesg_messages("host-oom.kmsg")
    # Another zone whose name extends this one's, another pid, and a zone of the
    # same name from before this one was created.
    assert host_kernel_lines("ztr12x-h", 1, 0.0, iter(messages)) == ()
    assert host_kernel_lines("r12x-h1", None, 0.0, iter(messages)) == ()
    assert host_kernel_lines(OOM_DOMAIN, OOM_PID, 9000.0, iter(messages)) == ()


def test_a_global_host_oom_says_the_host_is_short() -> None:
    lines = (
        "oom-kill:constraint=CONSTRAINT_NONE,nodemask=(null),cpuset=/,mems_allowed=0,"
        "global_oom,task_memcg=/machine/qemu-3-zoned-web.libvirt-qemu,task=qemu-system-x86,"
        "pid=77,uid=2013265921",
        "Out of memory: Killed process 77 (qemu-system-x86) total-vm:1kB, anon-rss:1kB",
    )
    found = diagnose(Evidence(observed="domain_stopped", host_kernel_lines=lines))
    assert found.cause == "host_oom" and "the host itself ran out of memory" in found.reason


def test_a_qemu_killed_from_outside() -> None:
    found = diagnosed(
        observed="channel_closed",
        stop="vanished",
        console_tail=b"[    0.2] PCI: Fatal: No config space access function found\r\n",
        qemu_log_tail=capture("qemu-killed.qemu.log"),
        booted=True,
    )
    assert found == Diagnosis(
        "qemu_crashed",
        "the zone's QEMU crashed (libvirt: crashed): the zone's guest is lost",
    )


def test_a_qemu_that_failed_says_its_last_words() -> None:
    log = (
        b"char device redirected to /dev/pts/2 (label charserial0)\n"
        b"qemu-system-x86_64: ../../target/i386/tcg/translate.c:1: Assertion `x' failed.\n"
        b"2026-12-02 04:50:22.346+0000: shutting down, reason=crashed\n"
    )
    found = diagnose(
        Evidence(observed="domain_crashed", stop="crashed: unknown", qemu_log_tail=log)
    )
    assert found.cause == "qemu_crashed"
    assert "crashed: unknown" in found.reason and "Assertion `x' failed." in found.reason


def test_a_full_qemu_log_tail_drops_its_cut_first_line() -> None:
    # The tail began inside libvirt's logged command line, at "qemu-system...":
    # that piece is not QEMU's last words.
    end = b"2026-12-02 04:50:22.346+0000: shutting down, reason=crashed\n"
    cut = b"qemu-system-x86_64 -name guest=zone " + b"x" * QEMU_LOG_TAIL_BYTES
    log = cut[: QEMU_LOG_TAIL_BYTES - len(end) - 1] + b"\n" + end
    assert len(log) == QEMU_LOG_TAIL_BYTES
    found = diagnose(
        Evidence(observed="domain_crashed", stop="crashed: unknown", qemu_log_tail=log)
    )
    assert found == Diagnosis(
        "qemu_crashed",
        "the zone's QEMU crashed (libvirt: crashed: unknown): the zone's guest is lost",
    )


def test_a_guest_that_shut_itself_down() -> None:
    console = b"zoned-agent: host connected, hello at 2.691s\r\n"
    found = diagnose(
        Evidence(observed="domain_stopped", stop="shutdown: guest", console_tail=console)
    )
    assert found.cause == "guest_stopped"
    assert "without a kernel panic" in found.reason and "hello at 2.691s" in found.reason


def test_a_channel_that_qemu_closed_while_libvirt_says_it_runs() -> None:
    found = diagnosed(
        observed="channel_closed",
        detail="agent channel closed by QEMU",
        running_state="running",
        booted=True,
    )
    assert found == Diagnosis(
        "qemu_crashed",
        "agent channel closed by QEMU while its QEMU still ran: QEMU's end of the agent"
        " channel broke, the zone is lost",
    )


def test_a_domain_destroyed_outside_zoned() -> None:
    log = b"2026-12-02 04:50:22.346+0000: shutting down, reason=destroyed\n"
    found = diagnose(Evidence(observed="channel_closed", stop="vanished", qemu_log_tail=log))
    assert found.cause == "vanished" and "(libvirt: destroyed)" in found.reason
    event = diagnose(Evidence(observed="domain_stopped", stop="stopped: destroyed"))
    assert event.cause == "vanished"
    # A destroy's first event: QEMU told to stop from the host, not by its guest.
    first = diagnose(Evidence(observed="domain_stopped", stop="shutdown: host"))
    assert first.cause == "vanished" and "(libvirt: shutdown: host)" in first.reason, first
    assert "destroyed outside zoned" in first.reason
    guest = diagnose(Evidence(observed="domain_stopped", stop="shutdown: guest"))
    assert guest.cause == "guest_stopped", guest


def test_a_silent_agent_with_its_qemu_running_or_paused() -> None:
    detail = "no heartbeat reply within 3 s"
    running = diagnosed(
        observed="agent_silent",
        detail=detail,
        running_state="running",
        booted=True,
        silence_limit_s=3.0,
    )
    assert running.cause == "agent_silent"
    assert "while its QEMU still ran" in running.reason and detail in running.reason
    paused = diagnose(
        Evidence(observed="agent_silent", detail=detail, running_state="paused", booted=True)
    )
    assert paused.cause == "agent_silent" and "paused" in paused.reason


def test_a_misbehaving_agent_and_a_boot_timeout() -> None:
    bad = diagnose(
        Evidence(observed="agent_misbehaved", detail="agent sent a bad frame: x", booted=True)
    )
    assert bad.cause == "agent_misbehaved"
    assert bad.reason == "agent sent a bad frame: x: the zone's guest is not to be trusted any more"
    slow = diagnose(Evidence(observed="boot_timeout", running_state="running", boot_timeout_s=60.0))
    assert slow.cause == "boot_timeout"
    assert "within 60 s" in slow.reason and "the console is empty" in slow.reason


def test_every_cause_is_reachable() -> None:
    """The cases above between them produce every cause the module names."""
    seen = {
        diagnose(evidence).cause
        for evidence in (
            Evidence(
                observed="domain_stopped",
                host_kernel_lines=("oom-kill: x", "Killed process 1 (qemu"),
            ),
            Evidence(
                observed="channel_closed",
                stop="vanished",
                console_tail=capture("agent-killed.console.log"),
            ),
            Evidence(
                observed="domain_stopped",
                stop="shutdown: guest",
                console_tail=capture("boot-64mib.console.log"),
            ),
            Evidence(
                observed="domain_stopped", console_tail=capture("guest-panic-vfs.console.log")
            ),
            Evidence(observed="domain_crashed", stop="crashed: panicked"),
            Evidence(observed="domain_stopped", stop="shutdown: guest"),
            Evidence(observed="channel_closed", stop="vanished"),
            Evidence(observed="agent_silent", booted=True),
            Evidence(observed="agent_misbehaved"),
            Evidence(observed="boot_timeout"),
        )
    }
    assert seen == set(CAUSES)


def test_hostile_console_bytes_are_bounded_and_printable() -> None:
    flood = b"\x00\xff\x1b[2J" * 5000
    long_panic = b"Kernel panic - not syncing: " + b"\xe2\x80\xae\x07A" * 10_000
    console = flood + b"\n" + long_panic + b"\n" + b"\r\r\r" + b"\x9b" * 100
    found = diagnose(
        Evidence(observed="domain_stopped", stop="shutdown: guest", console_tail=console)
    )
    assert found.cause == "guest_panic"
    assert printable(found.reason)
    assert len(found.reason) < 3 * MAX_QUOTE_CHARS
    assert len(clean("x" * 10_000)) == MAX_QUOTE_CHARS


def test_kmsg_records_are_parsed_and_bad_ones_refused() -> None:
    record = (
        b"3,4021,8546397916,-;Memory cgroup out of memory: Killed process 5583 (qemu)\n"
        b" SUBSYSTEM=x\n"
    )
    assert parse_kmsg_record(record) == (
        8546.397916,
        "Memory cgroup out of memory: Killed process 5583 (qemu)",
    )
    for bad in (b"", b"no header", b"3,1;x", b"3,1,abc,-;x", b"3,1,2,-;"):
        assert parse_kmsg_record(bad) is None, bad


def test_tails_are_bounded_and_links_not_followed(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"a" * 10 + b"b" * CONSOLE_TAIL_BYTES)
    assert read_tail(log, CONSOLE_TAIL_BYTES) == b"b" * CONSOLE_TAIL_BYTES
    link = tmp_path / "link.log"
    link.symlink_to(log)
    assert read_tail(link, 100) == b""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert read_tail(fifo, 100) == b""
    assert read_tail(tmp_path / "missing", 100) == b""


@pytest.mark.parametrize("name", sorted(p.name for p in DATA.glob("*.console.log")))
def test_every_capture_gives_a_printable_bounded_reason(name: str) -> None:
    found = diagnose(
        Evidence(observed="domain_stopped", stop="shutdown: guest", console_tail=capture(name))
    )
    assert printable(found.reason) and len(found.reason) < 4 * MAX_QUOTE_CHARS, found
