"""zoned.virt against the real libvirtd (qemu:///system) and QEMU.

Needs the running libvirtd and the guest kernel store (built by
``zoned-kernel build``); a missing kernel fails the tests that boot one, with
the command that builds it. Domains are named ``<checkout prefix>*`` and removed by each
test. ``trio.fail_after`` only guards against hangs; nothing asserts timing.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
import trio

from tests.integration.conftest import DOMAIN_PREFIX, domain_name, qemu_pid
from tests.virt_env import Env, connected
from zoned import virt
from zoned.config import Config
from zoned.errors import HypervisorError, NotFound
from zoned.kernel.cmdline import hardened_cmdline
from zoned.kernel.store import KernelImage, find_kernel
from zoned.virt import DomainEvent, Hypervisor

pytestmark = pytest.mark.integration

URI = "qemu:///system"
LIBVIRT_SOCKET = "/run/libvirt/libvirt-sock"
HANG_GUARD_S = 180


def store_kernel() -> KernelImage:
    store = Path(Config().kernel_store)
    try:
        return find_kernel(store, "strict")
    except NotFound as exc:
        pytest.fail(f"these tests boot the project's guest kernel, which is missing: {exc}")


def zone_cmdline() -> str:
    return " ".join(hardened_cmdline("strict", "q35", None))


async def next_event(
    events: trio.MemoryReceiveChannel[DomainEvent], name: str, kind: str
) -> DomainEvent:
    with trio.fail_after(HANG_GUARD_S):
        async for event in events:
            if event.name == name and event.kind == kind:
                return event
    raise AssertionError("event channel closed")


# Only this module's domains: other test modules use other names.
OWN_PREFIXES = (domain_name("probe-"), domain_name("virt-"), domain_name("lost"))


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async with connected(URI, DOMAIN_PREFIX, OWN_PREFIXES) as (hv, events):
        yield Env(hv, events)


async def test_version_and_capabilities(env: Env) -> None:
    version = await env.hv.version()
    assert version.hypervisor_type == "QEMU"
    assert version.libvirt.count(".") == 2
    assert version.hypervisor.count(".") == 2
    capabilities = await env.hv.capabilities()
    assert "<domain type='qemu'/>" in capabilities


async def test_probe_says_tcg_on_this_machine(env: Env, tmp_path: Path) -> None:
    # This host's /dev/kvm is a nested PVM device on which ordinary guest
    # kernels do not run (DESIGN.md): the probe must see through it.
    kernel = store_kernel()
    result = await virt.probe_accelerator(
        env.hv, kernel.image, None, zone_cmdline(), tmp_path, name=domain_name("probe-kvm")
    )
    assert result == "tcg"
    assert await env.hv.lookup(domain_name("probe-kvm")) is None


async def test_probe_boot_works_under_tcg(env: Env, tmp_path: Path) -> None:
    # The positive control: the same probe boot with TCG reaches init, so the
    # "tcg" above is the accelerator's answer and not a broken probe.
    kernel = store_kernel()
    with trio.fail_after(HANG_GUARD_S):
        reached = await virt.boot_reaches_init(
            env.hv,
            name=domain_name("probe-tcg"),
            virt_type="qemu",
            kernel=kernel.image,
            initrd=None,
            cmdline=zone_cmdline(),
            workdir=tmp_path,
        )
    console = (tmp_path / f"{domain_name('probe-tcg')}.console.log").read_bytes()
    assert reached, (
        f"TCG probe boot did not reach init; console:\n{console.decode(errors='replace')}"
    )
    assert virt.console_shows_late_boot(console)
    assert await env.hv.lookup(domain_name("probe-tcg")) is None


async def test_running_domain_introspection_and_events(env: Env, tmp_path: Path) -> None:
    kernel = store_kernel()
    name = domain_name("virt-live")
    xml = virt.render_probe_xml(
        name=name,
        virt_type="qemu",
        kernel=kernel.image,
        initrd=None,
        # No reboot on the missing-root panic: the domain must stay up.
        cmdline="console=ttyS0 panic=0",
        console_log=tmp_path / "console.log",
    )
    defined = await env.hv.define(xml)
    assert (await next_event(env.events, name, "defined")).uuid == defined.uuid
    started = await env.hv.start(name)
    assert started.active
    assert started.id is not None
    await next_event(env.events, name, "started")

    pid = qemu_pid(name)
    assert pid is not None
    assert f"guest={name}" in " ".join(psutil.Process(pid).cmdline())

    vcpus = await env.hv.vcpus(name)
    assert len(vcpus) == 1
    assert vcpus[0].host_cpu in vcpus[0].affinity
    stats = await env.hv.stats(name)
    assert stats.active
    assert stats.max_memory_kib == virt.PROBE_MEMORY_MIB * 1024

    listed = await env.hv.list_domains(domain_name("virt-"))
    assert [(s.name, s.state) for s in listed] == [(name, "running")]

    await env.hv.destroy(name)
    stopped = await next_event(env.events, name, "stopped")
    assert stopped.detail == "destroyed"
    assert qemu_pid(name) is None
    await env.hv.undefine(name)
    await next_event(env.events, name, "undefined")
    assert await env.hv.lookup(name) is None


class UnixProxy:
    """A unix-socket relay to libvirtd whose connections the test can cut.

    Cutting them looks to the client exactly like libvirtd going away, without
    touching the shared libvirtd.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pairs: list[trio.CancelScope] = []

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(str(self.path))
        sock.listen()
        listener = trio.SocketListener(sock)
        task_status.started()
        async with listener, trio.open_nursery() as nursery:
            while True:
                client = await listener.accept()
                nursery.start_soon(self._relay, client)

    async def _relay(self, client: trio.SocketStream) -> None:
        with trio.CancelScope() as scope:
            self._pairs.append(scope)
            upstream = await trio.open_unix_socket(LIBVIRT_SOCKET)
            async with client, upstream, trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, upstream, scope)
                nursery.start_soon(self._pump, upstream, client, scope)

    @staticmethod
    async def _pump(
        source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope
    ) -> None:
        async for chunk in source:
            await sink.send_all(chunk)
        scope.cancel()

    def cut(self) -> None:
        for scope in self._pairs:
            scope.cancel()
        self._pairs.clear()


async def test_lost_connection_is_detected_and_repaired(tmp_path: Path) -> None:
    proxy = UnixProxy(tmp_path / "libvirt.sock")
    send, events = virt.open_event_channel()
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        uri = f"qemu+unix:///system?socket={proxy.path}"
        async with await Hypervisor.connect(uri, trio.CapacityLimiter(2), send) as hv:
            await hv.version()
            lost: list[str] = []

            resynced = trio.Event()

            async def resync() -> None:
                await hv.list_domains()
                resynced.set()

            async with trio.open_nursery() as keeper:
                keeper.start_soon(hv.keep_connected, lost.append, resync)
                proxy.cut()
                with trio.fail_after(HANG_GUARD_S):
                    await resynced.wait()
                keeper.cancel_scope.cancel()

            # Lost once, then the new connection works and delivers events again.
            assert len(lost) == 1, lost
            defined = await hv.define(
                "<domain type='qemu'><name>"
                + domain_name("lost")
                + "</name><memory unit='MiB'>64</memory>"
                "<os><type>hvm</type></os></domain>"
            )
            try:
                event = await next_event(events, domain_name("lost"), "defined")
                assert event.uuid == defined.uuid
            finally:
                await hv.remove(domain_name("lost"))

            # While lost, calls fail with HypervisorError.
            proxy.cut()
            with trio.fail_after(HANG_GUARD_S):
                reason = await hv.wait_lost()
            assert reason in ("eof", "error")
            with pytest.raises(HypervisorError):
                await hv.version()
        nursery.cancel_scope.cancel()


async def test_cancelled_probe_removes_its_domain(env: Env, tmp_path: Path) -> None:
    # A KVM guest never gets anywhere on this machine, so the probe boot
    # would wait until cancelled; the cancelled probe must leave nothing.
    kernel = store_kernel()
    name = domain_name("probe-cancel")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: virt.boot_reaches_init(
                env.hv,
                name=name,
                virt_type="kvm",
                kernel=kernel.image,
                initrd=None,
                cmdline=zone_cmdline(),
                workdir=tmp_path,
            )
        )
        with trio.fail_after(HANG_GUARD_S):
            while (state := await env.hv.lookup(name)) is None or not state.active:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert await env.hv.lookup(name) is None
