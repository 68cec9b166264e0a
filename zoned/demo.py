"""The main job, end to end: start zoned, run a command in a fresh zone, show its output.

``tools/demo`` runs this after setting up the host. It starts a private
zoned (its socket, state and logs in a temporary directory) on the host's
libvirtd and asks it to *run* a Python program: zoned boots a fresh zone of
the default image (Debian bookworm, which the setup step built) with the
strict kernel, runs the program there, streams its output back and destroys
the zone.
"""

from __future__ import annotations

import sys
import time

import trio

from zoned.client import Client
from zoned.errors import ZonedError
from zoned.localdaemon import LocalDaemon


def say(message: str) -> None:
    print(f"demo: {message}", flush=True)


DEMO_PROGRAM = """
import os, platform
print(f"2 + 2 = {2 + 2}")
print(f"hello from {platform.system()} {platform.release()}, pid {os.getpid()}")
print(f"{platform.freedesktop_os_release()['PRETTY_NAME']}, Python {platform.python_version()}")
"""


async def demo(daemon: LocalDaemon) -> None:
    async with Client(daemon.socket, client_name="demo") as client:
        host = await client.host_info()
        say(f"zoned is up: accelerator {host.accelerator}, {len(host.cpus)} CPUs")
        argv = ["python3", "-c", DEMO_PROGRAM]
        say("running python3 in a fresh zone (zonectl run -- python3 -c ...):")
        start = time.monotonic()
        async with client.run_process(argv, labels={"purpose": "demo"}) as process:
            async for chunk in process:
                sys.stdout.buffer.write(chunk.data)
                sys.stdout.buffer.flush()
        took = time.monotonic() - start
        result = process.result
        assert result is not None and process.zone is not None
        zone = process.zone
        say(
            f"exit status {result.returncode}; zone {zone.name} ran image {zone.image}"
            f" ({zone.image_id[:19]}) on its own kernel {zone.kernel_release}"
            f" ({zone.profile}, {zone.machine}/{zone.accelerator}, {zone.memory_mib} MiB)"
            f" and was destroyed; {took:.2f} s in all"
        )
        remaining = await client.list_zones({"purpose": "demo"})
        say(f"zones left behind: {len(remaining)}")
        if result.returncode != 0 or remaining:
            raise SystemExit(1)


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
