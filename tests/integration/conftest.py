"""What the daemon-level integration modules share: a private zoned on the
host's libvirtd, and removal of the domains a crashed earlier run left."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import libvirt
import pytest

from zoned.kernel.build import DEFAULT_STORE
from zoned.localdaemon import LocalDaemon

URI = "qemu:///system"


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
def private_zoned(domain_prefix: str) -> Iterator[LocalDaemon]:
    """A zoned of its own for one test module; its zones' domains start with
    ``domain_prefix``, and none of them outlive it (nor precede it)."""
    if not (DEFAULT_STORE / "strict").exists():
        pytest.fail(f"no strict kernel in {DEFAULT_STORE}: run zoned-kernel build first")
    destroy_domains(domain_prefix)
    daemon = LocalDaemon()
    daemon.start()
    try:
        yield daemon
    finally:
        status = daemon.stop()
        log = daemon.log_text()
        destroy_domains(domain_prefix)
        daemon.cleanup()
        assert status == 0, f"zoned exited with {status} on SIGTERM:\n{log}"
