"""The synchronous twin of :class:`~zoned.client.Client`, for scripts.

Each call is one ``trio.run`` with its own connection: connect, hello, one
request, close. It takes the same options as the async method it wraps
(:mod:`zoned.client.options`).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import trio

from zoned import protocol as p
from zoned.client.api import Client
from zoned.client.connection import default_socket_path
from zoned.client.extract import TreeSummary
from zoned.client.files import DEFAULT_MAX_ENTRIES, DEFAULT_MAX_FILE, DirectoryListing
from zoned.client.images import ProgressCallback
from zoned.client.process import ExecResult

if TYPE_CHECKING:
    from typing import Unpack

    from zoned.client.options import (
        CreateOptions,
        ExecOptions,
        ImportOptions,
        PullOptions,
        RunExecOptions,
    )

_T = TypeVar("_T")


class SyncClient:
    """Blocking calls for scripts: each one is a ``trio.run`` with its own connection.

    Not for use inside a running trio (or asyncio) loop, and not for streams:
    use :class:`~zoned.client.Client` for those.
    """

    def __init__(self, path: str | Path | None = None, client_name: str = "zonectl") -> None:
        self.path = Path(path) if path is not None else default_socket_path()
        self.client_name = client_name

    def _run(self, call: Callable[[Client], Awaitable[_T]]) -> _T:
        async def one_call() -> _T:
            async with Client(self.path, self.client_name) as client:
                return await call(client)

        return trio.run(one_call)

    def host_info(self) -> p.HostInfoData:
        return self._run(lambda client: client.host_info())

    def create_zone(self, name: str, **options: Unpack[CreateOptions]) -> p.ZoneInfo:
        return self._run(lambda client: client.create_zone(name, **options))

    def get_zone(self, name: str) -> p.ZoneInfo:
        return self._run(lambda client: client.get_zone(name))

    def list_zones(self, labels: Mapping[str, str] | None = None) -> list[p.ZoneInfo]:
        return self._run(lambda client: client.list_zones(labels))

    def destroy_zone(self, name: str) -> p.ZoneInfo:
        return self._run(lambda client: client.destroy_zone(name))

    def quarantine_zone(self, name: str, *, destroy: bool = False) -> p.QuarantineReply:
        return self._run(lambda client: client.quarantine_zone(name, destroy=destroy))

    def audit(self, zone: str = "", since: float | None = None) -> list[p.AuditRecord]:
        async def collect(client: Client) -> list[p.AuditRecord]:
            return [record async for record in client.audit(zone, since)]

        return self._run(collect)

    def zone_metrics(self, name: str) -> p.ZoneMetricsData:
        return self._run(lambda client: client.zone_metrics(name))

    def set_zone_net(
        self,
        name: str,
        net: str | Iterable[str] | None = None,
        publishes: Iterable[str] | None = None,
    ) -> tuple[p.ZoneInfo, int]:
        return self._run(lambda client: client.set_zone_net(name, net, publishes))

    def exec(
        self,
        zone: str,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        **options: Unpack[ExecOptions],
    ) -> ExecResult:
        """Run ``argv`` in a ready zone to its end; output collected (see :meth:`Client.exec`)."""
        return self._run(lambda client: client.exec(zone, argv, input=input, **options))

    def run(
        self, argv: Sequence[str], *, input: bytes | None = None, **options: Unpack[RunExecOptions]
    ) -> ExecResult:
        """Boot a fresh zone, run ``argv`` to its end, destroy the zone."""
        return self._run(lambda client: client.run(argv, input=input, **options))

    def put_file(
        self, zone: str, path: str, data: bytes, *, mode: int = 0o644, uid: int = 0, gid: int = 0
    ) -> int:
        return self._run(
            lambda client: client.put_file(zone, path, data, mode=mode, uid=uid, gid=gid)
        )

    def get_file(self, zone: str, path: str, *, max_bytes: int = DEFAULT_MAX_FILE) -> bytes:
        return self._run(lambda client: client.get_file(zone, path, max_bytes=max_bytes))

    def get_tree(
        self,
        zone: str,
        directory: str,
        dest: str | Path,
        *,
        max_bytes: int = DEFAULT_MAX_FILE,
        outward_links: bool = False,
    ) -> TreeSummary:
        """Copy ``directory`` of the zone to ``dest`` here (see :meth:`Client.get_tree`)."""
        return self._run(
            lambda client: client.get_tree(
                zone, directory, dest, max_bytes=max_bytes, outward_links=outward_links
            )
        )

    def list_directory(
        self, zone: str, path: str, *, max_entries: int = DEFAULT_MAX_ENTRIES
    ) -> DirectoryListing:
        return self._run(lambda client: client.list_directory(zone, path, max_entries=max_entries))

    # ------------------------------------------------------------ pools

    def set_pool(self, name: str, spec: p.PoolSpec) -> p.PoolInfo:
        return self._run(lambda client: client.set_pool(name, spec))

    def list_pools(self) -> list[p.PoolInfo]:
        return self._run(lambda client: client.list_pools())

    def remove_pool(self, name: str) -> p.PoolInfo:
        return self._run(lambda client: client.remove_pool(name))

    # ------------------------------------------------------------ images

    def list_images(self) -> list[p.ImageInfo]:
        return self._run(lambda client: client.list_images())

    def inspect_image(self, reference: str) -> p.ImageInfo:
        return self._run(lambda client: client.inspect_image(reference))

    def remove_image(self, reference: str) -> p.ImageRemoveReply:
        return self._run(lambda client: client.remove_image(reference))

    def prune_images(self) -> p.ImageRemoveReply:
        return self._run(lambda client: client.prune_images())

    def image_sizes(self) -> p.ImageStoreSizes:
        return self._run(lambda client: client.image_sizes())

    def pull_image(
        self,
        reference: str,
        *,
        progress: ProgressCallback | None = None,
        **options: Unpack[PullOptions],
    ) -> p.ImageInfo:
        """See :meth:`Client.pull_image`; ``progress`` is called in this thread."""
        return self._run(lambda client: client.pull_image(reference, progress=progress, **options))

    def import_image(
        self,
        path: str | os.PathLike[str],
        *,
        progress: ProgressCallback | None = None,
        **options: Unpack[ImportOptions],
    ) -> p.ImageInfo:
        """See :meth:`Client.import_image`; ``progress`` is called in this thread."""
        return self._run(lambda client: client.import_image(path, progress=progress, **options))
