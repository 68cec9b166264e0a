"""What a root workload in a real zone can and cannot touch (docs/workloads.md).

One private zoned, one booted zone shared by every check (each leaves the
zone as it found it). The probes are Python programs run as root in the
zone's workload root, trying what a hostile tenant would: the agent's port,
its descriptors, its root, its cgroup, the denied system calls; and doing
what ``apt-get`` and friends do as root, which must still work.
"""

from __future__ import annotations

import io
import json
import signal
import tarfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from tests.integration.conftest import private_zoned_with_zone
from zoned.agent.sandbox import DEFAULT_CAPABILITY_MASK, DEVICE_LINKS, DEVICES
from zoned.agent.seccomp import DENIED
from zoned.client import Client, ExecResult
from zoned.localdaemon import LocalDaemon

pytestmark = pytest.mark.integration

ZONE = "sb-shared"
CALL_TIMEOUT_S = 180.0

# Helpers every probe starts with: a raw system call, an errno's name.
PRELUDE = """
import ctypes, errno, json, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
def sc(nr, *args):
    args = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    result = libc.syscall(ctypes.c_long(nr), *args)
    return errno.errorcode.get(ctypes.get_errno(), "?") if result == -1 else "ok"
def err(call):
    try:
        call()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
found = {}
"""


@pytest.fixture(scope="module")
def zoned() -> Iterator[LocalDaemon]:
    """One daemon and one shared zone for the module."""
    with private_zoned_with_zone("sb-", ZONE, timeout_s=CALL_TIMEOUT_S) as daemon:
        yield daemon


async def probe(client: Client, body: str, **options: object) -> dict[str, object]:
    """Run PRELUDE + ``body`` (which fills ``found``) with python3 in the zone."""
    script = PRELUDE + body + "\nprint(json.dumps(found))\n"
    with trio.fail_after(CALL_TIMEOUT_S):
        result = await client.exec(ZONE, ["python3", "-c", script], **options)  # type: ignore[arg-type]
    assert result.exit.exit_code == 0, (result.exit, result.stderr.decode(errors="replace"))
    found: dict[str, object] = json.loads(result.stdout)
    return found


async def shell(client: Client, script: str, **options: object) -> ExecResult:
    with trio.fail_after(CALL_TIMEOUT_S):
        return await client.exec(ZONE, ["sh", "-c", script], **options)  # type: ignore[arg-type]


async def test_a_workload_sees_a_container_s_system(zoned: LocalDaemon) -> None:
    async with Client(zoned.socket, client_name="it") as client:
        found = await probe(
            client,
            """
found["dev"] = sorted(os.listdir("/dev"))
found["status"] = dict(l.split(":\\t", 1) for l in open("/proc/self/status").read().splitlines())
found["pid1"] = open("/proc/1/comm").read().strip()
found["cgroup"] = open("/proc/self/cgroup").read()
found["mounts"] = {l.split()[4]: l.split(" - ")[1].split()[0] + " " + l.split()[5]
                   for l in open("/proc/self/mountinfo")}
found["lo_flags"] = open("/sys/class/net/lo/flags").read().strip()
server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen()
client = socket.create_connection(server.getsockname()); client.sendall(b"ping")
found["loopback"] = server.accept()[0].recv(4).decode()
found["hostname"] = socket.gethostname()
""",
        )
    assert found["dev"] == sorted([*DEVICES, *DEVICE_LINKS, "pts", "shm", "mqueue"])
    status = found["status"]
    assert isinstance(status, dict)
    assert int(status["CapEff"], 16) == DEFAULT_CAPABILITY_MASK, status
    assert int(status["CapBnd"], 16) == DEFAULT_CAPABILITY_MASK, status
    assert status["Seccomp"].strip() == "2" and status["NoNewPrivs"].strip() == "0", status
    assert status["NSpid"].split() == [status["Pid"].strip()], "one PID namespace deep"
    assert found["pid1"] == "zoned-init"
    assert found["cgroup"] == "0::/\n"  # a cgroup namespace rooted at its own cgroup
    mounts = found["mounts"]
    assert isinstance(mounts, dict)
    for point, fstype_options in {
        "/proc": "proc rw",
        "/proc/sys": "proc ro",
        "/sys": "sysfs ro",
        "/sys/fs/cgroup": "cgroup2 ro",
        "/dev": "tmpfs rw",
        "/dev/pts": "devpts rw",
    }.items():
        fstype, options = fstype_options.split()
        assert mounts[point].split()[0] == fstype, (point, mounts)
        assert mounts[point].split()[1].split(",")[0] == options, (point, mounts)
    assert "nodev" in mounts["/"].split()[1].split(","), mounts["/"]
    assert int(str(found["lo_flags"]), 16) & 1, found["lo_flags"]  # IFF_UP
    assert found["loopback"] == "ping"
    assert found["hostname"] == ZONE


async def test_a_root_workload_cannot_reach_the_agent_or_leave_its_root(
    zoned: LocalDaemon,
) -> None:
    async with Client(zoned.socket, client_name="it") as client:
        root_listing = sorted((await shell(client, "ls -a /")).stdout.decode().split())
        # A process of another exec, to try ptrace on (the agent is not even visible).
        async with client.exec_process(ZONE, ["sleep", "300"]) as sleeper:
            neighbour = await sleeper.started()
            found = await probe(
                client,
                f"""
# The classic chroot escape: a new root below, the working directory above it, '..' up.
os.makedirs("/tmp/jail", exist_ok=True)
outside = os.open("/", os.O_RDONLY)
os.chroot("/tmp/jail"); os.fchdir(outside)
for _ in range(64):
    os.chdir("..")
os.chroot(".")
found["escaped_to"] = sorted(os.listdir("/") + [".", ".."])
found["agent_files"] = [p for p in ("/init", "/usr/lib/zoned-agent") if os.path.exists(p)]
found["proc1_root"] = err(lambda: os.listdir("/proc/1/root"))
found["proc1_fd0"] = err(lambda: os.readlink("/proc/1/fd/0"))
pidfd = os.pidfd_open(1)
found["pidfd_getfd"] = sc(438, pidfd, 0, 0)
found["ptrace_neighbour"] = sc(101, 16, {neighbour}, 0, 0)  # PTRACE_ATTACH
found["process_vm_readv"] = sc(310, {neighbour}, 0, 0, 0, 0, 0)
held = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        held += [os.readlink(f"/proc/{{pid}}/fd/{{fd}}") for fd in os.listdir(f"/proc/{{pid}}/fd")]
    except OSError:
        pass
found["agent_port_held"] = [fd for fd in held if "vport" in fd or "console" in fd]
ports = os.listdir("/sys/class/virtio-ports")
major, minor = open(f"/sys/class/virtio-ports/{{ports[0]}}/dev").read().split(":")
port = os.makedev(int(major), int(minor))
found["mknod_port"] = err(lambda: os.mknod("/tmp/port", 0o020600, port))
found["mknod_disk"] = err(lambda: os.mknod("/tmp/vda", 0o060600, os.makedev(254, 0)))
found["sysctl"] = err(lambda: open("/proc/sys/kernel/hostname", "w").write("x"))
found["mount"] = sc(165, b"none", b"/mnt", b"tmpfs", 0, 0)
found["unshare_mount"] = sc(272, 0x00020000)
found["denied"] = {{name: sc(nr, 0, 0, 0, 0, 0) for name, (nr, _) in {DENIED!r}.items()}}
""",
            )
            await sleeper.signal(signal.SIGKILL)
            await sleeper.wait()
    assert found["escaped_to"] == root_listing, "the chroot escape got out of the workload root"
    assert found["agent_files"] == []
    assert found["proc1_root"] == "EACCES" and found["proc1_fd0"] == "EACCES", found
    assert found["pidfd_getfd"] == "EPERM", found
    assert found["ptrace_neighbour"] == "EPERM" and found["process_vm_readv"] == "EPERM", found
    assert found["agent_port_held"] == []
    assert found["mknod_port"] == "EPERM" and found["mknod_disk"] == "EPERM", found
    assert found["sysctl"] == "EROFS", found
    assert found["mount"] == "EPERM" and found["unshare_mount"] == "EPERM", found
    errnos = {1: "EPERM", 38: "ENOSYS"}
    assert found["denied"] == {name: errnos[code] for name, (_, code) in DENIED.items()}


async def test_a_workload_cannot_leave_its_cgroup_and_its_limits_hold(
    zoned: LocalDaemon,
) -> None:
    escape = """
found["procs"] = err(lambda: open("/sys/fs/cgroup/cgroup.procs", "w").write(str(os.getpid())))
found["max"] = err(lambda: open("/sys/fs/cgroup/memory.max", "w").write("max"))
found["mkdir"] = err(lambda: os.mkdir("/sys/fs/cgroup/free"))
found["remount"] = sc(165, 0, b"/sys/fs/cgroup", 0, 0x20 | 0x1000, 0)  # MS_REMOUNT | MS_BIND
found["cgroup"] = open("/proc/self/cgroup").read()
found["limit"] = open("/sys/fs/cgroup/memory.max").read().strip()
"""
    async with Client(zoned.socket, client_name="it") as client:
        found = await probe(client, escape, memory_limit_mib=48, pids_limit=16)
        # After trying, the limits still hold: a memory hog is OOM-killed, a fork bomb stopped.
        hog = escape + "\nblocks = [bytearray(1 << 20) for _ in range(200)]\n"
        with trio.fail_after(CALL_TIMEOUT_S):
            hogged = await client.exec(ZONE, ["python3", "-c", PRELUDE + hog], memory_limit_mib=48)
        forks = await probe(
            client,
            """
children = []
for _ in range(30):
    try:
        pid = os.fork()
    except BlockingIOError:
        break
    if pid == 0:
        os.pause()
    children.append(pid)
found["forked"] = len(children)
for pid in children:
    os.kill(pid, 9)
""",
            pids_limit=16,
        )
    assert found["procs"] == "EROFS" and found["max"] == "EROFS", found
    assert found["mkdir"] == "EROFS" and found["remount"] == "EPERM", found
    assert found["cgroup"] == "0::/\n"
    assert found["limit"] == str(48 << 20)
    assert hogged.exit.oom_killed and hogged.exit.signal == signal.SIGKILL, hogged.exit
    assert forks["forked"] == 15, forks  # 16 with the probe itself


async def test_root_in_the_zone_still_does_package_manager_work(zoned: LocalDaemon) -> None:
    """chown, writing /usr, adding a user, a setuid program; no_new_privs per process."""
    async with Client(zoned.socket, client_name="it") as client:
        setup = await shell(
            client,
            "set -e; mkdir -p /usr/local/lib/pkg /usr/local/bin /home/app"
            "; echo 'app:x:1000:1000::/home/app:/bin/sh' >> /etc/passwd"
            "; echo 'app:x:1000:' >> /etc/group"
            "; echo data > /usr/local/lib/pkg/file; chown -R 1000:1000 /usr/local/lib/pkg /home/app"
            "; chmod 2775 /usr/local/lib/pkg; stat -c '%u:%g %a' /usr/local/lib/pkg/file"
            "; cp /usr/bin/python3 /usr/local/bin/python-suid"
            "; chmod 4755 /usr/local/bin/python-suid"
            "; touch -d '2001-01-01' /usr/local/lib/pkg/file; ln -sf file /usr/local/lib/pkg/link"
            "; mknod /tmp/null c 1 3 2>/dev/null && echo mknod || echo no-mknod",
        )
        as_app = ["/usr/local/bin/python-suid", "-c", "import os; print(os.getuid(), os.geteuid())"]
        with trio.fail_after(CALL_TIMEOUT_S):
            suid = await client.exec(ZONE, as_app, uid=1000, gid=1000)
            confined = await client.exec(ZONE, as_app, uid=1000, gid=1000, no_new_privs=True)
        # HOME is the image's (its /etc/passwd, read at import: "/" for a uid not in it,
        # as Docker does), not the user added above.
        owned = await shell(
            client, "id; echo hello > /home/app/x && cat /home/app/x", uid=1000, gid=1000
        )
        cleanup = await shell(
            client, "rm -rf /usr/local/lib/pkg /usr/local/bin/python-suid /home/app"
        )
    assert setup.exit.exit_code == 0, setup.stderr
    assert setup.stdout.decode().splitlines() == ["1000:1000 644", "no-mknod"]
    assert suid.stdout == b"1000 0\n", (suid.exit, suid.stderr)
    assert confined.stdout == b"1000 1000\n", (confined.exit, confined.stderr)
    assert owned.stdout.decode().startswith("uid=1000(app) gid=1000(app)"), owned
    assert owned.stdout.endswith(b"hello\n")
    assert cleanup.exit.exit_code == 0


async def test_file_transfer_uses_the_agent_s_tools_not_the_workload_s(
    zoned: LocalDaemon, tmp_path: Path
) -> None:
    """The workload root's tar and cat replaced by liars: copies still work both ways."""
    liar = "#!/bin/sh\necho lies; exit 0\n"
    async with Client(zoned.socket, client_name="it") as client:
        replaced = await shell(
            client,
            "set -e; for p in /bin/tar /bin/cat; do mv $p $p.real"
            f"; printf '{liar}' > $p; chmod 755 $p; echo $p; done",
        )
        assert replaced.exit.exit_code == 0, replaced.stderr
        try:
            tree = tmp_path / "tree"
            (tree / "sub").mkdir(parents=True)
            (tree / "sub" / "a.txt").write_bytes(b"alpha\n")
            (tree / "link").symlink_to("sub/a.txt")
            with trio.fail_after(CALL_TIMEOUT_S):
                await client.put_file(ZONE, "/tmp/one.txt", b"one\n")
                assert await client.get_file(ZONE, "/tmp/one.txt") == b"one\n"
                packed = io.BytesIO()
                with tarfile.open(fileobj=packed, mode="w") as archive:
                    archive.add(tree / "sub", arcname="sub")
                    archive.add(tree / "link", arcname="link")

                async def chunks() -> AsyncIterator[bytes]:
                    yield packed.getvalue()

                await client.put_tree(ZONE, "/tmp/tree", chunks())
                summary = await client.get_tree(ZONE, "/tmp/tree", tmp_path / "back")
            assert (tmp_path / "back" / "link").read_bytes() == b"alpha\n"
            assert (summary.files, summary.symlinks) == (1, 1), summary
        finally:
            for path in replaced.stdout.decode().split():
                await shell(client, f"mv {path}.real {path}")
