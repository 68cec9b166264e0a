"""A private ``zoned`` in a temporary directory: for tests, benchmarks and the demo.

It is the real daemon (``python -m zoned.daemon --config ...``) as a
subprocess, with every path it owns (socket, state, runtime, logs, its image
store and scratch disks) under one directory, talking to the host's real
libvirtd. Kernels and boot images come from the shared stores, so nothing is
rebuilt; its image store starts with the host's default image in it, hard
links into the host's store (``/var/lib/zoned/oci``, where the setup step
builds it), so nothing is converted again either.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h11

from zoned.config import Config
from zoned.kernel.store import DEFAULT_STORE

#: The host's image store, where the setup step builds the default image.
HOST_IMAGE_STORE = Path(Config().image_store)

START_TIMEOUT_S = 90.0
HTTP_TIMEOUT_S = 30.0
#: Private daemons take their zones' QEMU uids from slices of this size just
#: above the production range (``Config.zone_uid_base``, 65536 ids), one slice
#: per daemon root, below the network helpers' uids (0x7A6E0000,
#: zoned.net.host): daemons sharing the host's libvirtd then seldom even look
#: at the same uids (and skip any a live process runs as when they do).
PRIVATE_UID_SLICE = 4096
PRIVATE_UID_BASE = 0x78010000
PRIVATE_UID_SLICES = 4096


def _root_slot(root: Path) -> int:
    return int(hashlib.sha256(str(root).encode()).hexdigest(), 16) % PRIVATE_UID_SLICES


def private_uid_base(root: Path) -> int:
    """The first QEMU uid of the private daemon in ``root``."""
    return PRIVATE_UID_BASE + PRIVATE_UID_SLICE * _root_slot(root)


#: Private daemons' zone networks: the n-th /24 of this /12 (64 zones each),
#: away from the production pool (100.87.0.0/16; all of it inside CGNAT, a
#: range zones may never reach), a /48 of their own, and helper uids above
#: the production helpers' (0x7A6E0000 + slot).
PRIVATE_NET_POOL_V4 = 0x64600000  # 100.96.0.0/12
PRIVATE_HELPER_UID_BASE = 0x7A6F0000


def private_net_config(root: Path) -> dict[str, str | int]:
    """The network settings of the private daemon in ``root``: a table, link
    prefix, pools and helper uids no other daemon on the host has (the same
    slot as its QEMU uids)."""
    slot = _root_slot(root)
    first = PRIVATE_NET_POOL_V4 + 256 * slot
    v4 = f"{first >> 24}.{(first >> 16) & 255}.{(first >> 8) & 255}.0/24"
    return {
        "net_table": f"zonedt{slot:03x}",
        "net_link_prefix": f"zt{slot:03x}",
        "net_pool_v4": v4,
        "net_pool_v6": f"fd7a:6f6e:{0xA000 + slot:x}::/48",
        "net_helper_uid_base": PRIVATE_HELPER_UID_BASE + 64 * slot,
    }


def checkout_domain_prefix() -> str:
    """The domain prefix of private daemons started from this checkout.

    Several checkouts (and CI) share the host's libvirtd; a prefix derived
    from the checkout's path keeps their test zones' domains apart, and is
    stable, so a later run finds and removes what a crashed run left.
    """
    checkout = Path(__file__).resolve().parent.parent
    return "zt" + hashlib.sha256(str(checkout).encode()).hexdigest()[:6] + "-"


class LocalDaemon:
    """``zoned --config`` in a subprocess with every path in one directory."""

    def __init__(
        self,
        root: Path | None = None,
        *,
        libvirt_uri: str = "qemu:///system",
        extra_config: str = "",
        remove_root: bool | None = None,
        domain_prefix: str | None = None,
        kernel_store: Path = DEFAULT_STORE,
        seed_images: tuple[str, ...] = ("default",),
    ) -> None:
        if root is None:
            root = Path(tempfile.mkdtemp(prefix="zoned-", dir="/tmp"))
            remove_root = True if remove_root is None else remove_root
        # Traversable: a test may reach the control socket as another uid.
        root.chmod(0o711)
        self.root = root
        self.remove_root = bool(remove_root)
        self.config = root / "zoned.toml"
        self.socket = root / "zoned.sock"
        self.log = root / "zoned.log"
        self.domain_prefix = domain_prefix or checkout_domain_prefix()
        self.image_store = root / "oci"
        self.scratch_dir = root / "scratch"
        #: Images of the host's store copied into this daemon's before it starts.
        self.seed_images = seed_images
        self.config.write_text(
            "\n".join(
                [
                    f'socket_path = "{self.socket}"',
                    f'state_dir = "{root / "state"}"',
                    f'runtime_dir = "{root / "run"}"',
                    f'log_dir = "{root / "log"}"',
                    f'kernel_store = "{kernel_store}"',
                    f'image_store = "{self.image_store}"',
                    f'scratch_dir = "{self.scratch_dir}"',
                    f'libvirt_uri = "{libvirt_uri}"',
                    f'domain_prefix = "{self.domain_prefix}"',
                    # extra_config may set its own (a host made small on purpose).
                    *(
                        ["reserved_memory_mib = 512"]
                        if "reserved_memory_mib" not in extra_config
                        else []
                    ),
                    f"zone_uid_base = {private_uid_base(root)}",
                    f"zone_uid_count = {PRIVATE_UID_SLICE}",
                    *(
                        f"{key} = {json.dumps(value)}"
                        for key, value in private_net_config(root).items()
                    ),
                    "boot_timeout_s = 60.0",
                    "heartbeat_interval_s = 1.0",
                    extra_config,
                    "",
                ]
            )
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the daemon and return once it serves its socket.

        The daemon says so the way it tells systemd (``READY=1`` on
        ``$NOTIFY_SOCKET``), here on a datagram socket in :attr:`root`.
        """
        self.seed()
        notify_path = self.root / "notify.sock"
        notify_path.unlink(missing_ok=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(str(notify_path))
            with self.log.open("ab") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "zoned.daemon", "--config", str(self.config)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
                )
            deadline = time.monotonic() + START_TIMEOUT_S
            while (remaining := deadline - time.monotonic()) > 0:
                # Wake at least once a second to notice a daemon that died.
                notify.settimeout(min(remaining, 1.0))
                try:
                    message = notify.recv(4096)
                except TimeoutError:
                    if self.proc.poll() is not None:
                        raise RuntimeError(
                            f"zoned exited with {self.proc.returncode}:\n{self.log_text()}"
                        ) from None
                    continue
                if b"READY=1" in message.split(b"\n"):
                    return
        raise RuntimeError(f"zoned did not become ready in {START_TIMEOUT_S}s:\n{self.log_text()}")

    def seed(self) -> None:
        """Copy :attr:`seed_images` from the host's image store into this daemon's."""
        if not self.seed_images:
            return
        from zoned.images.errors import ImageNotFound
        from zoned.images.store import ImageStore

        host = ImageStore(HOST_IMAGE_STORE)
        mine = ImageStore(self.image_store)
        for reference in self.seed_images:
            try:
                mine.copy_from(host, reference)
            except ImageNotFound:
                raise RuntimeError(
                    f"image {reference!r} is not in the host's image store {HOST_IMAGE_STORE}:"
                    " run tools/host-setup (it builds the default image)"
                ) from None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        """SIGTERM, as systemd stops it; returns the exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise
        return self.proc.returncode

    def domain_name(self, zone: str) -> str:
        """The libvirt domain of this daemon's zone ``zone``."""
        return self.domain_prefix + zone

    def log_text(self, *, full: bool = False) -> str:
        """The daemon's log: its end (what a failure message needs), or all of it."""
        if not self.log.exists():
            return ""
        text = self.log.read_text(errors="replace")
        return text if full else text[-6000:]

    def record_path(self, zone: str) -> Path:
        return self.root / "state" / "zones" / f"{zone}.json"

    def cleanup(self) -> None:
        if self.remove_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalDaemon:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self.cleanup()


def http_get(unix_socket: Path, target: str = "/metrics") -> tuple[int, bytes]:
    """GET ``target`` from an HTTP server on a Unix socket (the metrics endpoint of
    a private daemon): the status and the body. h11 reads the response."""
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(method="GET", target=target, headers=[("host", "zoned")])
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(HTTP_TIMEOUT_S)
        sock.connect(str(unix_socket))
        sock.sendall((conn.send(request) or b"") + (conn.send(h11.EndOfMessage()) or b""))
        status = 0
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return status, bytes(body)
