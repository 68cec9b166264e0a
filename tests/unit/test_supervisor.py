"""The libvirt supervisor, run for real with two small shell scripts as its daemons.

The scripts stand in for virtlogd and libvirtd: each records its pid, the
"libvirtd" leaves an orphan behind the way libvirtd's double fork leaves QEMU,
and a marker file makes the "virtlogd" fail its first start.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from zoned.supervisor import (
    CLEAN_PATH,
    MAX_RESTART_DELAY_S,
    daemon_environment,
    restart_delay,
)

# Generous bound for "eventually"; these tests assert outcomes, not speed.
PATIENCE_S = 30.0

FAKE_VIRTLOGD = """#!/bin/sh
echo $$ >> "$VIR_TEST_DIR/virtlogd.pids"
if [ -e "$VIR_TEST_DIR/fail-once" ]; then rm "$VIR_TEST_DIR/fail-once"; exit 3; fi
exec sleep 1000
"""

FAKE_LIBVIRTD = """#!/bin/sh
echo $$ >> "$VIR_TEST_DIR/libvirtd.pids"
env > "$VIR_TEST_DIR/libvirtd.env"
# An orphan that outlives its parent, like a daemonized QEMU.
( sleep 0.2 & echo $! > "$VIR_TEST_DIR/orphan.pid" )
exec sleep 1000
"""


def _wait_for(what: str, condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for: {what}")
        time.sleep(0.05)


def _pids(path: Path) -> list[int]:
    try:
        return [int(line) for line in path.read_text().split()]
    except FileNotFoundError:
        return []


def _state(pid: int) -> str | None:
    """The process state letter (Z for a zombie), None once fully reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    for name, text in (("virtlogd", FAKE_VIRTLOGD), ("libvirtd", FAKE_LIBVIRTD)):
        script = tmp_path / name
        script.write_text(text)
        script.chmod(0o755)
    (tmp_path / "fail-once").touch()
    log = (tmp_path / "supervisor.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "zoned.supervisor",
            "--pidfile", str(tmp_path / "supervisor.pid"),
            "--virtlogd", str(tmp_path / "virtlogd"),
            "--libvirtd", str(tmp_path / "libvirtd"),
        ],
        env={**os.environ, "VIR_TEST_DIR": str(tmp_path), "SECRET_TOKEN": "x"},
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        yield proc, tmp_path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(PATIENCE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def test_reaps_orphans_restarts_daemons_and_stops_cleanly(
    supervisor: tuple[subprocess.Popen[bytes], Path],
) -> None:
    proc, tmp = supervisor
    pidfile = tmp / "supervisor.pid"
    _wait_for("the pidfile", lambda: _pids(pidfile) == [proc.pid])

    # virtlogd failed its first start and was started again.
    _wait_for("virtlogd restarted", lambda: len(_pids(tmp / "virtlogd.pids")) == 2)

    # libvirtd's orphan was re-parented to the supervisor and reaped by it, not by PID 1.
    _wait_for("the orphan's pid", lambda: (tmp / "orphan.pid").exists())
    orphan = int((tmp / "orphan.pid").read_text())
    _wait_for("the orphan reaped", lambda: _state(orphan) is None)

    # The daemons got a clean environment.
    env = dict(
        line.split("=", 1)
        for line in (tmp / "libvirtd.env").read_text().splitlines()
        if "=" in line
    )
    assert env["PATH"] == CLEAN_PATH
    assert env["VIR_TEST_DIR"] == str(tmp)
    assert "SECRET_TOKEN" not in env

    # SIGHUP restarts libvirtd.
    first_libvirtd = _pids(tmp / "libvirtd.pids")[0]
    assert _ppid(first_libvirtd) == proc.pid
    proc.send_signal(signal.SIGHUP)
    _wait_for("libvirtd restarted", lambda: len(_pids(tmp / "libvirtd.pids")) == 2)
    _wait_for("the old libvirtd reaped", lambda: _state(first_libvirtd) is None)

    # SIGTERM stops both daemons and the supervisor, which removes its pidfile.
    daemons = [_pids(tmp / "virtlogd.pids")[-1], _pids(tmp / "libvirtd.pids")[-1]]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(PATIENCE_S) == 0
    for pid in daemons:
        assert _state(pid) is None
    assert not pidfile.exists()


def test_refuses_a_second_instance(supervisor: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, tmp = supervisor
    _wait_for("the pidfile", lambda: _pids(tmp / "supervisor.pid") == [proc.pid])
    second = subprocess.run(
        [sys.executable, "-m", "zoned.supervisor", "--pidfile", str(tmp / "supervisor.pid")],
        capture_output=True,
        text=True,
        timeout=PATIENCE_S,
        check=False,
    )
    assert second.returncode != 0
    assert "already running" in second.stderr


def test_restart_delay_backs_off_and_caps() -> None:
    delays = [restart_delay(n) for n in range(12)]
    assert delays[0] == 0.0
    growing = delays[1:7]
    assert all(a < b for a, b in itertools.pairwise(growing))
    assert max(delays) == MAX_RESTART_DELAY_S


def test_daemon_environment_is_clean() -> None:
    env = daemon_environment({"PATH": "/root/.pyenv/shims", "LIBVIRT_DEBUG": "1", "HOME": "/x"})
    assert env == {"PATH": CLEAN_PATH, "LC_ALL": "C.UTF-8", "LIBVIRT_DEBUG": "1"}
