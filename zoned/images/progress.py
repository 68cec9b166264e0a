"""Progress reports and cancellation for long image operations.

Imports run for seconds to minutes in a worker thread. The caller passes a
:class:`Progress` callback (called from that thread; it must be quick and
must not raise) and a :class:`Cancel` token it may set from any thread: the
operation then stops at its next check (between tar entries, while a host
tool runs, while it waits for a lock), kills the tools it started, removes
what it wrote and raises :class:`~zoned.images.errors.ImportCancelled`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Literal

import msgspec

from zoned.images.errors import ImportCancelled

Phase = Literal["fetch", "verify", "wait", "apply", "build", "publish", "done"]


class ImportProgress(msgspec.Struct, frozen=True, kw_only=True):
    """Where an import is: its phase, layers done out of all, bytes done out of all.

    ``bytes_total`` is 0 when unknown (a registry pull before the manifest is read).
    """

    image: str
    phase: Phase
    layers_done: int = 0
    layers_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0


Progress = Callable[[ImportProgress], None]


def no_progress(_event: ImportProgress) -> None:
    """The default :data:`Progress`: reports go nowhere."""


class Cancel:
    """A cancellation flag shared between the caller and the worker thread."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    @property
    def is_set(self) -> bool:
        return self._event.is_set()

    def check(self, image: str) -> None:
        """Raise :class:`ImportCancelled` if the caller cancelled."""
        if self._event.is_set():
            raise ImportCancelled(image, "cancelled")

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; ``True`` at once if cancelled meanwhile."""
        return self._event.wait(seconds)
