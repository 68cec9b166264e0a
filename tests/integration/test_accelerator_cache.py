"""The accelerator verdict survives a restart of the daemon and holds only
under its key: a real daemon on the real libvirtd probes once, a restart
takes the cached verdict without a probe boot, and a changed key (here the
libvirt version the cache names) makes the next start probe again."""

from __future__ import annotations

import json

import pytest

from tests.integration.conftest import private_zoned
from zoned.probecache import CACHE_FILE

pytestmark = pytest.mark.integration

PROBED = "accelerator probe: "
CACHED = "cached verdict for this host"


def test_the_verdict_is_cached_per_host_and_reprobed_when_the_key_changes() -> None:
    with private_zoned("ac-") as daemon:
        cache = daemon.root / "state" / CACHE_FILE
        entry = json.loads(cache.read_text())
        assert entry["accelerator"] in ("kvm", "tcg")
        assert set(entry["key"]) == {"host_kernel", "libvirt", "qemu", "kvm_device", "probe_kernel"}
        assert PROBED + "no cached verdict" in daemon.log.read_text()

        daemon.stop()
        logged = len(daemon.log.read_text())
        daemon.start()
        restart_log = daemon.log.read_text()[logged:]
        assert CACHED in restart_log, restart_log
        assert PROBED not in restart_log

        daemon.stop()
        entry["key"]["libvirt"] = "0.0.1"
        cache.write_text(json.dumps(entry))
        logged = len(daemon.log.read_text())
        daemon.start()
        reprobe_log = daemon.log.read_text()[logged:]
        assert PROBED + "the host changed" in reprobe_log, reprobe_log
        assert json.loads(cache.read_text())["key"]["libvirt"] != "0.0.1"
