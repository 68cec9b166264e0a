"""What the daemon-level integration modules share: a private zoned on the
host's libvirtd, and removal of the domains a crashed earlier run left."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest
import trio

from zoned.kernel.store import DEFAULT_STORE
from zoned.localdaemon import LocalDaemon, checkout_domain_prefix

URI = "qemu:///system"
#: Every domain the integration tests create starts with this: checkouts that
#: share the host's libvirtd never touch each other's domains.
DOMAIN_PREFIX = checkout_domain_prefix()


def domain_name(zone: str) -> str:
    """The domain of a private daemon's zone ``zone`` (or of a test's own domain)."""
    return DOMAIN_PREFIX + zone


def qemu_pid(domain: str) -> int | None:
    """The QEMU pid libvirtd (qemu:///system) recorded for a running domain, else None."""
    try:
        return int(Path(f"/run/libvirt/qemu/{domain}.pid").read_text())
    except FileNotFoundError:
        return None


def open_libvirt() -> libvirt.virConnect:
    try:
        return libvirt.open(URI)
    except libvirt.libvirtError as exc:
        pytest.fail(f"libvirtd does not answer on {URI} (run tools/host-setup): {exc}")


def destroy_domains(prefix: str) -> None:
    """Stop every running domain whose name starts with ``prefix``."""
    conn = open_libvirt()
    try:
        for dom in conn.listAllDomains():
            if dom.name().startswith(prefix):
                with contextlib.suppress(libvirt.libvirtError):
                    dom.destroy()
    finally:
        conn.close()


@contextlib.contextmanager
def private_zoned(
    zone_prefix: str, root: Path | None = None, extra_config: str = ""
) -> Iterator[LocalDaemon]:
    """A zoned of its own for one test module, whose zones are all named
    ``zone_prefix*``; none of their domains outlive it (nor precede it).
    ``root``: its directory (default: a new one); ``extra_config``: more
    lines of its zoned.toml."""
    if not (DEFAULT_STORE / "strict").exists():
        pytest.fail(f"no strict kernel in {DEFAULT_STORE}: run zoned-kernel build first")
    domain_prefix = domain_name(zone_prefix)
    destroy_domains(domain_prefix)
    daemon = LocalDaemon(
        root,
        domain_prefix=DOMAIN_PREFIX,
        extra_config=extra_config,
        remove_root=True if root is not None else None,
    )
    daemon.start()
    try:
        yield daemon
    finally:
        status = daemon.stop()
        log = daemon.log_text()
        destroy_domains(domain_prefix)
        daemon.cleanup()
        assert status == 0, f"zoned exited with {status} on SIGTERM:\n{log}"


@contextlib.contextmanager
def private_zoned_with_zone(
    zone_prefix: str, zone: str, *, memory_mib: int = 512, timeout_s: float = 180.0
) -> Iterator[LocalDaemon]:
    """:func:`private_zoned` with one zone ``zone`` booted, for a module to share."""
    from zoned.client import Client

    async def create(daemon: LocalDaemon) -> None:
        async with Client(daemon.socket, client_name="it") as client:
            with trio.fail_after(timeout_s):
                await client.create_zone(zone, memory_mib=memory_mib)

    with private_zoned(zone_prefix) as daemon:
        trio.run(create, daemon)
        yield daemon
