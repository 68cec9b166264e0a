"""zoned.virt against libvirt's in-process ``test:///default`` driver.

The test driver's state is shared by every connection in the process, so each
test defines its own ``zt-`` domains and the fixture removes them afterwards.
``trio.fail_after`` below only guards against hangs; no test asserts timing.
"""

from __future__ import annotations

import logging
import socket
import threading
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from itertools import islice
from pathlib import Path

import libvirt
import pytest
import trio

from tests import virt_env
from zoned import virt
from zoned.errors import Conflict, HypervisorError, NotFound
from zoned.virt import DomainEvent, Hypervisor

TEST_URI = "test:///default"
META_URI = "https://zoned.example/xmlns/test/1"
HANG_GUARD_S = 30


def domain_xml(name: str, *, vcpus: int = 2, metadata: str | None = None) -> str:
    meta = (
        f"<metadata><z:zone xmlns:z='{META_URI}'>{metadata}</z:zone></metadata>"
        if metadata is not None
        else ""
    )
    return (
        f"<domain type='test'><name>{name}</name>{meta}<memory unit='MiB'>64</memory>"
        f"<vcpu>{vcpus}</vcpu><os><type>hvm</type></os></domain>"
    )


class Env(virt_env.Env):
    async def next_event(self, name: str) -> DomainEvent:
        """The next event of domain ``name`` (others are skipped)."""
        with trio.fail_after(HANG_GUARD_S):
            async for event in self.events:
                if event.name == name:
                    return event
        raise AssertionError("event channel closed")


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    async with virt_env.connected(TEST_URI, "zt-") as (hv, events):
        yield Env(hv, events)


# ---- pure parts ----


def test_backoff_schedule() -> None:
    assert list(islice(virt.backoff_delays(), 8)) == [0.5, 1, 2, 4, 8, 10, 10, 10]
    assert list(islice(virt.backoff_delays(first=1, maximum=3, factor=3), 3)) == [1, 3, 3]


def test_lifecycle_event_names() -> None:
    assert virt.lifecycle_event(
        "zoned-a", "u", libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED
    ) == DomainEvent("zoned-a", "u", "stopped", "crashed")
    assert virt.lifecycle_event(
        "zoned-a", "u", libvirt.VIR_DOMAIN_EVENT_CRASHED, libvirt.VIR_DOMAIN_EVENT_CRASHED_PANICKED
    ) == DomainEvent("zoned-a", "u", "crashed", "panicked")
    assert virt.lifecycle_event(
        "zoned-a", "u", libvirt.VIR_DOMAIN_EVENT_SHUTDOWN, libvirt.VIR_DOMAIN_EVENT_SHUTDOWN_GUEST
    ) == DomainEvent("zoned-a", "u", "shutdown", "guest")
    assert virt.lifecycle_event(
        "zoned-a", "u", libvirt.VIR_DOMAIN_EVENT_STARTED, 999
    ) == DomainEvent("zoned-a", "u", "started", "unknown-999")
    assert virt.lifecycle_event("zoned-a", "u", 999, 0) is None


def test_console_markers() -> None:
    assert virt.console_shows_late_boot(b"[ 1.2] Run /init as init process\n")
    assert virt.console_shows_late_boot(
        b"[ 3.4] Freeing unused kernel image (initmem) memory: 2612K\n"
    )
    assert not virt.console_shows_late_boot(b"[ 0.1] Linux version 6.12\n")
    assert not virt.console_shows_late_boot(b"")


def test_probe_xml(tmp_path: Path) -> None:
    xml = virt.render_probe_xml(
        name="zoned-probe-kvm",
        virt_type="kvm",
        kernel=Path("/k/bzImage"),
        initrd=None,
        cmdline="quiet panic=-1",
        console_log=tmp_path / "c.log",
    )
    root = ET.fromstring(xml)
    assert root.get("type") == "kvm"
    assert root.findtext("name") == "zoned-probe-kvm"
    assert root.findtext("vcpu") == "1"
    assert root.findtext("os/kernel") == "/k/bzImage"
    assert root.find("os/initrd") is None
    assert root.findtext("os/cmdline") == "quiet panic=-1 console=ttyS0 loglevel=7"
    assert root.find("os/type") is not None
    source = root.find("devices/serial/source")
    assert source is not None
    assert source.get("path") == str(tmp_path / "c.log")
    with_initrd = ET.fromstring(
        virt.render_probe_xml(
            name="n",
            virt_type="qemu",
            kernel=Path("/k"),
            initrd=Path("/i"),
            cmdline="console=ttyS0",
            console_log=Path("/c"),
        )
    )
    assert with_initrd.get("type") == "qemu"
    assert with_initrd.findtext("os/initrd") == "/i"
    assert with_initrd.findtext("os/cmdline") == "console=ttyS0 loglevel=7"
    # Without a uid the probe runs as qemu.conf says; with one, as a zone would.
    assert root.find("seclabel") is None
    labelled = ET.fromstring(
        virt.render_probe_xml(
            name="n",
            virt_type="kvm",
            kernel=Path("/k"),
            initrd=None,
            cmdline="",
            console_log=Path("/c"),
            qemu_uid=2013265920,
        )
    )
    seclabel = labelled.find("seclabel")
    assert seclabel is not None
    assert seclabel.attrib == {"type": "static", "model": "dac", "relabel": "no"}
    assert seclabel.findtext("label") == "+2013265920:+2013265920"


# ---- the test driver ----


async def test_version_and_capabilities(env: Env) -> None:
    version = await env.hv.version()
    assert version.hypervisor_type == "TEST"
    assert version.libvirt.count(".") == 2
    assert "<capabilities>" in await env.hv.capabilities()
    assert any(t.name == "libvirt-events" and t.is_alive() for t in threading.enumerate())


async def test_define_lookup_list_undefine(env: Env) -> None:
    assert await env.hv.lookup("zt-a") is None
    defined = await env.hv.define(domain_xml("zt-a", metadata="<z:name>a</z:name>"))
    assert defined.name == "zt-a"
    assert defined.state == "shutoff"
    assert not defined.active
    assert defined.persistent
    assert defined.id is None
    await env.hv.define(domain_xml("zt-b"))
    assert await env.hv.lookup("zt-a") == defined

    summaries = await env.hv.list_domains("zt-", metadata_uri=META_URI)
    assert [s.name for s in summaries] == ["zt-a", "zt-b"]
    assert summaries[0].uuid == defined.uuid
    assert summaries[0].metadata is not None
    # libvirt hands the element back without its namespace.
    assert ET.fromstring(summaries[0].metadata).findtext("name") == "a"
    assert summaries[1].metadata is None
    assert [s.name for s in await env.hv.list_domains("zt-a")] == ["zt-a"]
    # The driver's own domain "test" is not ours.
    assert all(s.name.startswith("zt-") for s in await env.hv.list_domains("zt-"))

    assert "<name>zt-a</name>" in await env.hv.xml("zt-a")
    await env.hv.undefine("zt-a")
    assert await env.hv.lookup("zt-a") is None
    assert [s.name for s in await env.hv.list_domains("zt-")] == ["zt-b"]


async def test_start_destroy(env: Env) -> None:
    await env.hv.define(domain_xml("zt-run"))
    started = await env.hv.start("zt-run")
    assert started.state == "running"
    assert started.active
    assert started.id is not None
    await env.hv.destroy("zt-run")
    stopped = await env.hv.lookup("zt-run")
    assert stopped is not None
    assert stopped.state == "shutoff"
    assert stopped.reason == "destroyed"
    assert stopped.id is None


async def test_error_mapping(env: Env) -> None:
    await env.hv.define(domain_xml("zt-err"))
    with pytest.raises(Conflict, match="already exists"):
        await env.hv.define(domain_xml("zt-err"))
    with pytest.raises(NotFound):
        await env.hv.start("zt-missing")
    with pytest.raises(NotFound):
        await env.hv.destroy("zt-missing", not_running_ok=True)
    with pytest.raises(NotFound):
        await env.hv.undefine("zt-missing")
    with pytest.raises(NotFound):
        await env.hv.xml("zt-missing")
    with pytest.raises(Conflict, match="not running"):
        await env.hv.destroy("zt-err")
    await env.hv.destroy("zt-err", not_running_ok=True)
    await env.hv.start("zt-err")
    with pytest.raises(Conflict, match="already running"):
        await env.hv.start("zt-err")
    with pytest.raises(HypervisorError):
        await env.hv.define("<domain type='test'><name>zt-bad</name></domain>")
    with pytest.raises(HypervisorError):
        await env.hv.define("this is not xml")


async def test_remove(env: Env) -> None:
    assert await env.hv.remove("zt-gone") is False
    await env.hv.define(domain_xml("zt-rm"))
    await env.hv.start("zt-rm")
    assert await env.hv.remove("zt-rm") is True
    assert await env.hv.lookup("zt-rm") is None


async def test_undefine_running_leaves_transient(env: Env) -> None:
    await env.hv.define(domain_xml("zt-tr"))
    await env.hv.start("zt-tr")
    await env.hv.undefine("zt-tr")
    state = await env.hv.lookup("zt-tr")
    assert state is not None
    assert state.active
    assert not state.persistent
    await env.hv.destroy("zt-tr")
    assert await env.hv.lookup("zt-tr") is None


async def test_runtime_introspection(env: Env) -> None:
    await env.hv.define(domain_xml("zt-cpu", vcpus=2))
    inactive = await env.hv.stats("zt-cpu")
    assert not inactive.active
    assert inactive.vcpus == 2
    assert inactive.max_memory_kib == 64 * 1024
    assert inactive.user_time_ns is None

    await env.hv.start("zt-cpu")
    running = await env.hv.stats("zt-cpu")
    assert running.active
    assert running.cpu_time_ns > 0
    vcpus = await env.hv.vcpus("zt-cpu")
    assert [v.number for v in vcpus] == [0, 1]
    assert all(v.state == "running" and v.affinity for v in vcpus)


async def test_pin_vcpu(env: Env) -> None:
    await env.hv.define(domain_xml("zt-pin", vcpus=2))
    await env.hv.start("zt-pin")
    await env.hv.pin_vcpu("zt-pin", 1, [0])
    vcpus = await env.hv.vcpus("zt-pin")
    assert vcpus[1].affinity == frozenset({0})
    with pytest.raises(Conflict, match="no CPUs"):
        await env.hv.pin_vcpu("zt-pin", 0, [4096])


async def test_lifecycle_events_reach_trio(env: Env) -> None:
    defined = await env.hv.define(domain_xml("zt-ev"))
    assert await env.next_event("zt-ev") == DomainEvent("zt-ev", defined.uuid, "defined", "added")
    await env.hv.start("zt-ev")
    assert await env.next_event("zt-ev") == DomainEvent("zt-ev", defined.uuid, "started", "booted")
    await env.hv.destroy("zt-ev")
    assert await env.next_event("zt-ev") == DomainEvent(
        "zt-ev", defined.uuid, "stopped", "destroyed"
    )
    await env.hv.undefine("zt-ev")
    assert await env.next_event("zt-ev") == DomainEvent(
        "zt-ev", defined.uuid, "undefined", "removed"
    )


async def test_full_channel_drops_events(caplog: pytest.LogCaptureFixture) -> None:
    # A zero-sized buffer with nobody receiving: every event is dropped and
    # logged, and the connection keeps working.
    send, receive = trio.open_memory_channel[DomainEvent](0)
    async with await Hypervisor.connect(TEST_URI, trio.CapacityLimiter(1), send) as hv:
        with caplog.at_level(logging.WARNING, logger="zoned.virt"):
            await hv.define(domain_xml("zt-full"))
            await hv.remove("zt-full")
            with trio.fail_after(HANG_GUARD_S):
                while "dropped" not in caplog.text:
                    await trio.sleep(0.01)
        assert "buffer full" in caplog.text
        assert await hv.lookup("zt-full") is None
    receive.close()


async def test_closed_channel_drops_events() -> None:
    send, receive = trio.open_memory_channel[DomainEvent](10)
    receive.close()
    async with await Hypervisor.connect(TEST_URI, trio.CapacityLimiter(1), send) as hv:
        await hv.define(domain_xml("zt-closed"))
        await hv.remove("zt-closed")
        assert await hv.lookup("zt-closed") is None


async def test_reconnect_keeps_events_flowing(env: Env) -> None:
    await env.hv.reconnect()
    defined = await env.hv.define(domain_xml("zt-re"))
    # Exactly one "defined" event: the old connection's callback is gone.
    assert await env.next_event("zt-re") == DomainEvent("zt-re", defined.uuid, "defined", "added")
    await env.hv.undefine("zt-re")
    assert (await env.next_event("zt-re")).kind == "undefined"


async def test_closed_hypervisor_refuses_calls() -> None:
    send, _receive = virt.open_event_channel()
    hv = await Hypervisor.connect(TEST_URI, trio.CapacityLimiter(1), send)
    await hv.close()
    with pytest.raises(HypervisorError, match="not connected"):
        await hv.lookup("zt-x")
    with pytest.raises(HypervisorError, match="closed"):
        await hv.reconnect()


async def test_connect_failure_is_hypervisor_error() -> None:
    send, _receive = virt.open_event_channel()
    with pytest.raises(HypervisorError, match="cannot connect"):
        await Hypervisor.connect("bogus:///nowhere", trio.CapacityLimiter(1), send)


async def test_reconnect_gives_up_only_when_delays_run_out() -> None:
    send, _receive = virt.open_event_channel()
    hv = Hypervisor(
        "bogus:///nowhere", trio.CapacityLimiter(1), send, trio.lowlevel.current_trio_token()
    )
    with pytest.raises(HypervisorError, match="could not reconnect"):
        await hv.reconnect(delays=[0, 0])


async def test_connect_to_hung_libvirtd_is_cancellable(tmp_path: Path) -> None:
    # A socket that accepts connections into its backlog but never answers
    # is a hung libvirtd to the client.
    path = tmp_path / "hung.sock"
    hung = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hung.bind(str(path))
    hung.listen(8)
    send, _receive = virt.open_event_channel()
    limiter = trio.CapacityLimiter(1)
    try:
        with trio.move_on_after(0.5) as scope:
            await Hypervisor.connect(f"qemu+unix:///system?socket={path}", limiter, send)
        assert scope.cancelled_caught
    finally:
        hung.close()
    # Once libvirt gives up, the abandoned thread returns its limiter token.
    with trio.fail_after(HANG_GUARD_S):
        async with limiter:
            pass
