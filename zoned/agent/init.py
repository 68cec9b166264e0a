"""The guest agent's entry point: PID 1 of a zone.

The boot image's ``/init`` (written by :mod:`zoned.bootimage`) calls
:func:`main`, which never returns: if PID 1 exits, the kernel panics and the
zone is gone. Every failure is written to the console (the kernel gives init
``/dev/console`` as stdio, which is the zone's serial log) and retried.

Start-up, in order, with nothing imported that the step does not need
(under TCG every import costs tens of milliseconds of boot time):

1. write ``zoned-agent: starting`` to the console;
2. set the system up (:mod:`zoned.agent.system`): mount the kernel's
   filesystems, make sure of stdio, stop handling signals (a workload must
   not be able to interrupt PID 1), name the host, bring ``lo`` up;
3. find the virtio-serial port named ``org.zoned.agent.0`` through
   ``/sys/class/virtio-ports/vport*/name`` and open its ``/dev/vportNpM``;
4. as soon as the host is connected, send ``AgentHello``, encoded by
   :mod:`zoned.agent.hello` without msgspec;
5. only then import :mod:`zoned.protocol` (msgspec: ~0.6 s under TCG), mount
   the workload root, and serve the channel forever
   (:mod:`zoned.agent.channel`), reaping orphaned children as PID 1 must.

:mod:`zoned.agent.execs` (the processes the host runs in the zone, with
:mod:`zoned.agent.spawn` and :mod:`zoned.agent.cgroups`) is imported only
when the first ``agent_exec_*`` message arrives.

Measured under TCG (6.12 strict kernel, microvm, median of 20 boots): the
agent is running ~0.21 s after the interpreter starts /init, the hello
leaves ~0.06 s after that; the protocol import follows the hello.

Every module the agent imports after start-up must be importable in the guest:
:data:`LATE_IMPORTS` names those imported lazily, so that the boot image
builder ships them too.
"""

from __future__ import annotations

import time

from zoned.agent.channel import RETRY_S, serve_forever
from zoned.agent.system import (
    bring_up_loopback,
    console,
    ensure_stdio,
    log_exception,
    mount_filesystems,
    set_hostname,
    stop_handling_signals,
)

#: Modules imported lazily (after the hello, or on error paths); the boot
#: image builder imports them too when it computes the image's module set.
LATE_IMPORTS = (
    "zoned.protocol",
    "zoned.agent.metrics",
    "zoned.agent.execs",
    "zoned.agent.network",
    "_socket",
    "traceback",
    "fcntl",
    "termios",
)


def main(python_started: float | None = None) -> None:
    """Run as PID 1: set the system up and serve the agent channel; never returns.

    ``python_started`` is ``time.monotonic()`` (seconds since boot) as the
    interpreter began running /init, for the boot timeline on the console.
    """
    started = f" (python at {python_started:.3f}s)" if python_started is not None else ""
    console(f"starting at {time.monotonic():.3f}s{started}")
    try:
        stop_handling_signals()
        mount_filesystems()
        ensure_stdio()
        set_hostname()
        bring_up_loopback()
    except BaseException:
        log_exception("system set-up failed")
    while True:
        try:
            serve_forever()
        except BaseException:
            # Only reachable through an exception inside the handler itself.
            time.sleep(RETRY_S)


def warm_up() -> None:
    """Exercise the protocol without IO, so that an import trace sees every lazy import.

    Used by :mod:`zoned.bootimage` on the host; not called in the guest.
    """
    from zoned.agent import AGENT_NAME
    from zoned.agent.execs import sanitize
    from zoned.protocol import (
        AGENT_MAX_FRAME,
        PROTOCOL_VERSION,
        AgentExecExit,
        AgentExecOutput,
        AgentExecResize,
        AgentExecStart,
        AgentHello,
        FrameDecoder,
        Heartbeat,
        HeartbeatReply,
        decode_to_agent,
        encode_frame,
    )

    decoder = FrameDecoder(AGENT_MAX_FRAME)
    decoder.feed(encode_frame(Heartbeat(seq=PROTOCOL_VERSION), AGENT_MAX_FRAME))
    decoder.feed(encode_frame(AgentExecStart(exec_id=1, argv=["true"]), AGENT_MAX_FRAME))
    decoder.feed(encode_frame(AgentExecResize(exec_id=1, rows=24, cols=80), AGENT_MAX_FRAME))
    while (payload := decoder.next_frame()) is not None:
        decode_to_agent(payload)
    encode_frame(AgentExecOutput(exec_id=1, stream="stdout", data=b"x"), AGENT_MAX_FRAME)
    encode_frame(AgentExecExit(exec_id=1, error=sanitize("x"), errno=2), AGENT_MAX_FRAME)
    encode_frame(
        AgentExecExit(exec_id=1, signal=9, oom_killed=True, cpu_time_s=0.5, memory_peak_kib=1),
        AGENT_MAX_FRAME,
    )
    encode_frame(
        AgentHello(version=1, agent=AGENT_NAME, kernel_release="x", boot_s=0.0, pid=1),
        AGENT_MAX_FRAME,
    )
    encode_frame(
        HeartbeatReply(seq=1, uptime_s=0.0, load1=0.0, mem_total_kib=0, mem_available_kib=0),
        AGENT_MAX_FRAME,
    )
