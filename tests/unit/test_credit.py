"""The one credit window both ends of the agent channel count with."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zoned.credit import CreditWindow


def test_a_sender_spends_what_it_has_and_is_lent_back_up_to_the_window() -> None:
    window = CreditWindow(10)
    assert (window.available, window.outstanding) == (10, 0)
    assert window.spend(4) == 0
    assert (window.available, window.outstanding) == (6, 4)
    assert window.grant(3) == 0
    assert window.available == 9
    # Credit beyond the window is refused, and said so.
    assert window.grant(5) == 4
    assert window.available == 10


def test_a_receiver_finds_out_a_peer_that_overruns() -> None:
    window = CreditWindow(8)
    assert window.spend(5) == 0
    assert window.spend(6) == 3  # only 3 were lent: the rest is beyond
    assert window.available == 0


def test_a_receiver_lends_back_what_it_consumed_in_one_credit() -> None:
    window = CreditWindow(100)
    window.spend(60)
    window.consume(10)
    window.consume(15)
    assert window.due == 25
    assert window.release() == 25
    assert (window.due, window.available, window.outstanding) == (0, 65, 35)
    assert window.release() == 0  # nothing due: no credit to send
    with pytest.raises(ValueError, match="outstanding"):
        window.consume(36)  # more than ever arrived


def test_a_window_holds_something() -> None:
    with pytest.raises(ValueError):
        CreditWindow(0)


_counts = st.integers(min_value=0, max_value=1 << 21)


@given(
    size=st.integers(min_value=1, max_value=1 << 20),
    steps=st.lists(st.tuples(st.sampled_from(["spend", "grant"]), _counts)),
)
def test_a_senders_window_never_leaves_its_bounds(size: int, steps: list[tuple[str, int]]) -> None:
    window = CreditWindow(size)
    for action, count in steps:
        if action == "spend":
            before = window.available
            assert window.spend(count) == max(0, count - before)
        else:
            before = window.outstanding
            assert window.grant(count) == max(0, count - before)
        assert 0 <= window.available <= size


@given(
    size=st.integers(min_value=1, max_value=1 << 20),
    steps=st.lists(st.tuples(st.sampled_from(["arrive", "consume", "release"]), _counts)),
)
def test_a_receivers_window_never_leaves_its_bounds(
    size: int, steps: list[tuple[str, int]]
) -> None:
    window = CreditWindow(size)
    held = 0  # arrived, not consumed
    for action, count in steps:
        if action == "arrive":
            held += count - window.spend(count)
        elif action == "consume":
            count = min(count, held)
            window.consume(count)
            held -= count
        else:
            window.release()
        assert 0 <= window.available <= size
        assert window.available + held + window.due == size


def test_the_window_is_stdlib_free_for_the_guest() -> None:
    script = (
        "import sys; before = set(sys.modules); import zoned.credit;"
        " print(*sorted(set(sys.modules) - before))"
    )
    result = subprocess.run(
        [sys.executable, "-S", "-c", script], capture_output=True, text=True, check=True
    )
    loaded = set(result.stdout.split()) - {"zoned", "zoned.credit"}
    assert loaded <= sys.stdlib_module_names, loaded
    assert loaded & {"trio", "libvirt", "subprocess", "socket", "msgspec", "typing"} == set()
