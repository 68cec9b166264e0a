"""Waiting in tests for what no event announces: a process dying, a file appearing.

Where the code under test announces a change (an event, a reply, a stream),
tests wait for that. What only the kernel knows (a pid gone, a cgroup
removed, a line in a console log) is looked at again until it holds, here
and nowhere else: one deadline rule, one failure message naming what never
happened. The deadline is generous (CPUs are shared); it bounds a hang, it
is not a timing assertion.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable

import pytest
import trio

#: Longest wait for any one condition.
DEADLINE_S = 60.0
#: Pause between two looks.
INTERVAL_S = 0.05


def wait_until(
    condition: Callable[[], object],
    what: str,
    *,
    timeout: float = DEADLINE_S,
    details: Callable[[], str] = lambda: "",
) -> None:
    """Block until ``condition()`` is true; fail the test naming ``what`` (and
    ``details()``, e.g. a console log) if it is not within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:g} s\n{details()}", pytrace=False)
        time.sleep(INTERVAL_S)


async def wait_until_async(
    condition: Callable[[], object] | Callable[[], Awaitable[object]],
    what: str,
    *,
    timeout: float = DEADLINE_S,
    details: Callable[[], str] = lambda: "",
) -> None:
    """:func:`wait_until` for trio tests (other tasks run meanwhile); ``condition``
    may be a coroutine function (a query to the daemon)."""
    deadline = trio.current_time() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if trio.current_time() > deadline:
            pytest.fail(f"{what}: not within {timeout:g} s\n{details()}", pytrace=False)
        await trio.sleep(INTERVAL_S)
