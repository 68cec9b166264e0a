"""Processes in real zones, through a real zoned: exec, run, zonectl.

One private zoned serves the module and one booted zone (``ex-shared``) is
shared by every exec test; the run tests boot their own zones because that
is what they test. Needs what ``.ci/run`` sets up.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import select
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import pytest
import trio

from tests.integration.conftest import domain_name, open_libvirt, private_zoned_with_zone
from tests.waiting import wait_until_async
from tests.zonectl_run import zonectl, zonectl_argv
from zoned.client import Client, SyncClient
from zoned.errors import HypervisorError, InvalidRequest
from zoned.localdaemon import LocalDaemon

pytestmark = pytest.mark.integration

ZONE = "ex-shared"
CALL_TIMEOUT_S = 180.0


def stream_blocks(size: int) -> Iterator[bytes]:
    """SIZE deterministic bytes in blocks of 64 KiB (the last one cut short)."""
    i = 0
    while size > 0:
        block = hashlib.sha256(str(i).encode()).digest() * 2048
        yield block[:size]
        size -= len(block)
        i += 1


# Writes SIZE deterministic bytes to stdout: stream_blocks' own source, run in
# the zone; the host computes the same stream's sha256 with expected_digest().
GENERATOR = "\n".join(
    [
        "from __future__ import annotations",
        "import hashlib, sys",
        inspect.getsource(stream_blocks),
        "out = sys.stdout.buffer",
        "for block in stream_blocks(int(sys.argv[1])):",
        "    out.write(block)",
        "out.flush()",
    ]
)


def expected_digest(size: int) -> str:
    digest = hashlib.sha256()
    for block in stream_blocks(size):
        digest.update(block)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def zoned() -> Iterator[LocalDaemon]:
    """One daemon and one shared zone for the module."""
    with private_zoned_with_zone("ex-", ZONE, timeout_s=CALL_TIMEOUT_S) as daemon:
        yield daemon


@contextlib.asynccontextmanager
async def connect(daemon: LocalDaemon) -> AsyncIterator[Client]:
    async with Client(daemon.socket, client_name="it") as client:
        yield client


async def test_python_runs_in_the_zone(zoned: LocalDaemon) -> None:
    async with connect(zoned) as client:
        result = await client.exec(ZONE, ["python3", "-c", "import os; print(2+2, os.getpid())"])
    assert result.exit.exit_code == 0 and result.exit.signal is None, result
    answer, pid = result.stdout.split()
    assert answer == b"4" and int(pid) > 1
    assert result.stderr == b""


async def test_shell_utilities_environment_and_cwd(zoned: LocalDaemon) -> None:
    async with connect(zoned) as client:
        result = await client.exec(
            ZONE,
            [
                "sh",
                "-c",
                'echo "$GREETING from $(pwd) as $(id -u)"; uname -r; ls / | wc -l; hostname',
            ],
            env={"GREETING": "hello"},
            cwd="/tmp",
        )
    assert result.exit.exit_code == 0, result
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "hello from /tmp as 0"
    assert lines[1].startswith("6.12")
    assert int(lines[2]) > 3
    assert lines[3] == ZONE  # the zone's name is the guest's hostname


async def test_exit_codes_signals_and_missing_commands(zoned: LocalDaemon) -> None:
    async with connect(zoned) as client:
        exited = await client.exec(ZONE, ["sh", "-c", "echo out; echo err >&2; exit 42"])
        killed = await client.exec(ZONE, ["sh", "-c", "kill -TERM $$"])
        missing = await client.exec(ZONE, ["no-such-command"])
        not_dir = await client.exec(ZONE, ["true"], cwd="/no/such/dir")
        # A program that exists but cannot run, whatever its name says.
        odd = "/tmp/No such file or directory"
        await client.exec(ZONE, ["touch", odd])
        not_executable = await client.exec(ZONE, [odd])
    assert (exited.exit.exit_code, exited.stdout, exited.stderr) == (42, b"out\n", b"err\n")
    assert (killed.exit.exit_code, killed.exit.signal, killed.returncode) == (None, 15, -15)
    assert missing.exit.exit_code == 127 and b"No such file or directory" in missing.stderr
    assert not_dir.exit.exit_code == 127 and b"/no/such/dir" in not_dir.stderr
    assert not_executable.exit.exit_code == 126, not_executable
    assert b"Permission denied" in not_executable.stderr


async def test_signal_reaches_a_running_process(zoned: LocalDaemon) -> None:
    async with connect(zoned) as client, client.exec_process(ZONE, ["sleep", "600"]) as process:
        assert await process.started()
        await process.signal(signal.SIGINT)
        result = await process.wait()
    assert result.exit.signal == signal.SIGINT, result


async def test_64_mib_of_stdout_arrive_whole_and_in_order(zoned: LocalDaemon) -> None:
    size = 64 * 1024 * 1024
    digest = hashlib.sha256()
    received = 0
    errors = bytearray()
    async with connect(zoned) as client:
        with trio.fail_after(CALL_TIMEOUT_S * 2):
            async with client.exec_process(
                ZONE, ["python3", "-c", GENERATOR, str(size)]
            ) as process:
                async for chunk in process:
                    if chunk.stream == "stderr":
                        errors.extend(chunk.data)
                        continue
                    digest.update(chunk.data)
                    received += len(chunk.data)
    assert not errors, errors.decode(errors="replace")
    assert process.result is not None and process.result.exit.exit_code == 0, process.result
    assert received == size
    assert digest.hexdigest() == expected_digest(size)


async def test_stdin_round_trip(zoned: LocalDaemon) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    async with connect(zoned) as client:
        with trio.fail_after(CALL_TIMEOUT_S):
            echoed = await client.exec(ZONE, ["cat"], input=data)
            summed = await client.exec(ZONE, ["sha256sum"], input=data)
    assert echoed.exit.exit_code == 0 and echoed.stdout == data
    assert summed.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


async def test_concurrent_processes_keep_their_own_output(zoned: LocalDaemon) -> None:
    results: dict[int, bytes] = {}
    async with connect(zoned) as client:

        async def one(i: int) -> None:
            script = f"for n in 1 2 3 4 5; do echo {i}-$n; done"
            result = await client.exec(ZONE, ["sh", "-c", script])
            assert result.exit.exit_code == 0
            results[i] = result.stdout

        with trio.fail_after(CALL_TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(one, i)
    for i in range(8):
        assert results[i] == "".join(f"{i}-{n}\n" for n in range(1, 6)).encode()


def test_zonectl_exec_passes_output_input_and_exit_status(zoned: LocalDaemon) -> None:
    done = zonectl(zoned, "exec", ZONE, "--", "sh", "-c", "echo hi; echo oops >&2; exit 3")
    assert (done.returncode, done.stdout, done.stderr) == (3, b"hi\n", b"oops\n")
    piped = zonectl(zoned, "exec", "-i", ZONE, "--", "tr", "a-z", "A-Z", input=b"shout\n")
    assert (piped.returncode, piped.stdout) == (0, b"SHOUT\n"), piped.stderr
    killed = zonectl(zoned, "exec", ZONE, "--", "sh", "-c", "kill -KILL $$")
    assert killed.returncode == 128 + 9
    missing = zonectl(zoned, "exec", "no-such-zone", "--", "true")
    assert missing.returncode == 4 and b"no-such-zone" in missing.stderr


def run_leftovers(daemon: LocalDaemon) -> dict[str, list[str]]:
    """What run zones left in the daemon's directories: records, runtime
    directories, log directories (one per zone: those of gone zones are the
    retention's to keep)."""
    return {
        "state": sorted(f.name for f in (daemon.root / "state" / "zones").glob("run-*")),
        "runtime": sorted(d.name for d in (daemon.root / "run" / "zones").glob("run-*")),
        "logs": sorted(str(d) for d in (daemon.root / "log" / "zones").glob("run-*/*")),
    }


def test_zonectl_runs_leave_nothing_but_their_console_logs(zoned: LocalDaemon) -> None:
    """A run of 0.5 s with a timeout of 2 s exits 0 although its boot alone
    takes more than 1.5 s here (the test below checks that): the boot is not
    counted; the command is (exit 124). Each run's zone, record and runtime
    directory are gone after it; only its logs stay, one directory per run."""
    before = run_leftovers(zoned)
    done = zonectl(zoned, "run", "--timeout", "2", "--", "sh", "-c", "sleep 0.5; echo 4")
    assert (done.returncode, done.stdout, done.stderr) == (0, b"4\n", b"")
    timed_out = zonectl(zoned, "run", "--timeout", "1", "--", "sleep", "600")
    assert timed_out.returncode == 124, timed_out.stderr
    assert timed_out.stderr == b"zonectl: the command timed out after 1 s of running; killed\n"
    failed = zonectl(zoned, "run", "--", "sh", "-c", "exit 3")
    assert failed.returncode == 3, failed.stderr
    listed = zonectl(zoned, "list", "--json")
    assert listed.returncode == 0
    assert b'"zoned.run"' not in listed.stdout, listed.stdout
    after = run_leftovers(zoned)
    assert (after["state"], after["runtime"]) == (before["state"], before["runtime"]), after
    assert len(after["logs"]) <= len(before["logs"]) + 3, after["logs"]
    assert "could not destroy" not in zoned.log_text(full=True)


def test_a_run_took_longer_to_boot_than_its_timeout(zoned: LocalDaemon) -> None:
    """What the test above relies on: under TCG here a boot takes more than
    1.5 s (1.8-4 s measured), so its run of 0.5 s with a timeout of 2 s would
    time out if the boot were counted."""
    boot = zonectl(zoned, "show", "--json", ZONE)
    assert boot.returncode == 0, boot.stderr
    zone = msgspec.json.decode(boot.stdout)
    assert zone["ready_at"] - zone["created_at"] > 1.5, zone


async def test_run_is_cleaned_up_when_its_client_vanishes(zoned: LocalDaemon) -> None:
    async with connect(zoned) as client:
        async with client.run_process(["sleep", "600"], labels={"test": "vanish"}) as process:
            assert await process.started()
            assert process.zone is not None
            name = process.zone.name
        await client.aclose()  # the connection goes: the daemon must clean up
    async with connect(zoned) as client:

        async def gone() -> bool:
            return all(z.name != name for z in await client.list_zones())

        await wait_until_async(gone, f"run zone {name} destroyed", timeout=CALL_TIMEOUT_S)
        assert await client.list_zones({"test": "vanish"}) == []


# How many of the zone's processes run ``sleep 600`` or ``sleep 601`` (not
# every image has ps).
COUNT_SLEEPS = (
    "for c in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $c 2>/dev/null; echo; done"
    " | grep -c '^sleep 60[01] '"
)


async def test_a_process_whose_client_goes_away_is_hung_up(zoned: LocalDaemon) -> None:
    """The clients of two plain execs (zonectl processes) are killed: their
    processes get SIGHUP (the one that ignores it SIGKILL after), and leave
    the zone's running processes."""
    commands = [["sh", "-c", "trap '' HUP; sleep 600"], ["sleep", "601"]]
    clients = [
        subprocess.Popen(
            zonectl_argv(zoned, "exec", ZONE, "--", *argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for argv in commands
    ]
    try:
        async with connect(zoned) as client:

            async def running(count: int) -> bool:
                metrics = await client.zone_metrics(ZONE)
                found = await client.exec(ZONE, ["sh", "-c", COUNT_SLEEPS])
                return metrics.execs_running == count and found.stdout == f"{count}\n".encode()

            await wait_until_async(lambda: running(2), "both processes running")
            for process in clients:
                process.kill()  # gone, with its process running
                process.wait()
            await wait_until_async(lambda: running(0), "both processes killed and forgotten")
    finally:
        for process in clients:
            if process.poll() is None:
                process.kill()
                process.wait()


async def test_metrics_show_the_host_and_the_guest_side_by_side(zoned: LocalDaemon) -> None:
    async with connect(zoned) as client, client.exec_process(ZONE, ["sleep", "600"]) as process:
        assert await process.started()

        async def reported() -> bool:
            return (await client.zone_metrics(ZONE)).guest is not None

        await wait_until_async(reported, "the guest's first report", timeout=CALL_TIMEOUT_S)
        metrics = await client.zone_metrics(ZONE)
        assert metrics.execs_running == 1
        await process.signal(signal.SIGKILL)
        await process.wait()
    assert metrics.state == "ready" and metrics.memory_mib == 512
    assert metrics.cpu_time_s is not None and metrics.cpu_time_s > 0
    assert metrics.host_rss_kib is not None and metrics.host_rss_kib > 0
    guest = metrics.guest
    assert guest is not None
    assert 0 < guest.mem_available_kib < guest.mem_total_kib <= 512 * 1024
    assert guest.uptime_s > 0


def test_zonectl_top_once(zoned: LocalDaemon) -> None:
    top = zonectl(zoned, "top", "--once", "--interval", "0.5")
    assert top.returncode == 0, top.stderr
    header, *rows = top.stdout.decode().splitlines()
    assert header.split()[:3] == ["NAME", "STATE", "CPU%"]
    row = next(r.split() for r in rows if r.startswith(ZONE))
    assert row[1] == "ready" and float(row[2]) >= 0


async def test_file_round_trip_with_mode_owner_and_limits(zoned: LocalDaemon) -> None:
    data = os.urandom(5 * 1024 * 1024 + 3)
    async with connect(zoned) as client:
        with trio.fail_after(CALL_TIMEOUT_S):
            size = await client.put_file(ZONE, "/tmp/data.bin", data, mode=0o640, uid=1000, gid=7)
            stat = await client.exec(ZONE, ["stat", "-c", "%a %u %g %s", "/tmp/data.bin"])
            back = await client.get_file(ZONE, "/tmp/data.bin")
            with pytest.raises(InvalidRequest, match="larger than the limit"):
                await client.get_file(ZONE, "/tmp/data.bin", max_bytes=1024 * 1024)
            with pytest.raises(InvalidRequest, match="No such file"):
                await client.get_file(ZONE, "/tmp/no-such-file")
            with pytest.raises(InvalidRequest, match="cannot write"):
                await client.put_file(ZONE, "/no/such/dir/file", b"x")
    assert size == len(data)
    assert stat.stdout == f"640 1000 7 {len(data)}\n".encode()
    assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()


def test_zonectl_cp_files_and_directories_both_ways(zoned: LocalDaemon, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub" / "deeper").mkdir(parents=True)
    files = {
        "a.txt": b"alpha\n",
        "sub/b.bin": os.urandom(300_000),
        "sub/deeper/c.py": b"print('c')\n",
    }
    for name, content in files.items():
        (tree / name).write_bytes(content)
    (tree / "sub" / "deeper" / "c.py").chmod(0o755)

    up = zonectl(zoned, "cp", str(tree), f"{ZONE}:/work/tree")
    assert up.returncode == 0, up.stderr
    ran = zonectl(zoned, "exec", ZONE, "--", "python3", "/work/tree/sub/deeper/c.py")
    assert ran.stdout == b"c\n", ran.stderr
    back = tmp_path / "back"
    down = zonectl(zoned, "cp", f"{ZONE}:/work/tree", str(back))
    assert down.returncode == 0, down.stderr
    for name, content in files.items():
        assert (back / name).read_bytes() == content, name
    assert (back / "sub" / "deeper" / "c.py").stat().st_mode & 0o777 == 0o755

    single = tmp_path / "single.txt"
    single.write_bytes(b"just one\n")
    assert zonectl(zoned, "cp", str(single), f"{ZONE}:/tmp/").returncode == 0
    fetched = tmp_path / "fetched.txt"
    assert zonectl(zoned, "cp", f"{ZONE}:/tmp/single.txt", str(fetched)).returncode == 0
    assert fetched.read_bytes() == b"just one\n"
    both_local = zonectl(zoned, "cp", str(single), str(fetched))
    assert both_local.returncode == 1 and b"exactly one side" in both_local.stderr


def test_sync_client_for_scripts(zoned: LocalDaemon) -> None:
    client = SyncClient(zoned.socket, client_name="script")
    assert client.exec(ZONE, ["sh", "-c", "echo $((6 * 7))"]).stdout == b"42\n"
    client.put_file(ZONE, "/tmp/sync.txt", b"synced\n")
    assert client.get_file(ZONE, "/tmp/sync.txt") == b"synced\n"
    assert client.zone_metrics(ZONE).state == "ready"


async def test_fork_bomb_and_memory_hog_are_contained(zoned: LocalDaemon) -> None:
    """Limits hold inside one zone while a second zone keeps answering.

    The bomb saturates its zone's one vCPU (under TCG that zone then crawls),
    so the other zone is what must stay responsive; the hog runs after it.
    """
    bomb = ["sh", "-c", "bomb() { bomb | bomb & }; bomb; sleep 600"]
    hog = [
        "python3",
        "-c",
        "chunks = []\nwhile True: chunks.append(bytearray(1024 * 1024))",
    ]
    async with connect(zoned) as client:
        with trio.fail_after(CALL_TIMEOUT_S * 2):
            await client.create_zone("ex-other", memory_mib=256)
            try:
                async with (
                    client.exec_process(ZONE, bomb, pids_limit=64) as bombing,
                    trio.open_nursery() as nursery,
                ):
                    assert await bombing.started()
                    # Streams on one connection share its backpressure: keep
                    # reading the bomb's "can't fork" complaints.
                    nursery.start_soon(bombing.wait)
                    for _ in range(3):
                        alive = await client.exec("ex-other", ["echo", "alive"])
                        assert alive.stdout == b"alive\n"

                    async def reported() -> bool:
                        return (await client.zone_metrics(ZONE)).guest is not None

                    await wait_until_async(reported, "the guest's report", timeout=CALL_TIMEOUT_S)
                    metrics = await client.zone_metrics(ZONE)
                    await bombing.signal(signal.SIGKILL)
                # The nursery waited for bombing.wait(): the result is there.
                bombed = bombing.result
                assert bombed is not None
            finally:
                await client.destroy_zone("ex-other")
            after = await client.exec(ZONE, ["sh", "-c", "ps | wc -l"])
            hogged = await client.exec(ZONE, hog, memory_limit_mib=64)
            still = await client.exec(ZONE, ["echo", "fine"])
    # The guest never held many more processes than the bomb's limit allows.
    assert metrics.guest is not None and metrics.guest.processes < 64 + 40, metrics
    assert bombed.exit.signal == signal.SIGKILL and bombed.exit.cpu_time_s is not None
    # Nothing of the bomb outlives it: its cgroup was emptied.
    assert int(after.stdout) < 40, after.stdout
    assert hogged.exit.oom_killed and hogged.exit.signal == signal.SIGKILL, hogged
    assert hogged.exit.memory_peak_kib is not None and hogged.exit.memory_peak_kib <= 64 * 1024
    assert still.stdout == b"fine\n"


async def test_terminal_mode(zoned: LocalDaemon) -> None:
    script = "tty; stty size; read line; echo got:$line"
    output = bytearray()
    async with connect(zoned) as client:
        with trio.fail_after(CALL_TIMEOUT_S):
            async with client.exec_process(
                ZONE, ["sh", "-c", script], tty=True, rows=40, cols=100
            ) as process:
                await process.write(b"hello\n")
                async for chunk in process:
                    assert chunk.stream == "stdout"
                    output.extend(chunk.data)
            async with client.exec_process(
                ZONE,
                [
                    "sh",
                    "-c",
                    'trap "stty size; exit 0" WINCH; echo ready; while :; do sleep 0.1; done',
                ],
                tty=True,
            ) as resized:
                resized_output = bytearray()
                async for chunk in resized:
                    resized_output.extend(chunk.data)
                    if b"ready" in resized_output and b"50 132" not in resized_output:
                        resized_output.clear()
                        await resized.resize(50, 132)
    text = output.decode(errors="replace")
    assert "/dev/pts/" in text and "40 100" in text and "got:hello" in text, text
    assert b"50 132" in resized_output, resized_output
    assert process.result is not None and process.result.exit.exit_code == 0


def test_zonectl_exec_it_is_an_interactive_terminal(zoned: LocalDaemon) -> None:
    """zonectl on a local terminal: raw mode, input, Ctrl-C reaching the zone."""
    master, slave = os.openpty()
    script = "echo tty-$(tty); read line; echo got-$line; sleep 600; echo not-interrupted"
    proc = subprocess.Popen(
        zonectl_argv(zoned, "exec", "-it", ZONE, "--", "sh", "-c", script),
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    seen = bytearray()

    def expect(marker: bytes) -> None:
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while marker not in seen:
            assert time.monotonic() < deadline, bytes(seen)
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    seen.extend(os.read(master, 65536))
                except OSError:  # EIO: zonectl is gone
                    break
        assert marker in seen, bytes(seen)

    try:
        expect(b"tty-/dev/pts/")
        os.write(master, b"hello\r")
        expect(b"got-hello")
        os.write(master, b"\x03")  # Ctrl-C: raw here, so it is the zone's terminal that signals
        assert proc.wait(CALL_TIMEOUT_S) == 128 + signal.SIGINT
        assert b"not-interrupted" not in seen
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


async def read_until(stream: trio.abc.ReceiveStream, marker: bytes) -> bytes:
    seen = bytearray()
    while marker not in seen:
        chunk = await stream.receive_some(65536)
        assert chunk, f"ended before {marker!r}: {bytes(seen)!r}"
        seen.extend(chunk)
    return bytes(seen)


async def test_zonectl_ends_on_ctrl_c_twice_or_sigterm_while_the_daemon_is_frozen(
    zoned: LocalDaemon,
) -> None:
    """A real process in a real zone, and then nothing answers: the daemon is
    stopped (SIGSTOP), so no signal reaches the zone and nothing comes back."""
    assert zoned.proc is not None
    daemon_pid = zoned.proc.pid
    script = "echo started; exec sleep 1001"
    for signals, status in (
        ([signal.SIGINT, signal.SIGINT], 130),
        ([signal.SIGTERM], 128 + signal.SIGTERM),
    ):
        zonectl_process = await trio.lowlevel.open_process(
            zonectl_argv(zoned, "exec", ZONE, "--", "sh", "-c", script),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert zonectl_process.stdout is not None and zonectl_process.stderr is not None
        try:
            with trio.fail_after(CALL_TIMEOUT_S):
                await read_until(zonectl_process.stdout, b"started\n")
                os.kill(daemon_pid, signal.SIGSTOP)
                try:
                    first, *rest = signals
                    zonectl_process.send_signal(first)
                    if rest:  # zonectl took the first Ctrl-C (forwarded) and says so
                        await read_until(zonectl_process.stderr, b"Ctrl-C again stops waiting")
                        zonectl_process.send_signal(rest[0])
                    assert await zonectl_process.wait() == status
                finally:
                    os.kill(daemon_pid, signal.SIGCONT)
        finally:
            if zonectl_process.returncode is None:
                zonectl_process.kill()
                await zonectl_process.wait()
    # The daemon and the zone carry on.
    async with connect(zoned) as client:
        with trio.fail_after(CALL_TIMEOUT_S):
            left = await client.exec(ZONE, ["sh", "-c", "pkill -9 -f 'sleep 1001'; echo ok"])
    assert left.stdout == b"ok\n", left


# Every signal a workload may send PID 1, SIGINT first (it used to stop the agent).
SIGNAL_PID_1 = "kill -INT 1; for s in $(seq 1 64); do kill -$s 1 2>/dev/null; done; echo sent"


async def test_signals_to_pid_1_leave_the_zone_and_other_processes_alone(
    zoned: LocalDaemon,
) -> None:
    async with connect(zoned) as client:
        with trio.fail_after(CALL_TIMEOUT_S):
            async with client.exec_process(
                ZONE, ["sh", "-c", "read line; echo survived:$line"], stdin=True
            ) as bystander:
                assert await bystander.started()
                signaller = await client.exec(ZONE, ["sh", "-c", SIGNAL_PID_1])
                result = await bystander.communicate(b"yes\n")
            after = await client.exec(ZONE, ["echo", "fine"])
            zone = await client.get_zone(ZONE)
    assert (signaller.exit.exit_code, signaller.stdout) == (0, b"sent\n"), signaller
    assert (result.exit.exit_code, result.stdout) == (0, b"survived:yes\n"), result
    assert after.stdout == b"fine\n"
    assert zone.state == "ready", zone


async def test_input_into_a_process_whose_zone_dies_fails_with_the_reason(
    zoned: LocalDaemon,
) -> None:
    """The zone's QEMU is killed under a process that is being fed input: the
    client hears that the zone went away (hypervisor), not an internal error."""
    name = "ex-doomed"

    def kill_qemu() -> None:
        conn = open_libvirt()
        try:
            conn.lookupByName(domain_name(name)).destroy()
        finally:
            conn.close()

    async with connect(zoned) as client:
        with trio.fail_after(CALL_TIMEOUT_S):
            await client.create_zone(name)
            try:
                async with client.exec_process(name, ["cat"], stdin=True) as process:
                    assert await process.started()
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(trio.to_thread.run_sync, kill_qemu)
                        with pytest.raises(HypervisorError) as raised:
                            await process.communicate(b"x" * (64 * 1024 * 1024))

                async def failed() -> bool:
                    return (await client.get_zone(name)).state == "failed"

                # The channel broke first; the zone fails once libvirt says why.
                await wait_until_async(failed, "the zone failed")
                zone = await client.get_zone(name)
            finally:
                await client.destroy_zone(name)
    assert "the process's zone went away" in raised.value.message, raised.value.message
    assert (zone.state, zone.failure) == ("failed", "vanished"), zone
    assert "destroyed outside zoned" in zone.reason, zone
