"""The main job, end to end: start zoned, boot a fresh zone, use it, clean up.

``tools/demo`` runs this after setting up the host. It starts a private
zoned (its socket, state and logs in a temporary directory) on the host's
libvirtd, creates a zone with the strict kernel, shows what the zone
reports about itself, and destroys it.
"""

from __future__ import annotations

import contextlib
import sys
import time

import trio

from zoned.client import Client
from zoned.errors import ZonedError
from zoned.localdaemon import LocalDaemon


def say(message: str) -> None:
    print(f"demo: {message}", flush=True)


async def demo(daemon: LocalDaemon) -> None:
    async with Client.connect(daemon.socket, client_name="demo") as client:
        host = await client.host_info()
        say(f"zoned is up: accelerator {host.accelerator}, {len(host.cpus)} CPUs")
        start = time.monotonic()
        zone = await client.create_zone("demo", labels={"purpose": "demo"})
        took = time.monotonic() - start
        try:
            say(
                f"zone {zone.name} is {zone.state} after {took:.2f} s: its own kernel "
                f"{zone.kernel_release} ({zone.profile}), {zone.vcpus} vCPU, "
                f"{zone.memory_mib} MiB, {zone.machine}/{zone.accelerator}"
            )
            log = b""
            async with contextlib.aclosing(client.console_log(zone.name)) as chunks:
                async for chunk in chunks:
                    log += chunk
            say("the zone's console says:")
            for line in log.decode(errors="replace").splitlines()[-4:]:
                print(f"    {line.rstrip()}")
        finally:
            final = await client.destroy_zone(zone.name)
            say(f"zone {final.name} destroyed ({final.state})")


def main() -> int:
    with LocalDaemon() as daemon:
        try:
            trio.run(demo, daemon)
        except ZonedError as exc:
            say(f"failed: {exc.code}: {exc.message}")
            print(daemon.log_text(), file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
