"""zoned: the daemon. One ``trio.run``, services started in order.

Start-up order (each with ``nursery.start``): the libvirt connection (and its
event thread), the accelerator decision, the zone images (the agent's boot
image and the built-in workload root; built once and cached), the image
store (:mod:`zoned.imageservice`), the monitor (audit trail, statistics,
log retention, the metrics endpoint when enabled: see :mod:`zoned.monitor`),
the zone manager (which re-adopts running zones), the CPU hotplug watcher,
the libvirt event pump and connection keeper, the control socket, and last
the E2B-compatible endpoint when enabled (:mod:`zoned.e2b`).
Then READY=1 goes to
systemd. SIGTERM or SIGINT closes the control socket and stops the daemon;
zones keep running and are re-adopted by the next start.

What the daemon takes from the host is configured or injected, so the
service tests run it on libvirt's test driver without a built kernel,
busybox or mkfs.erofs: kernels come from ``config.kernel_store``, the zone
images from the ``zone_images`` builder given to :class:`Daemon`.

Blocking work (image builds, file reads, record writes) runs on worker
threads; request handlers only await.

Before anything else the daemon checks what keeps zones apart on the host
(docs/security.md): the QEMU uid range must hold no account of the host, the
administrators' group must exist if one is named, the zone images must have
their hashes recorded. Any of those wrong is a ConfigError: the daemon does
not start, and has changed nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import grp
import hashlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import trio

from zoned import cgroups, probecache
from zoned import protocol as p
from zoned.access import AccessPolicy, Caller
from zoned.config import Config, libvirt_threads, load_config
from zoned.e2b.service import E2bEndpoint
from zoned.errors import ConfigError, InternalError, InvalidRequest, PermissionDenied, ZonedError
from zoned.events import EventHub
from zoned.hostinfo import host_tsc_khz
from zoned.hostwatch import CpuEvent, watch_cpu_events
from zoned.images.bootimage import build_boot_image
from zoned.images.integrity import read_recorded_sha256
from zoned.images.workloadroot import build_workload_root
from zoned.imageservice import ImageService
from zoned.kernel.store import KernelImage, find_kernel, list_kernels
from zoned.monitor import Monitor
from zoned.net.addressing import NetPools
from zoned.net.host import NetHost, NetHostConfig
from zoned.placement import Allocator
from zoned.pools import PoolKeeper
from zoned.protocol import Accelerator
from zoned.quarantine import quarantine_zone
from zoned.records import ZONES_SECLABEL
from zoned.server import (
    Send,
    StreamInputs,
    open_own_connection,
    serve_control_socket,
    socket_group_id,
)
from zoned.store import write_file_atomically
from zoned.topology import HostTopology, read_host_topology
from zoned.virt import (
    DomainEvent,
    Hypervisor,
    open_event_channel,
    probe_accelerator,
    probe_domain_name,
)
from zoned.workloads import exec_in_zone, run_in_fresh_zone
from zoned.zoneids import IdRange, range_clashes, read_host_accounts
from zoned.zones import ZoneManager, qemu_id_range

log = logging.getLogger("zoned")

LOG_POLL_INTERVAL = 0.2


@dataclass(frozen=True)
class ZoneImages:
    """What every zone boots from besides its kernel."""

    #: The agent's initramfs (:mod:`zoned.images.bootimage`).
    boot_image: Path
    #: The workload root disk (:mod:`zoned.images.workloadroot`); None for none.
    workload_root: Path | None


#: Makes (or finds in the cache) the zone images; blocking, run in a worker thread.
ZoneImagesBuilder = Callable[[Config], ZoneImages]


def recorded_sha256(image: Path, what: str) -> str:
    """The hash an image's builder recorded beside it; ConfigError if there is none."""
    digest = read_recorded_sha256(image)
    if digest is None:
        raise ConfigError(
            f"{what} {image} has no recorded sha256 ({image.name}.sha256): its builder"
            " records one; remove the image and let zoned build it again"
        )
    return digest


def check_qemu_id_range(ids: IdRange) -> None:
    """Refuse a QEMU uid range that overlaps the host's accounts. Blocking."""
    clashes = range_clashes(ids, read_host_accounts())
    if clashes:
        raise ConfigError(
            f"zone_uid_base/zone_uid_count {ids} overlap the host's accounts: "
            + ", ".join(clashes)
            + "; choose a range no user, group or subordinate id uses"
        )


def admin_group_id(group: str) -> int | None:
    """The administrators' group id (None when none is named); ConfigError if missing."""
    if not group:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"admin_group {group!r} does not exist on this host") from None


def nethost_config(config: Config) -> NetHostConfig:
    """The zone networks' settings of ``config`` (the owner: its state directory)."""
    try:
        return NetHostConfig(
            table=config.net_table,
            owner=str(Path(config.state_dir).resolve()),
            pools=NetPools(
                pool_v4=config.net_pool_v4,
                pool_v6=config.net_pool_v6,
                link_prefix=config.net_link_prefix,
            ),
            runtime_dir=str(Path(config.runtime_dir) / "net"),
            upstream_dns=list(config.net_upstream_dns),
            helper_uid_base=config.net_helper_uid_base,
            limits=config.net_limits,
        )
    except (msgspec.ValidationError, ValueError) as exc:
        raise ConfigError(f"invalid network settings: {exc}") from None


def build_zone_images(config: Config) -> ZoneImages:
    """The host's real images, built into ``config.image_cache`` unless already there."""
    cache = Path(config.image_cache)
    return ZoneImages(boot_image=build_boot_image(cache), workload_root=build_workload_root(cache))


def sd_notify(message: str) -> None:
    """Tell systemd about our state when it asked to know (NOTIFY_SOCKET)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(message.encode(), address)
        except OSError as exc:
            log.warning("sd_notify failed: %s", exc)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return msgspec.json.encode(entry).decode()


def setup_logging(config: Config) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if config.log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


class Daemon:
    """The services of one zoned process, wired together."""

    def __init__(
        self, config: Config, *, zone_images: ZoneImagesBuilder = build_zone_images
    ) -> None:
        self.config = config
        self._zone_images = zone_images
        self.hub = EventHub()
        self.limiter = trio.CapacityLimiter(libvirt_threads(config, len(os.sched_getaffinity(0))))
        # Read from /sys when run() starts (blocking: in a worker thread).
        self.topology: HostTopology
        self.allocator: Allocator
        self.manager: ZoneManager | None = None
        self.pools: PoolKeeper | None = None
        self.monitor: Monitor | None = None
        self.images: ImageService | None = None
        self.accelerator: Accelerator = "tcg"
        self.started_at = time.time()
        self.policy = AccessPolicy(socket_gid=None)
        self.shared_images: list[p.SharedImageInfo] = []
        self.pids_controller: cgroups.PidsController = ""

    # ------------------------------------------------------------------ start-up

    async def run(self, *, task_status: trio.TaskStatus[Daemon] = trio.TASK_STATUS_IGNORED) -> None:
        config = self.config
        await trio.to_thread.run_sync(check_qemu_id_range, qemu_id_range(config))
        self.policy = AccessPolicy(
            socket_gid=socket_group_id(config.socket_group),
            admin_gid=admin_group_id(config.admin_group),
        )
        for directory in (config.state_dir, config.runtime_dir, config.log_dir):
            await trio.Path(directory).mkdir(parents=True, exist_ok=True)
        self.pids_controller = await trio.to_thread.run_sync(
            cgroups.pids_controller, Path(config.cgroup_root)
        )
        if not self.pids_controller:
            log.warning(
                "no pids cgroup controller zoned may write under %s: zones' QEMUs get no"
                " task limit (their memory limit is libvirt's and holds)",
                config.cgroup_root,
            )
        self.topology = await trio.to_thread.run_sync(read_host_topology)
        self.allocator = Allocator(self.topology, config.reserved_cpus, config.reserved_memory_mib)
        send_events, receive_events = open_event_channel()
        sd_notify("STATUS=connecting to libvirt")
        async with (
            await Hypervisor.connect(config.libvirt_uri, self.limiter, send_events) as hv,
            trio.open_nursery() as nursery,
        ):
            self.accelerator = await self._decide_accelerator(hv)
            sd_notify("STATUS=preparing the zone images")
            images = await trio.to_thread.run_sync(self._zone_images, config)
            boot_sha256 = recorded_sha256(images.boot_image, "boot image")
            self.shared_images = [
                p.SharedImageInfo(
                    kind="boot image", path=str(images.boot_image), sha256=boot_sha256
                )
            ]
            rootfs_sha256 = ""
            if images.workload_root is not None:
                rootfs_sha256 = recorded_sha256(images.workload_root, "workload root")
                self.shared_images.append(
                    p.SharedImageInfo(
                        kind="workload root", path=str(images.workload_root), sha256=rootfs_sha256
                    )
                )
            sd_notify("STATUS=opening the image store")
            self.images = ImageService(
                config, builtin_root=images.workload_root, builtin_sha256=rootfs_sha256
            )
            await self.images.open()
            tsc = await trio.to_thread.run_sync(host_tsc_khz)
            try:
                nethost = NetHost(nethost_config(config))
            except InvalidRequest as exc:
                raise ConfigError(f"invalid network pools: {exc.message}") from None
            await nursery.start(nethost.run)
            manager = ZoneManager(
                config,
                hv,
                self.allocator,
                self.hub,
                accelerator=self.accelerator,
                boot_image=images.boot_image,
                boot_image_sha256=boot_sha256,
                images=self.images,
                tsc_khz=tsc,
                policy=self.policy,
                nethost=nethost,
                pids_controller=self.pids_controller,
            )
            self.manager = manager
            self.monitor = Monitor(
                config,
                hv,
                self.hub,
                self.allocator,
                self.policy,
                accelerator=self.accelerator,
                started_at=self.started_at,
            )
            await nursery.start(self.monitor.run, manager)
            await nursery.start(manager.run)
            self.pools = PoolKeeper(config, manager, self.images, self.policy)
            await nursery.start(self.pools.run)
            self.monitor.pool_infos = self.pools.infos
            nursery.start_soon(self._pump_domain_events, receive_events, manager)
            nursery.start_soon(hv.keep_connected, self._connection_lost, self._reconnected)
            nursery.start_soon(self._watch_cpus)
            await nursery.start(
                functools.partial(serve_control_socket, on_denied=self.monitor.denied),
                Path(config.socket_path),
                self.policy,
                self.handle,
                config.max_frame_bytes,
            )
            if config.e2b.enabled:
                connect = functools.partial(
                    open_own_connection, nursery, self.handle, self.policy, config.max_frame_bytes
                )
                await nursery.start(E2bEndpoint(config, connect, self.policy.socket_gid).run)
            log.info(
                "zoned ready: socket %s, accelerator %s, %d zone(s) adopted",
                config.socket_path,
                self.accelerator,
                len(manager.zones),
            )
            sd_notify(f"READY=1\nSTATUS=serving {len(manager.zones)} zone(s)")
            task_status.started(self)

    async def _decide_accelerator(self, hv: Hypervisor) -> Accelerator:
        if self.config.accelerator != "auto":
            return self.config.accelerator
        kernel = await trio.to_thread.run_sync(
            find_kernel, Path(self.config.kernel_store), "strict"
        )
        versions = await hv.version()
        key = probecache.ProbeKey(
            host_kernel=probecache.host_kernel(),
            libvirt=versions.libvirt,
            qemu=f"{versions.hypervisor_type} {versions.hypervisor}",
            kvm_device=await trio.to_thread.run_sync(probecache.read_kvm_identity),
            probe_kernel=str(kernel.directory),
        )
        cache = trio.Path(self.config.state_dir) / probecache.CACHE_FILE
        cached = await cache.read_bytes() if await cache.is_file() else None
        verdict = probecache.verdict_for(cached, key)
        if verdict is not None:
            log.info("accelerator %s: cached verdict for this host (%s)", verdict, cache)
            return verdict
        log.info("accelerator probe: %s", "the host changed" if cached else "no cached verdict")
        sd_notify("STATUS=probing the accelerator")
        workdir = Path(self.config.runtime_dir) / "probe"
        await trio.Path(workdir).mkdir(mode=0o700, parents=True, exist_ok=True)
        # As a zone's QEMU would run: its own uid, no supplementary group.
        result = await probe_accelerator(
            hv,
            kernel.image,
            None,
            "console=ttyS0",
            workdir,
            name=probe_domain_name(self.config.domain_prefix),
            qemu_uid=qemu_id_range(self.config).probe_id,
        )
        await trio.to_thread.run_sync(
            write_file_atomically, Path(cache), probecache.encode_entry(key, result)
        )
        log.info("accelerator probe: %s", result)
        if result == "tcg":
            await trio.to_thread.run_sync(_warn_if_kvm_closed_to_zones)
        return result

    async def _pump_domain_events(
        self, receive: trio.MemoryReceiveChannel[DomainEvent], manager: ZoneManager
    ) -> None:
        async for event in receive:
            try:
                await manager.handle_domain_event(event)
            except Exception:
                log.exception("handling domain event %s failed", event)

    def _connection_lost(self, reason: str) -> None:
        self.hub.publish("daemon", reason=f"libvirt connection lost: {reason}")

    async def _reconnected(self) -> None:
        self.hub.publish("daemon", reason="libvirt connection re-established")
        assert self.manager is not None
        await self.manager.resync()

    async def _watch_cpus(self) -> None:
        send, receive = trio.open_memory_channel[CpuEvent](64)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_cpu_events, send)
            async for event in receive:
                self.topology = await trio.to_thread.run_sync(read_host_topology)
                affected = self.allocator.update_topology(self.topology)
                self.hub.publish(
                    "cpu_online" if event.online else "cpu_offline",
                    cpu=event.cpu,
                    reason=(f"zones affected: {', '.join(affected)}" if affected else ""),
                )

    # --------------------------------------------------------------- requests

    async def handle(
        self, request: p.Request, send: Send, inputs: StreamInputs, caller: Caller
    ) -> None:
        """Carry out one request for ``caller``; a zone it may not see is ``not_found``.

        The monitor counts every request and audits those that change something.
        """
        assert self.monitor is not None

        async def carry_out(request: p.Request, send: Send) -> None:
            await self._dispatch(request, send, inputs, caller)

        await self.monitor.handle(request, send, caller, carry_out)

    async def _dispatch(
        self, request: p.Request, send: Send, inputs: StreamInputs, caller: Caller
    ) -> None:
        manager, monitor, pools = self.manager, self.monitor, self.pools
        assert manager is not None and monitor is not None and pools is not None
        match request:
            case p.HostInfo():
                await send(p.HostInfoReply(id=request.id, host=await self.host_info(caller)))
            case p.CreateZone():
                zone = await pools.create(request, caller)
                await send(p.ZoneReply(id=request.id, zone=zone))
            case p.SetPool():
                pool = await pools.set(request.name, request.spec, caller)
                await send(p.PoolReply(id=request.id, pool=pool))
            case p.ListPools():
                await send(p.PoolListReply(id=request.id, pools=pools.infos()))
            case p.RemovePool():
                pool = await pools.remove(request.name, caller)
                await send(p.PoolReply(id=request.id, pool=pool))
            case p.GetZone():
                await send(p.ZoneReply(id=request.id, zone=manager.get(request.name, caller)))
            case p.ListZones():
                zones = manager.list(dict(request.labels), caller)
                await send(p.ZoneListReply(id=request.id, zones=zones))
            case p.DestroyZone():
                zone = await manager.destroy(request.name, caller)
                await send(p.ZoneReply(id=request.id, zone=zone))
            case p.WatchEvents():
                await self._stream_events(request, send, caller)
            case p.ConsoleLog():
                await self._stream_log(request, send, caller)
            case p.ZoneMetrics():
                metrics = await manager.metrics(request.name, caller)
                await send(p.ZoneMetricsReply(id=request.id, metrics=metrics))
            case p.Exec():
                await exec_in_zone(manager, request, send, inputs, caller)
            case p.RunZone():
                await run_in_fresh_zone(manager, pools.create, request, send, inputs, caller)
            case p.AuditQuery():
                await monitor.stream_audit(request, send, caller)
            case p.QuarantineZone():
                await send(await quarantine_zone(manager, monitor, request, caller))
            case (
                p.PullImage()
                | p.ImportImage()
                | p.ListImages()
                | p.InspectImage()
                | p.RemoveImage()
                | p.PruneImages()
                | p.ImageSizes()
            ):
                assert self.images is not None
                if isinstance(request, p.RemoveImage | p.PruneImages):
                    self._may_remove_images(caller)
                await self.images.handle(request, send, inputs)
            case p.SetZoneNet():
                zone, closed = await manager.set_network(request, caller)
                await send(p.ZoneNetReply(id=request.id, zone=zone, connections_closed=closed))
            case _:
                # The protocol knows it and the daemon does not: our bug.
                raise InternalError(f"{type(request).__name__} is not handled here")

    def _may_remove_images(self, caller: Caller) -> None:
        """Images are shared by every user's zones: pulling one is for every
        member of the socket group, removing one (or pruning) is for root and
        the administrators' group."""
        if not self.policy.sees_all(caller):
            raise PermissionDenied(
                "removing images is for root and the administrators' group"
                " (admin_group in zoned.toml): images are shared by every user's zones"
            )

    async def _stream_events(self, request: p.WatchEvents, send: Send, caller: Caller) -> None:
        view = self.policy.event_view(caller)
        with self.hub.watch(view, request.zones, request.kinds) as events:
            async for event in events:
                await send(p.EventReply(id=request.id, event=event))
        raise InvalidRequest("event stream cut off: the watcher fell too far behind")

    async def _stream_log(self, request: p.ConsoleLog, send: Send, caller: Caller) -> None:
        """The console log from where the request says, in chunks; file IO in worker threads.

        A zone that exists: its current log, followed if asked. A gone zone
        (kept by the log retention): its whole log, rotated copies first,
        never followed.
        """
        manager, monitor = self.manager, self.monitor
        assert manager is not None and monitor is not None
        live = manager.zones.get(request.name)
        if live is None or request.uuid not in (None, live.record.uuid):
            files = await monitor.kept_console_log(request.name, request.uuid, caller)
            await _send_files(request, send, files)
            return
        path = trio.Path(manager.console_log_path(request.name, caller))
        chunk = p.MAX_LOG_CHUNK
        position = 0
        try:
            size = (await path.stat()).st_size
        except FileNotFoundError:
            size = 0
        if request.tail_bytes is not None:
            position = max(0, size - request.tail_bytes)
        while True:
            try:
                async with await path.open("rb") as log_file:
                    await log_file.seek(position)
                    while data := await log_file.read(chunk):
                        position += len(data)
                        await send(p.LogChunk(id=request.id, data=data))
            except FileNotFoundError:
                pass
            if not request.follow:
                await send(p.StreamEnd(id=request.id))
                return
            await trio.sleep(LOG_POLL_INTERVAL)

    async def host_info(self, caller: Caller) -> p.HostInfoData:
        """The host as ``caller`` may see it: zones not its own are not named."""
        snapshot = self.allocator.snapshot()
        reserved = set(self.config.reserved_cpus)
        assert self.manager is not None
        visible = self.manager.visible_names(caller)

        def holder(cpu: int) -> str | None:
            zone = snapshot.cpu_owner.get(cpu)
            if zone is None or zone in visible:
                return zone
            return "(another user's zone)"

        cpus = [
            p.CpuInfo(
                id=cpu.id,
                core=cpu.core_id,
                package=cpu.package_id,
                node=cpu.node,
                online=cpu.online,
                reserved=cpu.id in reserved,
                allocated_to=holder(cpu.id),
            )
            for cpu in self.topology.cpus
        ]
        found = await trio.to_thread.run_sync(
            _kernels_with_config_hashes, Path(self.config.kernel_store)
        )
        kernels = [
            p.KernelInfo(
                profile=k.manifest.profile,
                kernel_release=k.manifest.kernel_release,
                image_sha256=k.manifest.image_sha256,
                config_sha256=config_sha256,
            )
            for k, config_sha256 in found
        ]
        shared = [
            p.SharedImageInfo(
                kind=f"kernel {k.manifest.profile}",
                path=str(k.image),
                sha256=k.manifest.image_sha256,
            )
            for k, _ in found
        ]
        isolation = p.HostIsolation(
            qemu_uid_base=self.config.zone_uid_base,
            qemu_uid_count=self.config.zone_uid_count,
            qemu_uids_in_use=len(self.manager.qemu_ids.held()),
            seclabel=ZONES_SECLABEL,
            memory_overhead_mib=self.config.qemu_memory_overhead_mib,
            pids_limit=self.config.qemu_pids_limit,
            pids_controller=self.pids_controller,
            admin_group=self.config.admin_group,
            caller_sees_all=self.policy.sees_all(caller),
            shared_images=[*shared, *self.shared_images],
        )
        return p.HostInfoData(
            accelerator=self.accelerator,
            machine=self.config.machine,
            cpus=cpus,
            numa_nodes=[
                p.NumaNode(id=n.id, cpus=list(n.cpus), memory_mib=n.memory_mib)
                for n in self.topology.nodes
            ],
            memory_total_mib=self.topology.memory_total_mib,
            memory_reserved_mib=self.config.reserved_memory_mib,
            memory_free_mib=snapshot.memory_free_mib,
            cpus_free_exclusive=list(snapshot.free_exclusive_cpus),
            shared_pool=list(snapshot.shared_pool),
            zone_count=len(self.manager.zones),
            kernels=kernels,
            isolation=isolation,
        )


def _kernels_with_config_hashes(store: Path) -> list[tuple[KernelImage, str]]:
    """Every current kernel and the sha256 of the config it was built from ("" if absent)."""
    found = []
    for kernel in list_kernels(store):
        try:
            config_sha256 = hashlib.sha256(kernel.config.read_bytes()).hexdigest()
        except FileNotFoundError:
            config_sha256 = ""
        found.append((kernel, config_sha256))
    return found


def _warn_if_kvm_closed_to_zones() -> None:
    """A zone's QEMU has no supplementary groups: /dev/kvm must be open to others."""
    try:
        mode = os.stat("/dev/kvm").st_mode
    except FileNotFoundError:
        return
    if mode & 0o006 != 0o006:
        log.warning(
            "/dev/kvm is mode %o: zones' QEMUs (each its own uid, no groups) cannot open it,"
            " so zones run under TCG; make it 0666 (zoned-host-setup does) to use KVM",
            mode & 0o777,
        )


async def _send_files(request: p.ConsoleLog, send: Send, files: list[Path]) -> None:
    """Several files as one stream (``tail_bytes`` counts from the end of the last)."""
    sizes = []
    for path in files:
        try:
            sizes.append((await trio.Path(path).stat()).st_size)
        except FileNotFoundError:
            sizes.append(0)
    skip = max(0, sum(sizes) - request.tail_bytes) if request.tail_bytes is not None else 0
    for path, size in zip(files, sizes, strict=True):
        if skip >= size:
            skip -= size
            continue
        with contextlib.suppress(FileNotFoundError):
            async with await trio.Path(path).open("rb") as log_file:
                await log_file.seek(skip)
                skip = 0
                while data := await log_file.read(p.MAX_LOG_CHUNK):
                    await send(p.LogChunk(id=request.id, data=data))
    await send(p.StreamEnd(id=request.id))


async def serve(config: Config) -> None:
    """Run the daemon until SIGTERM/SIGINT."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(Daemon(config).run)
            async for signum in signals:
                log.info("received %s: stopping (zones keep running)", signal.Signals(signum).name)
                sd_notify("STOPPING=1")
                nursery.cancel_scope.cancel()
                break


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zoned", description="the zoned daemon")
    parser.add_argument("--config", type=Path, default=None, help="TOML config file")
    parser.add_argument(
        "--image-helper-socket",
        default=None,
        metavar="PATH",
        help="reach the image helper at this socket (the config's image_helper_socket)",
    )
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ZonedError as exc:
        print(f"zoned: {exc.message}", file=sys.stderr)
        return 2
    if args.image_helper_socket is not None:
        config = msgspec.structs.replace(config, image_helper_socket=args.image_helper_socket)
    setup_logging(config)
    try:
        trio.run(serve, config)
    except ZonedError as exc:
        log.error("zoned cannot start: %s", exc.message)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
