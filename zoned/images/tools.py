"""Host tools (skopeo, mkfs.erofs, zstd, mmdebstrap) run as children that die with their caller.

Every tool runs under ``setpriv --pdeathsig KILL`` in a session of its own:
if the thread that started it dies (a killed daemon), the kernel kills the
tool; on cancellation or a deadline the whole session is killed. The
caller's scratch lock (see :mod:`zoned.images.store`) is passed to the tool
as an open descriptor, so the scratch directory counts as in use for as
long as any tool that writes into it still runs. Waiting is a bounded loop
of short waits that checks for cancellation and reports progress.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final, NamedTuple

from zoned.images.errors import ImageHostError, ImportCancelled
from zoned.images.progress import Cancel

#: Debian package of each tool, for the message when one is missing.
PACKAGES: Final = {
    "skopeo": "skopeo",
    "mkfs.erofs": "erofs-utils",
    "zstd": "zstd",
    "mmdebstrap": "mmdebstrap",
    "setpriv": "util-linux",
}
#: How often a waiting loop looks at the cancel token and reports progress.
POLL_SECONDS: Final = 0.2
#: How much of a tool's standard error is kept for the error message.
STDERR_TAIL_BYTES: Final = 4096
#: How long a filter (zstd) may take to exit once its output reached its end.
FINISH_SECONDS: Final = 60.0


class ToolResult(NamedTuple):
    returncode: int
    stderr: str


def require(image: str, tool: str) -> str:
    """The path of ``tool``; ``ImageHostError`` naming its Debian package if missing."""
    path = shutil.which(tool)
    if path is None:
        package = PACKAGES.get(tool, tool)
        raise ImageHostError(image, f"{tool} is missing: install Debian's {package}")
    return path


def _argv(image: str, argv: Sequence[str]) -> list[str]:
    return [
        require(image, "setpriv"),
        "--pdeathsig",
        "KILL",
        "--",
        require(image, argv[0]),
        *argv[1:],
    ]


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _tail(stderr: IO[bytes]) -> str:
    stderr.flush()
    size = os.fstat(stderr.fileno()).st_size
    stderr.seek(max(0, size - STDERR_TAIL_BYTES))
    return stderr.read().decode("utf-8", "replace").strip()


def _wait(
    image: str,
    proc: subprocess.Popen[bytes],
    *,
    name: str,
    cancel: Cancel,
    max_seconds: float,
    poll: Callable[[], None] | None,
) -> int:
    deadline = time.monotonic() + max_seconds
    for _ in range(int(max_seconds / POLL_SECONDS) + 2):
        try:
            return proc.wait(timeout=POLL_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        if cancel.is_set:
            _kill(proc)
            raise ImportCancelled(image, "cancelled")
        if time.monotonic() > deadline:
            break
        if poll is not None:
            poll()
    _kill(proc)
    raise ImageHostError(image, f"{name} ran longer than {max_seconds:.0f} s")


def run_tool(
    image: str,
    argv: Sequence[str],
    *,
    cancel: Cancel,
    scratch: Path,
    max_seconds: float,
    pass_fds: Sequence[int] = (),
    env: Mapping[str, str] | None = None,
    poll: Callable[[], None] | None = None,
) -> ToolResult:
    """Run ``argv`` to its end (or cancellation, or ``max_seconds``); stdout is discarded.

    Standard error goes to a file in ``scratch``; its tail comes back in the result.
    """
    with tempfile.TemporaryFile(dir=scratch) as stderr:
        proc = subprocess.Popen(
            _argv(image, argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            pass_fds=tuple(pass_fds),
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
        try:
            code = _wait(
                image, proc, name=argv[0], cancel=cancel, max_seconds=max_seconds, poll=poll
            )
        except BaseException:
            _kill(proc)
            raise
        return ToolResult(code, _tail(stderr))


@dataclass(frozen=True)
class ToolRun:
    """How one operation's tools run (:func:`run_tool`'s arguments that stay the same
    from tool to tool): its cancel token, scratch directory, deadline, the
    descriptors passed on (the scratch lock) and its progress poll."""

    cancel: Cancel
    scratch: Path
    max_seconds: float
    pass_fds: Sequence[int] = ()
    poll: Callable[[], None] | None = None

    def run(
        self, image: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None
    ) -> ToolResult:
        return run_tool(
            image,
            argv,
            cancel=self.cancel,
            scratch=self.scratch,
            max_seconds=self.max_seconds,
            pass_fds=self.pass_fds,
            env=env,
            poll=self.poll,
        )


@contextlib.contextmanager
def tool_output(
    image: str,
    argv: Sequence[str],
    *,
    stdin: int,
    scratch: Path,
    pass_fds: Sequence[int] = (),
) -> Iterator[tuple[IO[bytes], Callable[[], ToolResult]]]:
    """Start ``argv`` reading ``stdin`` (a descriptor); yield its stdout and a ``finish``.

    ``finish()`` waits for the tool (after its output was read to the end)
    and returns its result. Leaving the block early kills the tool.
    """
    with tempfile.TemporaryFile(dir=scratch) as stderr:
        proc = subprocess.Popen(
            _argv(image, argv),
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=stderr,
            pass_fds=tuple(pass_fds),
            start_new_session=True,
        )
        assert proc.stdout is not None
        finished: list[ToolResult] = []

        def finish() -> ToolResult:
            try:
                code = proc.wait(timeout=FINISH_SECONDS)
            except subprocess.TimeoutExpired:
                _kill(proc)
                raise ImageHostError(image, f"{argv[0]} did not exit after its output") from None
            finished.append(ToolResult(code, _tail(stderr)))
            return finished[0]

        try:
            yield proc.stdout, finish
        finally:
            if not finished:
                _kill(proc)
            proc.stdout.close()
