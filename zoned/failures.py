"""Why a zone failed, in words a user can act on (pure).

When a zone fails (its QEMU ended, its agent died, went silent or broke the
protocol, its boot timed out), the zone manager gathers :class:`Evidence`
and :func:`diagnose` turns it into a :class:`Diagnosis`: a cause, one of
:data:`CAUSES`, and a sentence for the zone's ``reason``. The sources:

- the host's kernel log, lines about this zone's QEMU (trusted): the host's
  OOM killer names the QEMU it killed and the memory cgroup it was in;
- libvirt's word for how the domain ended (``shutdown: guest``, ``stopped:
  failed``, ``crashed: panicked``, ``vanished``...) and the tail of
  libvirt's log of the domain's QEMU (QEMU's own errors, libvirt's
  ``shutting down, reason=crashed``) (trusted);
- the tail of the zone's serial console (hostile: the guest writes it, a
  workload may forge lines in it): the guest kernel's panic line, the OOM
  killer's lines, the agent's own memory report. Only lines of the shape the
  kernel or the agent print are read; what is quoted from them is cut to
  :data:`MAX_QUOTE_CHARS` printable characters. A workload that forges
  these lines can only mislead about its own zone, and never outranks the
  host's evidence;
- what the daemon saw of the agent (the fault that ended its link, whether
  it ever said hello).

Rules, first match wins:

1. the host's kernel log says its OOM killer killed the zone's QEMU:
   ``host_oom`` (the QEMU's memory limit, or the host as a whole);
2. the console shows a guest kernel panic: ``agent_died`` for "Attempted to
   kill init" (PID 1 is the agent: its exit code or signal is decoded),
   ``guest_oom`` for a panic on memory or one after the OOM killer's lines
   (with how much of the guest's RAM its tmpfs held, when the agent's last
   memory report says, and "too small to boot" before the agent's hello),
   else ``guest_panic`` with the panic line and the oops that led to it;
3. libvirt says QEMU crashed or failed: ``qemu_crashed``, with QEMU's last
   error line;
4. the guest shut itself down (powered off or rebooted without a panic):
   ``guest_stopped``;
5. the domain is gone and nothing says how (destroyed outside zoned):
   ``vanished``;
6. QEMU still runs: ``agent_silent``, ``agent_misbehaved`` or
   ``boot_timeout``, as the daemon saw it (for a silent agent, a paused
   QEMU is named).
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from typing import Final, Literal

#: What the daemon saw that made the zone fail.
Observed = Literal[
    "domain_stopped",  # libvirt said the domain stopped or shut down
    "domain_crashed",  # libvirt said the domain crashed
    "channel_closed",  # the agent channel broke and the domain is gone
    "agent_silent",  # no heartbeat reply within the silence limit
    "agent_misbehaved",  # the agent broke the agent protocol
    "boot_timeout",  # no hello within the boot timeout
]

Cause = Literal[
    "host_oom",
    "agent_died",
    "guest_oom",
    "guest_panic",
    "qemu_crashed",
    "guest_stopped",
    "vanished",
    "agent_silent",
    "agent_misbehaved",
    "boot_timeout",
]

CAUSES: Final[tuple[Cause, ...]] = Cause.__args__  # type: ignore[attr-defined]

#: Longest piece of a console or log line quoted in a reason.
MAX_QUOTE_CHARS: Final = 160
#: How much of the console and of QEMU's log the shell reads (their tails).
CONSOLE_TAIL_BYTES: Final = 64 * 1024
QEMU_LOG_TAIL_BYTES: Final = 16 * 1024

#: libvirt's words for a QEMU that ended abnormally.
_QEMU_FAILED: Final = ("crashed", "failed")


@dataclass(frozen=True)
class Evidence:
    """Everything known about a failed zone when it failed."""

    observed: Observed
    #: The daemon's own detail (the agent fault's message, libvirt's event).
    detail: str = ""
    #: libvirt's "<state>: <reason>" of the ended domain, "vanished" when the
    #: domain no longer exists, "" when it still runs or libvirt could not say.
    stop: str = ""
    #: libvirt's state of a domain that still runs ("running", "paused").
    running_state: str = ""
    console_tail: bytes = b""
    qemu_log_tail: bytes = b""
    #: Lines of the host kernel's log about this zone's QEMU (its pid, its cgroup).
    host_kernel_lines: tuple[str, ...] = ()
    #: The agent said hello at least once.
    booted: bool = False
    memory_mib: int = 0
    #: QEMU's memory limit (the zone's memory plus QEMU's own), None if unset.
    qemu_memory_limit_mib: int | None = None
    boot_timeout_s: float = 0.0
    silence_limit_s: float = 0.0


@dataclass(frozen=True)
class Diagnosis:
    cause: Cause
    reason: str


# ------------------------------------------------------------ reading text


_TIMESTAMP: Final = re.compile(r"^\s*\[\s*\d+\.\d+\]\s?")
_UNPRINTABLE: Final = re.compile(r"[^ -~]")


def clean(text: str, limit: int = MAX_QUOTE_CHARS) -> str:
    """A line fit to quote: the kernel's timestamp off, printable ASCII only, bounded."""
    text = _UNPRINTABLE.sub("?", _TIMESTAMP.sub("", text)).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def console_lines(tail: bytes, read_bytes: int = CONSOLE_TAIL_BYTES) -> list[str]:
    """The lines of a log's tail of at most ``read_bytes``, decoded without trusting
    them (a cut first line is dropped)."""
    text = tail.decode("utf-8", errors="replace")
    lines = text.replace("\r", "\n").split("\n")
    if len(tail) >= read_bytes and lines:
        lines = lines[1:]  # the read began mid-line
    return [line for line in lines if line.strip()]


_PANIC: Final = re.compile(r"Kernel panic - not syncing: (.*)")
_KILL_INIT: Final = re.compile(r"Attempted to kill init! exitcode=0x([0-9a-fA-F]{1,8})")
_OOM_PANIC: Final = (
    "System is deadlocked on memory",
    "Out of memory and no killable processes",
    "Out of memory: system-wide panic_on_oom",
    "Out of memory: compulsory panic_on_oom",
)
#: The boot image did not fit (the kernel's own words): "write error" when
#: unpacking it ran out of memory; "invalid magic at start of compressed
#: archive" when the kernel, decompressing itself in too little RAM, wrote
#: over it (microvm, 48 MiB). zoned checks every boot image's hash, so a
#: damaged one is not what a zone meets.
_UNPACK_FAILED: Final = "Initramfs unpacking failed: "
_OOM_KILLED: Final = re.compile(r"^Out of memory: Killed process \d+ \(([^)]{1,16})\)")
_OOPS: Final = re.compile(
    r"^(BUG: .*|Oops: .*|general protection fault.*|kernel BUG at .*|"
    r"Unable to handle kernel .*|WARNING: .*|\S+\[1\]: segfault at .*)"
)
#: The agent's own report when a process of its was OOM-killed
#: (zoned.agent.metrics.memory_report).
_AGENT_MEMORY: Final = re.compile(
    r"^zoned-agent: out of memory: .* guest RAM (\d+) MiB, (\d+) MiB available, "
    r"(\d+) MiB in tmpfs"
)


def _panic(lines: list[str]) -> tuple[int, str] | None:
    """The index and text of the last panic line, or None."""
    for index in range(len(lines) - 1, -1, -1):
        found = _PANIC.search(lines[index])
        if found:
            return index, found.group(1)
    return None


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _init_exit(code_hex: str) -> str:
    """How PID 1 ended, from the panic's exitcode (a wait status)."""
    status = int(code_hex, 16)
    if status & 0x7F:
        return f"was killed by {_signal_name(status & 0x7F)}"
    return f"exited with status {(status >> 8) & 0xFF}"


# --------------------------------------------------------------- the rules


def diagnose(evidence: Evidence) -> Diagnosis:
    """The cause and the words for it (see the module's rules)."""
    return (
        _host_oom(evidence)
        or _guest_panic(evidence)
        or _qemu_ended(evidence)
        or _agent_seen(evidence)
    )


def _host_oom(evidence: Evidence) -> Diagnosis | None:
    lines = evidence.host_kernel_lines
    if not lines:
        return None
    killed = [line for line in lines if "Killed process" in line]
    quote = (
        clean(killed[-1].split(" total-vm:")[0])
        if killed
        else "the OOM killer's report names its cgroup"
    )
    everything = " ".join(lines)
    if "CONSTRAINT_MEMCG" in everything or "Memory cgroup out of memory" in everything:
        limit = (
            f" of {evidence.qemu_memory_limit_mib} MiB"
            if evidence.qemu_memory_limit_mib is not None
            else ""
        )
        advice = (
            f"QEMU used more than its memory limit{limit} (the zone's {evidence.memory_mib} MiB"
            " plus qemu_memory_overhead_mib): raise qemu_memory_overhead_mib in zoned.toml"
        )
    else:
        advice = "the host itself ran out of memory: run fewer or smaller zones on it"
    return Diagnosis(
        "host_oom", f"the host's OOM killer killed the zone's QEMU ({quote}): {advice}"
    )


def _guest_panic(evidence: Evidence) -> Diagnosis | None:
    lines = console_lines(evidence.console_tail)
    found = _panic(lines)
    if found is None:
        return None
    index, text = found
    before = lines[:index]
    panic = clean(f"Kernel panic - not syncing: {text}")
    kill_init = _KILL_INIT.search(text)
    if kill_init:
        how = _init_exit(kill_init.group(1))
        faults = [clean(line) for line in before[-20:] if _OOPS.search(clean(line))]
        fault = f"; before it: {faults[-1]!r}" if faults else ""
        return Diagnosis(
            "agent_died",
            f"the zone's agent (its PID 1) {how}, and without it the guest kernel"
            f" panicked ({panic!r}{fault}): something in the zone killed or corrupted it",
        )
    # A victim named "init" is a child the agent forked and had not yet exec'd:
    # PID 1 itself is never the OOM killer's to take.
    if any(_UNPACK_FAILED in line for line in before):
        return Diagnosis("guest_oom", _guest_oom_words(evidence, before, panic, []))
    victims = [
        m.group(1)
        for line in before
        if (m := _OOM_KILLED.search(clean(line))) and m.group(1) != "init"
    ]
    if any(marker in text for marker in _OOM_PANIC) or victims:
        return Diagnosis("guest_oom", _guest_oom_words(evidence, before, panic, victims))
    oopses = [clean(line) for line in before[-40:] if _OOPS.search(clean(line))]
    cause = f" after {oopses[0]!r}" if oopses else ""
    return Diagnosis(
        "guest_panic",
        f"the guest kernel panicked ({panic!r}){cause}: the zone's kernel stops on any"
        " fault; the console log has the rest",
    )


def _guest_oom_words(evidence: Evidence, before: list[str], panic: str, victims: list[str]) -> str:
    memory = f"{evidence.memory_mib} MiB" if evidence.memory_mib else "its memory"
    if not evidence.booted:
        return (
            f"the zone's {memory} are too small to boot: the guest kernel ran out of memory"
            f" before the agent started ({panic!r}); give it more memory"
        )
    words = f"the guest ran out of memory ({memory}) and its kernel panicked ({panic!r})"
    if victims:
        names = ", ".join(dict.fromkeys(victims))
        words += f"; the OOM killer had killed: {names[:MAX_QUOTE_CHARS]}"
    reports = [m for line in before if (m := _AGENT_MEMORY.search(clean(line)))]
    if reports:
        total, _available, tmpfs = (int(x) for x in reports[-1].groups())
        words += f"; tmpfs held {tmpfs} MiB of its {total} MiB of RAM"
        if total and tmpfs * 3 >= total:
            words += (
                ", which no OOM kill frees (the files a workload writes to the zone's root,"
                " /tmp or /dev/shm, and its shared memory, live in RAM: write less there, or give"
                " the zone more memory)"
            )
            return words
    return words + "; give the zone more memory or make the workload use less"


def _qemu_ended(evidence: Evidence) -> Diagnosis | None:
    stop = evidence.stop
    if not stop and evidence.observed != "domain_crashed":
        return None
    log_lines = console_lines(evidence.qemu_log_tail, QEMU_LOG_TAIL_BYTES)
    shutdowns = [line for line in log_lines if "shutting down, reason=" in line]
    libvirt_reason = shutdowns[-1].rsplit("reason=", 1)[1].strip() if shutdowns else ""
    words = stop.replace("_", " ") if stop else evidence.detail
    if (
        evidence.observed == "domain_crashed"
        or any(word in stop for word in _QEMU_FAILED)
        or libvirt_reason in _QEMU_FAILED
    ):
        errors = [
            clean(line)
            for line in log_lines
            if line.startswith(("qemu-system", "qemu:")) or "terminating on signal" in line
        ]
        said = f"; QEMU's last words: {errors[-1]!r}" if errors else ""
        how = words if words and words != "vanished" else libvirt_reason
        return Diagnosis(
            "qemu_crashed",
            f"the zone's QEMU crashed (libvirt: {clean(how)}){said}: the zone's guest is lost",
        )
    # libvirt says "shutdown: host" when QEMU was told to stop from the host
    # (a destroy sends it SIGTERM first): not the guest's doing.
    from_host = "shutdown: host" in stop or libvirt_reason == "destroyed"
    if not from_host and ("shutdown" in stop or libvirt_reason == "shutdown"):
        last = console_lines(evidence.console_tail)
        tail = f"; the console's last line: {clean(last[-1])!r}" if last else ""
        return Diagnosis(
            "guest_stopped",
            f"the guest shut itself down (libvirt: {clean(words)}) without a kernel panic:"
            f" something in the zone powered it off or rebooted it{tail}",
        )
    if from_host or stop == "vanished" or "destroyed" in stop:
        how = libvirt_reason or (stop if stop != "vanished" else "")
        said = f" (libvirt: {clean(how)})" if how else ""
        return Diagnosis(
            "vanished",
            f"the zone's QEMU domain disappeared{said} without zoned asking: destroyed"
            " outside zoned (virsh, another tool), or libvirtd lost it",
        )
    return Diagnosis(
        "qemu_crashed", f"the zone's QEMU stopped (libvirt: {clean(words)}): the guest is lost"
    )


def _agent_seen(evidence: Evidence) -> Diagnosis:
    # The zone's reason starts with the lifecycle's meaning ("agent went
    # silent: ..."): these words carry on from it.
    detail = clean(evidence.detail, 2 * MAX_QUOTE_CHARS)
    if evidence.observed == "agent_misbehaved":
        return Diagnosis(
            "agent_misbehaved", f"{detail}: the zone's guest is not to be trusted any more"
        )
    if evidence.observed == "channel_closed":
        return Diagnosis(
            "qemu_crashed",
            f"{detail} while its QEMU still ran: QEMU's end of the agent channel broke,"
            " the zone is lost",
        )
    last = console_lines(evidence.console_tail)
    tail = f"the console's last line: {clean(last[-1])!r}" if last else "the console is empty"
    if evidence.observed == "boot_timeout" or not evidence.booted:
        return Diagnosis(
            "boot_timeout",
            f"the agent did not say hello within {evidence.boot_timeout_s:g} s of the start"
            f" ({tail}): the guest is too slow (a loaded host) or did not boot",
        )
    if evidence.running_state == "paused":
        return Diagnosis(
            "agent_silent",
            f"{detail}, and its QEMU was paused: something outside zoned paused the domain",
        )
    return Diagnosis(
        "agent_silent",
        f"{detail} while its QEMU still ran: the guest is hung or too loaded to answer"
        f" within {evidence.silence_limit_s:g} s ({tail})",
    )
