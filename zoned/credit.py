"""The credit window of one stream on the agent channel (pure, stdlib-free).

Exec output and exec input both flow under credit: the receiver lends the
sender ``size`` bytes, the sender never has more than that in flight, and the
receiver lends bytes back once it is done with them. Both ends keep a copy of
the same window, and the same rules:

- **sender**: send at most :attr:`CreditWindow.available` bytes,
  :meth:`~CreditWindow.spend` what it sent, :meth:`~CreditWindow.grant` the
  credit that comes back;
- **receiver**: :meth:`~CreditWindow.spend` what arrived (more than was lent
  is the peer's fault), :meth:`~CreditWindow.consume` what it is done with,
  and :meth:`~CreditWindow.release` that as credit to send back.

Output: the agent sends, the host receives (``AgentExecCredit`` carries the
credit). Input: the host sends, the agent receives (``AgentExecInputCredit``).
Neither method raises on a peer's mistake: both return the bytes beyond the
window, so that each side decides (the host fails a zone whose agent
overruns; the agent logs a host bug and keeps going). The window itself
never leaves ``0 <= available <= size``.

This module imports nothing: the guest agent loads it with its exec engine.
"""

from __future__ import annotations


class CreditWindow:
    """Bytes one end may send the other before it is lent more."""

    __slots__ = ("available", "due", "size")

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"a credit window holds at least 1 byte, not {size}")
        self.size = size
        #: Bytes the sender may still send.
        self.available = size
        #: Receiver only: bytes consumed and not yet lent back.
        self.due = 0

    def spend(self, count: int) -> int:
        """``count`` bytes were sent (or arrived); returns how many of them were
        beyond the credit (those are not counted: the receiver drops them)."""
        spent = min(count, self.available)
        self.available -= spent
        return count - spent

    def grant(self, count: int) -> int:
        """``count`` bytes of credit came back; returns how many of them were
        beyond the window (those are not added)."""
        granted = min(count, self.size - self.available)
        self.available += granted
        return count - granted

    def consume(self, count: int) -> None:
        """Receiver: ``count`` bytes that arrived are done with (used or discarded)."""
        if count < 0 or self.due + count > self.size - self.available:
            raise ValueError(
                f"consumed {count} bytes with only {self.size - self.available - self.due}"
                " outstanding"
            )
        self.due += count

    def release(self) -> int:
        """Receiver: lend back what was consumed; the credit to send (0: nothing)."""
        count = self.due
        self.due = 0
        self.grant(count)
        return count

    @property
    def outstanding(self) -> int:
        """Bytes sent and not yet lent back."""
        return self.size - self.available

    def __repr__(self) -> str:
        return f"CreditWindow(size={self.size}, available={self.available}, due={self.due})"
