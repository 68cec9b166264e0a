"""The processes a sandbox runs for E2B callers: zoned execs that outlive a request.

envd's processes are not tied to the call that started them: ``Start``
streams a process's events, and when that stream ends (the caller went
away, its timeout passed) the process goes on; ``Connect`` streams it again,
``SendInput``/``SendSignal``/``CloseStdin`` act on it by pid, ``List``
names the ones running. zoned's exec is a stream on one control connection,
so each process here is a task of the endpoint holding its own in-process
connection (:meth:`zoned.e2b.service.E2bEndpoint.client`) and its
:class:`~zoned.client.Process`, and fanning its events out to whoever
streams it.

Rules:

- A :class:`RunningProcess` is in its sandbox's table from its start event
  until its end; then every stream of it gets the end event and closes.
- Events go to each stream in order through a bounded channel: a stream
  that does not keep up holds the process's output back (zoned's exec flow
  control), until the HTTP layer gives up on a client that does not read
  and the stream is dropped. Output nobody streams is dropped.
- A process whose zone went away ends its streams with ``unavailable``
  "sandbox ... was not found" (the SDK's ``SandboxNotRunningException``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

import trio

from zoned.access import Caller
from zoned.client import Client, Process
from zoned.e2b import connectrpc as rpc
from zoned.e2b import envd
from zoned.errors import ZonedError

log = logging.getLogger(__name__)

#: Events queued per stream before the process's output waits for it.
STREAM_BUFFER = 64
#: Processes at once per sandbox.
MAX_PROCESSES = 256
#: How often a quiet stream gets a keepalive event when the caller names no interval.
DEFAULT_KEEPALIVE_S = 50.0


@dataclass(eq=False)
class RunningProcess:
    pid: int
    tag: str | None
    config: envd.ProcessConfig
    pty: bool
    process: Process
    streams: list[trio.MemorySendChannel[bytes]] = field(default_factory=list)
    #: The error if its stream failed.
    error: rpc.RpcError | None = None
    done: trio.Event = field(default_factory=trio.Event)

    def subscribe(self) -> trio.MemoryReceiveChannel[bytes]:
        send, receive = trio.open_memory_channel[bytes](STREAM_BUFFER)
        self.streams.append(send)
        return receive

    async def publish(self, message: bytes) -> None:
        for send in list(self.streams):
            try:
                await send.send(message)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.streams.remove(send)

    def finish(self) -> None:
        for send in self.streams:
            send.close()
        self.streams.clear()
        self.done.set()

    def record(self) -> envd.ProcessRecord:
        return envd.ProcessRecord(self.pid, self.tag, self.config)


def zoned_error(exc: ZonedError, sandbox_id: str) -> rpc.RpcError:
    """A daemon error during a sandbox's call, as the Connect error the SDK expects."""
    match exc.code:
        case "not_found":
            return rpc.RpcError("unavailable", f"The sandbox {sandbox_id} was not found")
        case "invalid_request":
            return rpc.RpcError("invalid_argument", exc.message)
        case "conflict":
            return rpc.RpcError("failed_precondition", exc.message)
        case "no_capacity":
            return rpc.RpcError("resource_exhausted", exc.message)
        case "permission_denied":
            return rpc.RpcError("permission_denied", exc.message)
    return rpc.RpcError("internal", exc.message)


@dataclass(frozen=True)
class StartSpec:
    """A process to start, translated (:mod:`zoned.e2b.envd`)."""

    sandbox_id: str
    #: Who the process runs for (the sandbox's key owner).
    caller: Caller
    argv: list[str]
    env: dict[str, str]
    #: None: the image's WorkingDir.
    cwd: str | None
    user: envd.User
    stdin: bool
    tag: str | None
    config: envd.ProcessConfig
    pty_size: tuple[int, int] | None


class ProcessTable:
    """The running processes of every sandbox, by sandbox id and pid."""

    def __init__(
        self, client: Callable[[Caller | None], AbstractAsyncContextManager[Client]]
    ) -> None:
        self._client = client
        self._by_sandbox: dict[str, dict[int, RunningProcess]] = {}

    def running(self, sandbox_id: str) -> list[RunningProcess]:
        return sorted(self._by_sandbox.get(sandbox_id, {}).values(), key=lambda r: r.pid)

    def find(self, sandbox_id: str, selector: envd.ProcessSelector | None) -> RunningProcess:
        processes = self._by_sandbox.get(sandbox_id, {})
        if selector is not None and selector.pid is not None:
            found = processes.get(selector.pid)
        elif selector is not None and selector.tag is not None:
            found = next((r for r in processes.values() if r.tag == selector.tag), None)
        else:
            raise rpc.RpcError("invalid_argument", "process: a pid or a tag is needed")
        if found is None:
            what = f"pid {selector.pid}" if selector.pid is not None else f"tag {selector.tag!r}"
            raise rpc.RpcError("not_found", f"process with {what} not found")
        return found

    def forget_sandbox(self, sandbox_id: str) -> None:
        self._by_sandbox.pop(sandbox_id, None)

    async def start(
        self, nursery: trio.Nursery, spec: StartSpec
    ) -> tuple[RunningProcess, trio.MemoryReceiveChannel[bytes]]:
        """Start the process; it runs on in ``nursery``. Its first stream comes with it."""
        if len(self._by_sandbox.get(spec.sandbox_id, {})) >= MAX_PROCESSES:
            raise rpc.RpcError("resource_exhausted", f"{MAX_PROCESSES} processes are running")
        try:
            started: tuple[RunningProcess, trio.MemoryReceiveChannel[bytes]] = await nursery.start(
                self._run, spec
            )
        except ZonedError as exc:
            raise zoned_error(exc, spec.sandbox_id) from None
        return started

    async def _run(
        self,
        spec: StartSpec,
        *,
        task_status: trio.TaskStatus[tuple[RunningProcess, trio.MemoryReceiveChannel[bytes]]],
    ) -> None:
        running: RunningProcess | None = None
        try:
            async with self._client(spec.caller) as client:
                rows, cols = spec.pty_size or (24, 80)
                async with client.exec_process(
                    spec.sandbox_id,
                    spec.argv,
                    env=spec.env,
                    workdir=spec.cwd,
                    user=spec.user.spec,
                    stdin=spec.stdin or spec.pty_size is not None,
                    tty=spec.pty_size is not None,
                    rows=rows,
                    cols=cols,
                ) as process:
                    pid = await process.started()
                    if pid is None:
                        raise rpc.RpcError("invalid_argument", await process.start_failure())
                    running = RunningProcess(
                        pid, spec.tag, spec.config, spec.pty_size is not None, process
                    )
                    first = running.subscribe()
                    self._by_sandbox.setdefault(spec.sandbox_id, {})[pid] = running
                    task_status.started((running, first))
                    await self._pump(running, spec.sandbox_id)
        except ZonedError as exc:
            if running is None:
                raise
            running.error = zoned_error(exc, spec.sandbox_id)
        except rpc.RpcError as exc:
            if running is None:
                raise
            running.error = exc
        except Exception:
            if running is None:
                raise
            log.exception("E2B process %d of %s failed", running.pid, spec.sandbox_id)
            running.error = rpc.RpcError("internal", "internal error; see the daemon log")
        finally:
            if running is not None:
                table = self._by_sandbox.get(spec.sandbox_id, {})
                if table.get(running.pid) is running:
                    del table[running.pid]
                if not table:
                    self._by_sandbox.pop(spec.sandbox_id, None)
                running.finish()

    async def _pump(self, running: RunningProcess, sandbox_id: str) -> None:
        async for chunk in running.process:
            stream = "pty" if running.pty else chunk.stream
            await running.publish(envd.data_event(stream, chunk.data))
        result = running.process.result
        assert result is not None
        await running.publish(envd.end_event(result.exit))


async def event_stream(
    running: RunningProcess,
    events: trio.MemoryReceiveChannel[bytes],
    *,
    deadline: float,
    keepalive_s: float,
) -> AsyncGenerator[bytes, None]:
    """The enveloped events of one stream of ``running``: start, data, keepalives, end.

    Ends at the process's end, or at ``deadline`` (``deadline_exceeded``; the
    process goes on). Waits hold no nursery or scope across a ``yield``.
    """
    error: rpc.RpcError | None = None
    with events:
        yield rpc.envelope(envd.start_event(running.pid))
        while True:
            if trio.current_time() >= deadline:
                error = rpc.RpcError("deadline_exceeded", "the stream's timeout passed")
                break
            message: bytes | None = None
            with trio.move_on_at(min(deadline, trio.current_time() + keepalive_s)):
                try:
                    message = await events.receive()
                except trio.EndOfChannel:
                    error = running.error
                    break
            yield rpc.envelope(message if message is not None else envd.KEEPALIVE_EVENT)
    yield rpc.end_of_stream(error)


def keepalive_interval(header: str | None) -> float:
    """``Keepalive-Ping-Interval`` (seconds) the SDK sends, bounded to 1..300."""
    with contextlib.suppress(ValueError, TypeError):
        return min(300.0, max(1.0, float(header or "")))
    return DEFAULT_KEEPALIVE_S


__all__ = ["ProcessTable", "RunningProcess", "StartSpec", "event_stream"]
