"""Running processes in zones for control-socket clients: exec and run.

``exec`` streams one process of a ready zone to its client: ``exec_started``,
``exec_output`` pieces in order, then ``exec_exit``. Stream input
(``exec_input``, ``exec_signal``) from the same client goes to the process
while it runs. Output is taken from the agent only as fast as the client
reads it (each piece is credited back to the agent after it was sent), so a
slow client slows the process down instead of filling the daemon's memory.

A plain ``exec`` whose client goes away (disconnects, or cancels the
request) hangs its process up, as a terminal that closes does: the process
group gets SIGHUP and, if it has not ended :data:`HANGUP_GRACE_S` later,
SIGKILL; its output is dropped meanwhile, and the process leaves the zone's
count of running processes when it ends. There is no detached exec: a
process that must outlive its client belongs in a ``run`` of its own, or in
a service the workload starts itself (``setsid``, a double fork: what the
agent does not follow is not hung up either).

``run`` is create + exec + destroy in one request. Its ``timeout_s`` is
the time the *process* may run, counted from its start: the zone's boot is
not counted (the daemon's ``boot_timeout_s`` bounds it, and a zone that
does not boot fails the run with ``hypervisor``). When it passes, the
process group gets SIGKILL and ``exec_exit.timed_out`` is set (zonectl
exits 124). The zone is destroyed whatever happens: the process ends, the
timeout passes, the client disconnects (its request is cancelled; the
destroy runs shielded). A run destroys only the zone it created: a name
that is taken fails the run with ``conflict`` and leaves that zone alone.

A process that cannot start (no such command, no permission) is reported as
a shell would: a message on its stderr and exit status 127 (not found: the
agent's ``errno`` is ``ENOENT``) or 126 (anything else).

A process whose end nobody can know (its zone went away, or its agent lost
its session) fails its request with ``hypervisor``.
"""

from __future__ import annotations

import errno
import logging
import math
import secrets
import signal
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

import trio

from zoned import protocol as p
from zoned.access import Caller
from zoned.agentlink import ExecLost, ExecOutputPiece, ExecSession
from zoned.errors import HypervisorError, InternalError, ZonedError
from zoned.server import Send, StreamInputs
from zoned.zones import ZoneManager

log = logging.getLogger(__name__)

#: After a run's timeout killed its process, how long to wait for the exit.
KILL_GRACE_S = 10.0
#: After a hang-up (SIGHUP), how long a process has to end before SIGKILL.
HANGUP_GRACE_S = 2.0


def start_error_status(end: p.AgentExecExit) -> int:
    """The shell's exit status for a process that could not start."""
    return 127 if end.errno == errno.ENOENT else 126


async def _pump_input(session: ExecSession, inputs: StreamInputs) -> None:
    if inputs is None:
        return
    async for message in inputs:
        if isinstance(message, p.ExecInput):
            await session.write_input(message.data, message.eof)
        elif isinstance(message, p.ExecResize):
            await session.resize(message.rows, message.cols)
        elif isinstance(message, p.ExecSignal):
            await session.signal(message.signal)
        else:  # the conversation forwards exec input only to an exec
            raise InternalError(f"{type(message).__name__} is not input for a process")


async def stream_exec(
    request_id: int,
    session: ExecSession,
    send: Send,
    inputs: StreamInputs,
    *,
    timeout_s: float | None = None,
    before_end: Callable[[], Awaitable[None]] | None = None,
    hang_up: bool = True,
) -> None:
    """Forward one process's life to the client until its ``exec_exit``.

    ``timeout_s`` counts from now (the process has been started).
    ``before_end`` runs between the process's end and the ``exec_exit`` that
    reports it (``run`` destroys its zone there: a client that has the result
    finds the zone gone). With ``hang_up``, a process whose client goes away
    before its end is hung up (see the module's rules).
    """
    try:
        end, timed_out = await _follow(request_id, session, send, inputs, timeout_s)
    except BaseException:
        if hang_up and session.ended is None:
            with trio.CancelScope(shield=True):
                await hang_up_process(session)
        raise
    if before_end is not None:
        await before_end()
    await _send_end(request_id, end, send, timed_out)


async def hang_up_process(session: ExecSession) -> None:
    """SIGHUP to a process nobody follows any more, SIGKILL if it lingers; it is
    forgotten once it ends (:meth:`ExecSession.abandon`)."""
    await session.abandon()
    await session.signal(signal.SIGHUP)
    with trio.move_on_after(HANGUP_GRACE_S):
        await session.wait_ended()
    await session.signal(signal.SIGKILL)


async def _follow(
    request_id: int,
    session: ExecSession,
    send: Send,
    inputs: StreamInputs,
    timeout_s: float | None,
) -> tuple[p.AgentExecExit | ExecLost, bool]:
    """The process's life up to its end, sent to the client; (the end, timed out)."""
    timed_out = False
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_pump_input, session, inputs)
        deadline = trio.current_time() + timeout_s if timeout_s is not None else math.inf
        while True:
            with trio.move_on_at(deadline) as scope:
                event = await session.next_event()
            if scope.cancelled_caught:
                if timed_out:
                    raise HypervisorError(
                        f"the process did not end within {KILL_GRACE_S:g} s of SIGKILL"
                    )
                timed_out = True
                await session.signal(signal.SIGKILL)
                deadline = trio.current_time() + KILL_GRACE_S
                continue
            if isinstance(event, p.AgentExecStarted):
                await send(p.ExecStarted(id=request_id, pid=event.pid))
            elif isinstance(event, ExecOutputPiece):
                await send(p.ExecOutput(id=request_id, stream=event.stream, data=event.data))
            else:
                end = event
                break
        nursery.cancel_scope.cancel()  # stop taking input
    return end, timed_out


async def _send_end(
    request_id: int, end: p.AgentExecExit | ExecLost, send: Send, timed_out: bool
) -> None:
    if isinstance(end, ExecLost):
        raise HypervisorError(end.reason)
    if end.error:
        message = f"zoned: {end.error}\n".encode()[: p.MAX_EXEC_CHUNK]
        await send(p.ExecOutput(id=request_id, stream="stderr", data=message))
        await send(p.ExecExit(id=request_id, exit_code=start_error_status(end)))
        return
    await send(p.exec_exit_reply(request_id, end, timed_out=timed_out))


async def exec_in_zone(
    manager: ZoneManager, request: p.Exec, send: Send, inputs: StreamInputs, caller: Caller
) -> None:
    session = await manager.start_exec(request.zone, request, caller)
    await stream_exec(request.id, session, send, inputs)


def run_zone_name(request: p.RunZone) -> str:
    return request.name or f"run-{secrets.token_hex(4)}"


class CreateZone(Protocol):
    """How ``run`` gets its zone: a warm pool's or a cold boot (zoned.pools.PoolKeeper.create)."""

    async def __call__(
        self,
        request: p.CreateZone,
        caller: Caller,
        *,
        registered: Callable[[str], object] | None = None,
    ) -> p.ZoneInfo: ...


#: A run's fields that are its zone's (the process's are not CreateZone's).
_ZONE_OF_RUN: Final = tuple(
    field
    for field in p.RunZone.__struct_fields__
    if field in p.CreateZone.__struct_fields__ and field not in ("name", "labels")
)


async def run_in_fresh_zone(
    manager: ZoneManager,
    create_zone: CreateZone,
    request: p.RunZone,
    send: Send,
    inputs: StreamInputs,
    caller: Caller,
) -> None:
    """Have a zone owned by ``caller`` (booted for it, or never used from a
    pool), run the process, destroy the zone (the one this run got, never
    another of the same name)."""
    name = run_zone_name(request)
    create = p.CreateZone(
        **{field: getattr(request, field) for field in _ZONE_OF_RUN},
        name=name,
        labels={**request.labels, "zoned.run": "1"},
    )
    ours: list[str] = []  # the uuid of the zone this run created, once it exists

    async def destroy() -> None:
        """Destroy this run's zone if it still exists (shielded; logged, not raised)."""
        with trio.CancelScope(shield=True):
            zone = manager.zones.get(name)
            if zone is None or zone.record.uuid not in ours:
                return
            try:
                await manager.destroy(name, caller)
            except ZonedError as exc:
                log.warning("run: could not destroy zone %s: %s", name, exc)

    try:
        zone = await create_zone(create, caller, registered=ours.append)
        await send(p.ZoneReply(id=request.id, zone=zone))
        session = await manager.start_exec(name, request, caller)
        await stream_exec(
            request.id,
            session,
            send,
            inputs,
            timeout_s=request.timeout_s,
            before_end=destroy,
            hang_up=False,  # the zone goes, with everything in it
        )
    finally:
        await destroy()
