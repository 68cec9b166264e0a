"""The E2B-compatible endpoint: HTTP in, the daemon's own requests out (the IO shell).

Served by the daemon when ``[e2b] enabled`` (docs/e2b.md). Every request
is routed by its headers, as the SDK sends them when ``E2B_API_URL`` and
``E2B_SANDBOX_URL`` both name this endpoint:

- with ``E2b-Sandbox-Id``: a call to that sandbox's envd (``/health``,
  ``/files``, ``/process.Process/*``, ``/filesystem.Filesystem/*``),
  authenticated by the ``X-Access-Token`` its create or connect returned;
- without: the control-plane REST API (``/v2/sandboxes`` and the rest),
  authenticated by ``X-API-Key``.

Rules:

- Keys are configured on the host (``[[e2b.keys]]``: a name, the key's
  sha256, the owner); a missing or unknown key is ``401`` before anything
  else is read. Each key acts as its owner: every operation is a request of
  the daemon's own protocol, made on an in-process control connection whose
  caller is that owner (:meth:`E2bEndpoint.client`), so the daemon's
  ownership rules, admission control and audit trail apply unchanged. A
  sandbox of another owner does not exist for the caller (``404``).
- An access token is the HMAC of the sandbox's zone uuid and key under a
  secret of this host (``state_dir/e2b/secret``): stable across restarts,
  void once its key is removed from the configuration.
- A sandbox is a zone this endpoint created, plus a record of its template,
  owner, environment and deadline (``state_dir/e2b/zones``, written before
  the create is answered). When the deadline passes the zone is destroyed;
  the deadlines survive a daemon restart (the records are read at start,
  sandboxes whose zone is gone forgotten, those past their deadline
  destroyed at once).
- No zone logic here: create, get, list, destroy, exec and the client's file
  transfers, nothing else. Bad input is answered with the status and body
  the SDK turns into its typed exceptions, and changes nothing.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import logging
import os
import pwd
import re
import secrets
import time
import urllib.parse
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgspec
import trio

from zoned import protocol as p
from zoned.access import Caller
from zoned.client import Client
from zoned.config import Config, E2bConfig
from zoned.e2b import api, envd, network
from zoned.e2b import connectrpc as rpc
from zoned.e2b.processes import ProcessTable, StartSpec, event_stream, keepalive_interval
from zoned.e2b.processes import zoned_error as rpc_error_of
from zoned.errors import ConfigError, NotFound, ZonedError
from zoned.httpserve import (
    HttpLimits,
    HttpRequest,
    HttpResponse,
    open_http_listeners,
    parse_listen_address,
    serve_http,
    unlink_socket,
)
from zoned.net.host import host_networks
from zoned.net.policy import RefusedRange
from zoned.store import RecordWriter, ZoneStore

log = logging.getLogger(__name__)

ENVD_PORT: Final = "49983"
JSON: Final = "application/json"
#: The largest JSON body of a REST call or an envd RPC.
MAX_JSON_BYTES: Final = 256 * 1024
#: Helper output (stat, listings) taken from a zone at most.
MAX_HELPER_OUTPUT: Final = 4 * 1024 * 1024
#: Entries ListDir returns at most, over all depths.
MAX_LIST_ENTRIES: Final = 10_000
DOWNLOAD_CHUNKS: Final = 8
#: Writes stdin to ``$1`` (its directories made), whole or not at all: to a
#: temporary name beside it, then renamed; as the call's user, so the file is theirs.
_PUT_SCRIPT: Final = (
    'mkdir -p -- "$(dirname -- "$1")" && tmp="$1.e2b-put.$$" && cat > "$tmp"'
    ' && mv -f -- "$tmp" "$1" || { rm -f -- "$tmp"; exit 1; }'
)
_SANDBOX_PATH = re.compile(r"^(/v2)?/sandboxes/([^/]{1,128})(/[a-z]+)?\Z")


@dataclass(frozen=True)
class KeyHolder:
    """Who presents one configured key."""

    name: str
    caller: Caller


def owner_caller(owner: str, key_name: str) -> Caller:
    """The caller a key acts as: a host user by name or uid; ConfigError if unknown."""
    try:
        entry = pwd.getpwuid(int(owner)) if owner.isdigit() else pwd.getpwnam(owner)
    except (KeyError, OverflowError):
        if not owner.isdigit():
            raise ConfigError(f"e2b key {key_name!r}: no user {owner!r} on this host") from None
        uid = int(owner)
        return Caller(uid=uid, gid=uid, groups=frozenset(), pid=0, exe=f"e2b:{key_name}")
    groups = frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return Caller(uid=entry.pw_uid, gid=entry.pw_gid, groups=groups, pid=0, exe=f"e2b:{key_name}")


def resolve_keys(config: E2bConfig) -> dict[str, KeyHolder]:
    return {
        key.key_sha256: KeyHolder(key.name, owner_caller(key.owner, key.name))
        for key in config.keys
    }


def _read_or_make_secret(path: Path) -> bytes:
    """The host's token secret (32 random bytes, mode 0600), made on first use."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = secrets.token_bytes(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    if len(data) != 32:
        raise ConfigError(f"{path} is not a 32-byte secret: remove it to make a new one")
    return data


def _json(status: int, body: bytes, headers: tuple[tuple[str, str], ...] = ()) -> HttpResponse:
    return HttpResponse(status=status, body=body, content_type=JSON, headers=headers)


def _api_error(exc: api.ApiError) -> HttpResponse:
    return _json(exc.status, exc.body())


def _envd_http_error(status: int, message: str) -> HttpResponse:
    """An error of envd's HTTP API (``/files``): the SDK reads ``message``."""
    return _json(status, msgspec.json.encode({"code": status, "message": message[:2000]}))


def _not_found_502(sandbox_id: str) -> HttpResponse:
    """What E2B's proxy answers for a sandbox that is gone: SandboxNotRunningException."""
    return _envd_http_error(502, f"The sandbox {sandbox_id[:128]} was not found")


def _api_error_of(exc: ZonedError) -> api.ApiError:
    status = {
        "not_found": 404,
        "invalid_request": 400,
        "conflict": 409,
        "no_capacity": 429,
        "permission_denied": 403,
    }.get(exc.code, 500)
    return api.ApiError(status, exc.message)


#: Opens a control connection of the daemon's own for a caller (the client's end).
OpenConnection = Callable[[Caller], Awaitable[trio.SocketStream]]


class E2bEndpoint:
    """The endpoint of one daemon; ``connect`` is how it reaches the daemon."""

    def __init__(
        self, config: Config, connect: OpenConnection, socket_gid: int | None = None
    ) -> None:
        self.config = config
        self.e2b = config.e2b
        self._open_connection = connect
        #: The group a Unix-socket listener is given (the control socket's).
        self._socket_gid = socket_gid
        self._keys: dict[str, KeyHolder] = {}
        self._secret = b""
        state = Path(config.state_dir) / "e2b"
        self._state_dir = state
        self._writer = RecordWriter(ZoneStore(state, api.SandboxRecord))
        self.records: dict[str, api.SandboxRecord] = {}
        self._nursery: trio.Nursery | None = None
        self._deadline_changed = trio.Event()
        self.processes = ProcessTable(self.client)
        #: What the host refuses beside the fixed ranges (its own addresses and
        #: networks, the zone pool): an allowOut entry inside one is refused.
        self._host_refused: list[RefusedRange] = []

    # ------------------------------------------------------------ running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, adopt the records, serve until cancelled."""
        self._keys = await trio.to_thread.run_sync(resolve_keys, self.e2b)
        self._secret = await trio.to_thread.run_sync(
            _read_or_make_secret, self._state_dir / "secret"
        )
        self._host_refused = [
            *await trio.to_thread.run_sync(host_networks),
            RefusedRange(self.config.net_pool_v4, "zone-pool"),
            RefusedRange(self.config.net_pool_v6, "zone-pool"),
        ]
        address = parse_listen_address(self.e2b.listen)
        try:
            listeners = await open_http_listeners(address, socket_gid=self._socket_gid)
        except OSError as exc:
            raise ConfigError(f"e2b.listen {self.e2b.listen}: cannot listen: {exc}") from exc
        limits = HttpLimits(
            max_body_bytes=self.e2b.max_upload_bytes,
            request_timeout_s=120.0,
            send_timeout_s=60.0,
            max_connections=64,
            max_requests_per_connection=1000,
        )
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(self._writer.run)
                self.records = await self._writer.load_all()
                await nursery.start(self._adopt)
                nursery.start_soon(self._reap_expired)
                await nursery.start(
                    functools.partial(serve_http, screen=self.screen),
                    listeners,
                    self.handle,
                    limits,
                )
                log.info(
                    "E2B endpoint on %s: %d key(s), %d sandbox(es) adopted",
                    address,
                    len(self._keys),
                    len(self.records),
                )
                task_status.started()
        finally:
            unlink_socket(address)

    async def _adopt(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Forget records whose zone is gone (or is another zone of the same name)."""
        task_status.started()
        async with self.client(None) as client:
            zones = {zone.name: zone for zone in await client.list_zones({})}
        for sandbox_id, record in list(self.records.items()):
            if not api.is_its_zone(record, zones.get(sandbox_id)):
                log.info("E2B sandbox %s: its zone is gone; forgetting it", sandbox_id)
                await self._forget(sandbox_id)
        self._deadline_changed.set()

    @asynccontextmanager
    async def client(self, caller: Caller | None) -> AsyncIterator[Client]:
        """A control connection of the daemon's own, as ``caller`` (None: the daemon)."""
        who = caller or Caller(uid=0, gid=0, groups=frozenset(), pid=0, exe="e2b")
        async with Client(
            client_name="e2b",
            max_frame=self.config.max_frame_bytes,
            connect=lambda: self._open_connection(who),
        ) as client:
            yield client

    # ------------------------------------------------------------ deadlines

    async def _reap_expired(self) -> None:
        while True:
            self._deadline_changed = trio.Event()
            now = time.time()
            for sandbox_id, record in list(self.records.items()):
                if record.end_at <= now:
                    log.info("E2B sandbox %s reached its timeout: destroying it", sandbox_id)
                    await self._destroy(sandbox_id)
            upcoming = [record.end_at for record in self.records.values()]
            wait = min(upcoming) - time.time() if upcoming else 3600.0
            with trio.move_on_after(max(0.05, wait)):
                await self._deadline_changed.wait()

    async def _destroy(self, sandbox_id: str) -> None:
        """Destroy a sandbox's zone (as the daemon) and forget it."""
        try:
            async with self.client(None) as client:
                await client.destroy_zone(sandbox_id)
        except NotFound:
            pass
        except ZonedError as exc:
            log.warning("E2B sandbox %s: destroy failed: %s", sandbox_id, exc.message)
            return
        await self._forget(sandbox_id)

    async def _forget(self, sandbox_id: str) -> None:
        self.records.pop(sandbox_id, None)
        self.processes.forget_sandbox(sandbox_id)
        await self._writer.delete(sandbox_id).wait()

    async def _save(self, record: api.SandboxRecord) -> None:
        await self._writer.save(record.sandbox_id, record).wait()
        self.records[record.sandbox_id] = record
        self._deadline_changed.set()

    def access_token(self, record: api.SandboxRecord) -> str:
        message = f"{record.zone_uuid}\x00{record.key_name}\x00{record.owner_uid}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    # ------------------------------------------------------------ HTTP

    def screen(self, head: HttpRequest) -> HttpResponse | None:
        """Refuse before the body is read: no key (or token), or a body too large.

        Only ``POST /files`` may carry more than a JSON message.
        """
        sandbox_id = head.header("e2b-sandbox-id")
        if sandbox_id is None:
            try:
                self._authenticate(head)
            except api.ApiError as exc:
                return _api_error(exc)
        else:
            refusal = self._check_token(head, sandbox_id)
            if refusal is not None:
                return refusal
        length = head.header("content-length")
        too_long = length is not None and length.isdigit() and int(length) > MAX_JSON_BYTES
        if head.path != "/files" and too_long:
            return _envd_http_error(413, f"a request body is at most {MAX_JSON_BYTES} bytes")
        return None

    async def handle(self, request: HttpRequest) -> HttpResponse:
        sandbox_id = request.header("e2b-sandbox-id")
        if sandbox_id is not None:
            return await self._envd(request, sandbox_id)
        try:
            holder = self._authenticate(request)
            return await self._rest(request, holder)
        except api.ApiError as exc:
            return _api_error(exc)
        except ZonedError as exc:
            return _api_error(_api_error_of(exc))

    def _authenticate(self, request: HttpRequest) -> KeyHolder:
        key = request.header("x-api-key")
        if not key:
            raise api.ApiError(401, "an API key is required (X-API-Key)")
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
        holder = None
        for known, candidate in self._keys.items():
            if hmac.compare_digest(known, digest):
                holder = candidate
        if holder is None:
            raise api.ApiError(401, "invalid API key")
        return holder

    # ------------------------------------------------------------ REST

    async def _rest(self, request: HttpRequest, holder: KeyHolder) -> HttpResponse:
        method, path = request.method, request.path
        if path in ("/sandboxes", "/v2/sandboxes"):
            if method == "POST":
                return await self._create(request, holder)
            if method == "GET":
                return await self._list(request, holder)
            raise api.ApiError(405, f"{method} is not allowed on {path}")
        found = _SANDBOX_PATH.fullmatch(path)
        if found is None:
            raise api.ApiError(404, f"no such API path: {path[:200]}")
        sandbox_id = urllib.parse.unquote(found[2])
        action = found[3] or ""
        match method, action:
            case "GET", "":
                return await self._get(sandbox_id, holder)
            case "DELETE", "":
                return await self._kill(sandbox_id, holder)
            case "POST", "/timeout":
                body = api.decode_body(request.body, api.TimeoutBody)
                return await self._set_timeout(sandbox_id, holder, body.timeout)
            case "POST", "/connect":
                body = api.decode_body(request.body, api.ConnectBody)
                return await self._connect(sandbox_id, holder, body.timeout)
            case "POST", "/refreshes":
                return await self._refresh(sandbox_id, holder, request.body)
            case "POST", "/pause" | "/resume":
                raise api.ApiError(
                    501, "pause/resume is not supported by zoned: sandboxes run until they end"
                )
            case "PUT", "/network":
                raise api.ApiError(
                    501,
                    "update_network is not supported by zoned's E2B endpoint: a sandbox"
                    " keeps the network it was created with",
                )
            case "POST", "/snapshots" | "/fork":
                raise api.ApiError(501, f"{action[1:]} is not supported by zoned")
            case "GET", "/metrics" | "/logs":
                raise api.ApiError(501, f"sandbox {action[1:]} are not served by zoned's endpoint")
        raise api.ApiError(404, f"no such API call: {method} {path[:200]}")

    async def _owned(
        self, sandbox_id: str, holder: KeyHolder, client: Client
    ) -> tuple[api.SandboxRecord, p.ZoneInfo]:
        """The caller's sandbox and its zone, else 404 (another owner's: the same)."""
        record = self.records.get(sandbox_id)
        if record is None:
            raise api.ApiError(404, f"sandbox {sandbox_id[:128]} not found")
        try:
            zone = await client.get_zone(sandbox_id)
        except NotFound:
            raise api.ApiError(404, f"sandbox {sandbox_id[:128]} not found") from None
        if not api.is_its_zone(record, zone):
            raise api.ApiError(404, f"sandbox {sandbox_id[:128]} not found")
        return record, zone

    async def _create(self, request: HttpRequest, holder: KeyHolder) -> HttpResponse:
        body: api.NewSandbox = api.decode_body(request.body, api.NewSandbox)
        api.check_new_sandbox(body, self.e2b)
        owned = sum(1 for r in self.records.values() if r.owner_uid == holder.caller.uid)
        if owned >= self.e2b.max_sandboxes_per_owner:
            raise api.ApiError(
                429,
                f"{owned} sandboxes already run for this owner"
                f" (e2b.max_sandboxes_per_owner is {self.e2b.max_sandboxes_per_owner})",
            )
        template = self.e2b.templates[body.template_id]
        policy = network.sandbox_policy(
            body.template_id,
            network.template_policy(template.net),
            body.allow_internet_access,
            body.network,
            self._host_refused,
        )
        sandbox_id = api.new_sandbox_id()
        timeout = body.timeout or self.e2b.default_timeout_s
        async with self.client(holder.caller) as client:
            zone = await client.create_zone(
                sandbox_id,
                vcpus=template.vcpus,
                memory_mib=template.memory_mib,
                profile=template.profile,
                image=template.image,
                labels=api.zone_labels(body.template_id, body.metadata),
                net=None if policy is None else policy.describe(),
            )
            now = time.time()
            record = api.SandboxRecord(
                sandbox_id=sandbox_id,
                zone_uuid=zone.uuid,
                template=body.template_id,
                owner_uid=holder.caller.uid,
                key_name=holder.name,
                envs=dict(body.env_vars or {}),
                started_at=now,
                end_at=now + timeout,
            )
            try:
                await self._save(record)
            except BaseException:
                with trio.CancelScope(shield=True), contextlib.suppress(ZonedError):
                    await client.destroy_zone(sandbox_id)
                raise
        log.info("E2B sandbox %s created for key %s", sandbox_id, holder.name)
        return _json(201, api.sandbox_json(record, self.access_token(record)))

    async def _get(self, sandbox_id: str, holder: KeyHolder) -> HttpResponse:
        async with self.client(holder.caller) as client:
            record, zone = await self._owned(sandbox_id, holder, client)
        return _json(200, msgspec.json.encode(api.detail(record, zone)))

    async def _list(self, request: HttpRequest, holder: KeyHolder) -> HttpResponse:
        query = api.list_query(request.query)
        async with self.client(holder.caller) as client:
            zones = {zone.name: zone for zone in await client.list_zones({})}
        found = [
            api.detail(record, zones[sandbox_id])
            for sandbox_id, record in sorted(self.records.items(), key=lambda i: i[1].started_at)
            if api.is_its_zone(record, zones.get(sandbox_id))
            and api.matches(query, record, zones[sandbox_id])
        ]
        page = found[query.offset :]
        headers: tuple[tuple[str, str], ...] = ()
        if query.limit is not None and len(page) > query.limit:
            page = page[: query.limit]
            headers = (("x-next-token", str(query.offset + query.limit)),)
        return _json(200, msgspec.json.encode(page), headers)

    async def _kill(self, sandbox_id: str, holder: KeyHolder) -> HttpResponse:
        async with self.client(holder.caller) as client:
            await self._owned(sandbox_id, holder, client)
            with contextlib.suppress(NotFound):
                await client.destroy_zone(sandbox_id)
        await self._forget(sandbox_id)
        log.info("E2B sandbox %s killed by key %s", sandbox_id, holder.name)
        return HttpResponse(status=204)

    def _checked_timeout(self, timeout: int) -> int:
        if not 0 <= timeout <= self.e2b.max_timeout_s:
            raise api.ApiError(400, f"timeout must be within 0..{self.e2b.max_timeout_s} seconds")
        return timeout

    async def _set_timeout(self, sandbox_id: str, holder: KeyHolder, timeout: int) -> HttpResponse:
        seconds = self._checked_timeout(timeout)
        async with self.client(holder.caller) as client:
            record, _ = await self._owned(sandbox_id, holder, client)
        await self._save(msgspec.structs.replace(record, end_at=time.time() + seconds))
        return HttpResponse(status=204)

    async def _refresh(self, sandbox_id: str, holder: KeyHolder, body: bytes) -> HttpResponse:
        class Refresh(msgspec.Struct, frozen=True):
            duration: int | None = None

        duration = self._checked_timeout(
            api.decode_body(body, Refresh).duration or self.e2b.default_timeout_s
        )
        async with self.client(holder.caller) as client:
            record, _ = await self._owned(sandbox_id, holder, client)
        end = max(record.end_at, time.time() + duration)
        await self._save(msgspec.structs.replace(record, end_at=end))
        return HttpResponse(status=204)

    async def _connect(
        self, sandbox_id: str, holder: KeyHolder, timeout: int | None
    ) -> HttpResponse:
        async with self.client(holder.caller) as client:
            record, _ = await self._owned(sandbox_id, holder, client)
        if timeout is not None:
            end = max(record.end_at, time.time() + self._checked_timeout(timeout))
            record = msgspec.structs.replace(record, end_at=end)
            await self._save(record)
        return _json(200, api.sandbox_json(record, self.access_token(record)))

    # ------------------------------------------------------------ envd

    def _sandbox_caller(self, record: api.SandboxRecord) -> Caller | None:
        for holder in self._keys.values():
            if holder.name == record.key_name and holder.caller.uid == record.owner_uid:
                return holder.caller
        return None

    def _check_token(self, request: HttpRequest, sandbox_id: str) -> HttpResponse | None:
        """The answer for an envd call that may not go on (None: it may)."""
        port = request.header("e2b-sandbox-port") or ENVD_PORT
        record = self.records.get(sandbox_id)
        if record is None:
            return _not_found_502(sandbox_id)
        if port != ENVD_PORT:
            return _envd_http_error(
                502, f"port {port[:8]} is not open: zoned's endpoint serves envd ({ENVD_PORT}) only"
            )
        token = request.header("x-access-token") or ""
        caller = self._sandbox_caller(record)
        if caller is None or not hmac.compare_digest(token, self.access_token(record)):
            if request.path.startswith(("/process.", "/filesystem.")):
                error = rpc.RpcError("unauthenticated", "invalid or missing X-Access-Token")
                return _json(error.http_status, error.body())
            return _envd_http_error(401, "invalid or missing X-Access-Token")
        return None

    async def _envd(self, request: HttpRequest, sandbox_id: str) -> HttpResponse:
        refusal = self._check_token(request, sandbox_id)
        record = self.records.get(sandbox_id)
        caller = self._sandbox_caller(record) if record is not None else None
        if refusal is not None or record is None or caller is None:
            return refusal or _not_found_502(sandbox_id)
        path = request.path
        if path == "/health":
            return HttpResponse(status=204)
        if path == "/files":
            return await self._files(request, record, caller)
        service, _, method = path.lstrip("/").partition("/")
        if request.method != "POST" or service not in ("process.Process", "filesystem.Filesystem"):
            return _envd_http_error(404, f"no such envd path: {request.method} {path[:200]}")
        try:
            if service == "process.Process" and method in ("Start", "Connect"):
                return await self._process_stream(request, record, caller, method)
            payload = self._unary_body(request)
            user = envd.user_from_authorization(request.header("authorization"))
            if service == "process.Process":
                body = await self._process_call(record, method, payload)
            else:
                body = await self._filesystem_call(record, caller, user, method, payload)
            return _json(200, body)
        except ZonedError as exc:
            error = rpc_error_of(exc, sandbox_id)
        except rpc.RpcError as exc:
            error = exc
        return _json(error.http_status, error.body())

    def _unary_body(self, request: HttpRequest) -> bytes:
        content_type = (request.header("content-type") or "").split(";")[0].strip()
        if content_type != rpc.UNARY_CONTENT_TYPE:
            raise rpc.RpcError(
                "invalid_argument",
                f"unary calls take {rpc.UNARY_CONTENT_TYPE}, not {content_type!r}",
            )
        if len(request.body) > MAX_JSON_BYTES:
            raise rpc.RpcError("resource_exhausted", f"a message is at most {MAX_JSON_BYTES} bytes")
        return request.body

    async def _process_stream(
        self, request: HttpRequest, record: api.SandboxRecord, caller: Caller, method: str
    ) -> HttpResponse:
        content_type = (request.header("content-type") or "").split(";")[0].strip()
        if content_type != rpc.STREAM_CONTENT_TYPE:
            raise rpc.RpcError(
                "invalid_argument",
                f"streaming calls take {rpc.STREAM_CONTENT_TYPE}, not {content_type!r}",
            )
        payload = rpc.single_envelope(request.body)
        timeout = rpc.timeout_ms(request.header("connect-timeout-ms"))
        deadline = trio.current_time() + (timeout / 1000 if timeout else float("inf"))
        keepalive = keepalive_interval(request.header("keepalive-ping-interval"))
        if method == "Start":
            start = rpc.decode_message(payload, envd.StartRequest)
            user = envd.user_from_authorization(request.header("authorization"))
            spec = self._start_spec(record, caller, start, user)
            assert self._nursery is not None
            running, events = await self.processes.start(self._nursery, spec)
        else:
            selector = rpc.decode_message(payload, envd.SelectorRequest).process
            running = self.processes.find(record.sandbox_id, selector)
            if running.done.is_set():
                raise rpc.RpcError("not_found", f"process {running.pid} has ended")
            events = running.subscribe()
        return HttpResponse(
            status=200,
            content_type=rpc.STREAM_CONTENT_TYPE,
            stream=event_stream(running, events, deadline=deadline, keepalive_s=keepalive),
        )

    def _start_spec(
        self,
        record: api.SandboxRecord,
        caller: Caller,
        start: envd.StartRequest,
        user: envd.User,
    ) -> StartSpec:
        config = start.process or envd.ProcessConfig()
        pty_size: tuple[int, int] | None = None
        if start.pty is not None:
            size = start.pty.get("size") or {}
            try:
                pty_size = (int(size.get("rows", 24)), int(size.get("cols", 80)))
            except (TypeError, ValueError):
                raise rpc.RpcError("invalid_argument", "pty.size must be rows and cols") from None
            if not all(1 <= n <= 1000 for n in pty_size):
                raise rpc.RpcError("invalid_argument", "pty rows and cols must be within 1..1000")
        cwd = envd.zone_path(config.cwd, user) if config.cwd else None
        return StartSpec(
            sandbox_id=record.sandbox_id,
            caller=caller,
            argv=envd.command_argv(config),
            env=envd.command_env(record.envs, config.envs),
            cwd=cwd,
            user=user,
            stdin=bool(start.stdin),
            tag=start.tag,
            config=config,
            pty_size=pty_size,
        )

    async def _process_call(self, record: api.SandboxRecord, method: str, payload: bytes) -> bytes:
        sandbox_id = record.sandbox_id
        match method:
            case "List":
                rpc.decode_message(payload, envd.Empty)
                running = self.processes.running(sandbox_id)
                return envd.list_response([r.record() for r in running if not r.done.is_set()])
            case "SendInput":
                message = rpc.decode_message(payload, envd.SendInputRequest)
                target = self.processes.find(sandbox_id, message.process)
                given = message.input or envd.ProcessInput()
                data = envd.decode_bytes(given.pty if target.pty else given.stdin, "input")
                await target.process.write(data)
            case "SendSignal":
                signal = rpc.decode_message(payload, envd.SendSignalRequest)
                target = self.processes.find(sandbox_id, signal.process)
                await target.process.signal(envd.signal_number(signal.signal))
            case "CloseStdin":
                close = rpc.decode_message(payload, envd.SelectorRequest)
                target = self.processes.find(sandbox_id, close.process)
                await target.process.close_stdin()
            case "Update":

                class Update(msgspec.Struct, frozen=True):
                    process: envd.ProcessSelector | None = None
                    pty: dict[str, Any] | None = None

                update = rpc.decode_message(payload, Update)
                target = self.processes.find(sandbox_id, update.process)
                size = (update.pty or {}).get("size") or {}
                if not target.pty or not size:
                    raise rpc.RpcError("invalid_argument", "Update resizes a PTY: pty.size")
                try:
                    await target.process.resize(int(size["rows"]), int(size["cols"]))
                except (KeyError, TypeError, ValueError):
                    raise rpc.RpcError(
                        "invalid_argument", "pty.size must be rows and cols"
                    ) from None
            case _:
                raise rpc.RpcError(
                    "unimplemented", f"process.Process/{method[:64]} is not supported by zoned"
                )
        return b"{}"

    # ------------------------------------------------------------ files

    async def _helper(
        self,
        client: Client,
        sandbox_id: str,
        user: envd.User,
        argv: list[str],
        input: bytes | None = None,
    ) -> tuple[int, bytes, bytes]:
        """Run one of the agent's own tools as ``user`` (given ``input``, then EOF):
        its status, bounded stdout and stderr."""
        out, err = bytearray(), bytearray()
        async with client.exec_process(
            sandbox_id, argv, agent_tools=True, user=user.spec, stdin=input is not None
        ) as process:
            if input is not None:
                # The helpers that take input answer with a line at most.
                await process.write(input)
                await process.close_stdin()
            async for chunk in process:
                target = out if chunk.stream == "stdout" else err
                target.extend(chunk.data[: max(0, MAX_HELPER_OUTPUT - len(target))])
                if len(out) >= MAX_HELPER_OUTPUT:
                    await process.signal(9)
                    await process.wait()
                    raise rpc.RpcError("resource_exhausted", "the zone's answer is too large")
        assert process.result is not None
        return process.result.returncode, bytes(out), bytes(err)

    async def _stat(
        self, client: Client, sandbox_id: str, user: envd.User, path: str
    ) -> envd.Entry | None:
        status, out, err = await self._helper(
            client, sandbox_id, user, ["sh", "-c", envd.STAT_SCRIPT, "e2b-stat", path]
        )
        if status == envd.STAT_MISSING:
            return None
        if status != 0:
            raise rpc.RpcError("invalid_argument", f"cannot stat {path!r}: {_text(err)}")
        return envd.parse_stat(path, out)

    async def _must_stat(
        self, client: Client, sandbox_id: str, user: envd.User, path: str
    ) -> envd.Entry:
        entry = await self._stat(client, sandbox_id, user, path)
        if entry is None:
            raise rpc.RpcError("not_found", f"path {path[:200]!r} does not exist")
        return entry

    async def _run_tool(
        self, client: Client, sandbox_id: str, user: envd.User, argv: list[str], what: str
    ) -> None:
        status, _, err = await self._helper(client, sandbox_id, user, argv)
        if status != 0:
            raise rpc.RpcError("invalid_argument", f"{what}: {_text(err) or f'status {status}'}")

    async def _filesystem_call(
        self,
        record: api.SandboxRecord,
        caller: Caller,
        user: envd.User,
        method: str,
        payload: bytes,
    ) -> bytes:
        zone = record.sandbox_id
        async with self.client(caller) as client:
            match method:
                case "Stat":
                    path = envd.zone_path(rpc.decode_message(payload, envd.PathRequest).path, user)
                    return envd.entry_response(await self._must_stat(client, zone, user, path))
                case "MakeDir":
                    path = envd.zone_path(rpc.decode_message(payload, envd.PathRequest).path, user)
                    if await self._stat(client, zone, user, path) is not None:
                        raise rpc.RpcError("already_exists", f"{path[:200]!r} already exists")
                    await self._run_tool(
                        client, zone, user, ["mkdir", "-p", "--", path], f"cannot make {path!r}"
                    )
                    return envd.entry_response(await self._must_stat(client, zone, user, path))
                case "Remove":
                    path = envd.zone_path(rpc.decode_message(payload, envd.PathRequest).path, user)
                    if path == "/":
                        raise rpc.RpcError("invalid_argument", "the root cannot be removed")
                    await self._must_stat(client, zone, user, path)
                    await self._run_tool(
                        client, zone, user, ["rm", "-rf", "--", path], f"cannot remove {path!r}"
                    )
                    return b"{}"
                case "Move":
                    move = rpc.decode_message(payload, envd.MoveRequest)
                    source = envd.zone_path(move.source, user)
                    destination = envd.zone_path(move.destination, user)
                    await self._must_stat(client, zone, user, source)
                    await self._run_tool(
                        client,
                        zone,
                        user,
                        ["mv", "-f", "--", source, destination],
                        f"cannot move {source!r}",
                    )
                    return envd.entry_response(
                        await self._must_stat(client, zone, user, destination)
                    )
                case "ListDir":
                    listing = rpc.decode_message(payload, envd.ListDirRequest)
                    path = envd.zone_path(listing.path, user)
                    entries = await self._list_dir(client, zone, user, path, max(1, listing.depth))
                    return envd.entries_response(entries)
        raise rpc.RpcError(
            "unimplemented", f"filesystem.Filesystem/{method[:64]} is not supported by zoned"
        )

    async def _list_dir(
        self, client: Client, zone: str, user: envd.User, path: str, depth: int
    ) -> list[envd.Entry]:
        top = await self._must_stat(client, zone, user, path)
        if top.file_type != "FILE_TYPE_DIRECTORY":
            raise rpc.RpcError("invalid_argument", f"{path[:200]!r} is not a directory")
        entries: list[envd.Entry] = []
        level = [path]
        for _ in range(min(depth, 16)):
            following: list[str] = []
            for directory in level:
                listing = await client.list_directory(zone, directory, max_entries=MAX_LIST_ENTRIES)
                for item in listing.entries:
                    child = directory.rstrip("/") + "/" + item.name
                    raw = {
                        "file": 0o100000,
                        "directory": 0o040000,
                        "symlink": 0o120000,
                    }.get(item.kind, 0o100000)
                    entries.append(envd.Entry(child, raw | item.mode, item.size, item.mtime))
                    if item.kind == "directory":
                        following.append(child)
                    if len(entries) >= MAX_LIST_ENTRIES:
                        return entries
            level = following
        return entries

    async def _files(
        self, request: HttpRequest, record: api.SandboxRecord, caller: Caller
    ) -> HttpResponse:
        fields = urllib.parse.parse_qs(request.query, max_num_fields=20)
        try:
            name = fields.get("username", [""])[0]
            if name:
                user = envd.user_named(name)
            else:
                user = envd.user_from_authorization(request.header("authorization"))
            raw_path = fields.get("path", [""])[0]
            if request.method in ("GET", "HEAD"):
                return await self._download(record, caller, user, raw_path)
            if request.method == "POST":
                return await self._upload(request, record, caller, user, raw_path)
            return _envd_http_error(405, f"{request.method[:16]} is not allowed on /files")
        except rpc.RpcError as exc:
            status = {"not_found": 404, "resource_exhausted": 413}.get(exc.code, exc.http_status)
            return _envd_http_error(status, exc.message)
        except ZonedError as exc:
            if exc.code == "not_found":
                return _not_found_502(record.sandbox_id)
            return _envd_http_error(_api_error_of(exc).status, exc.message)

    async def _download(
        self, record: api.SandboxRecord, caller: Caller, user: envd.User, raw_path: str
    ) -> HttpResponse:
        path = envd.zone_path(raw_path, user)
        async with self.client(caller) as client:
            entry = await self._must_stat(client, record.sandbox_id, user, path)
        if entry.file_type == "FILE_TYPE_DIRECTORY":
            raise rpc.RpcError("invalid_argument", f"{path[:200]!r} is a directory")
        if entry.size > self.e2b.max_download_bytes:
            raise rpc.RpcError(
                "resource_exhausted", f"{path!r} is larger than {self.e2b.max_download_bytes} bytes"
            )
        send, receive = trio.open_memory_channel[bytes](DOWNLOAD_CHUNKS)
        assert self._nursery is not None
        self._nursery.start_soon(self._produce_file, record.sandbox_id, caller, user, path, send)
        return HttpResponse(
            status=200, content_type="application/octet-stream", stream=_relay(receive)
        )

    async def _produce_file(
        self,
        zone: str,
        caller: Caller,
        user: envd.User,
        path: str,
        send: trio.MemorySendChannel[bytes],
    ) -> None:
        """A file's bytes into ``send``: what the zone's ``cat`` (as ``user``) gives, bounded.

        A failure after the first byte can only cut the response short (the
        status is sent): the client sees a body shorter than the file.
        """
        sent = 0
        with send:
            try:
                async with (
                    self.client(caller) as client,
                    client.exec_process(
                        zone, ["cat", "--", path], agent_tools=True, user=user.spec
                    ) as process,
                ):
                    async for chunk in process:
                        if chunk.stream != "stdout":
                            continue
                        sent += len(chunk.data)
                        if sent > self.e2b.max_download_bytes:
                            log.info("E2B download of %r from %s: grew past the limit", path, zone)
                            return
                        await send.send(chunk.data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            except ZonedError as exc:
                log.info("E2B download of %r from %s cut short: %s", path, zone, exc.message)

    async def _upload(
        self,
        request: HttpRequest,
        record: api.SandboxRecord,
        caller: Caller,
        user: envd.User,
        raw_path: str,
    ) -> HttpResponse:
        content_type = request.header("content-type") or ""
        body = self._decoded_upload(request)
        if content_type.lower().startswith("multipart/form-data"):
            parts = envd.multipart_parts(content_type, body)
            if not parts:
                raise rpc.RpcError("invalid_argument", "the upload holds no file")
            files = [
                (raw_path if raw_path and len(parts) == 1 else part.filename, part.data)
                for part in parts
            ]
        elif content_type.lower().startswith("application/octet-stream"):
            files = [(raw_path, body)]
        else:
            raise rpc.RpcError(
                "invalid_argument", "upload multipart/form-data or application/octet-stream"
            )
        targets = [(envd.zone_path(name, user), data) for name, data in files]
        written = []
        async with self.client(caller) as client:
            for path, data in targets:
                status, _, err = await self._helper(
                    client,
                    record.sandbox_id,
                    user,
                    ["sh", "-c", _PUT_SCRIPT, "e2b-put", path],
                    data,
                )
                if status != 0:
                    raise rpc.RpcError(
                        "invalid_argument", f"cannot write {path!r}: {_text(err) or status}"
                    )
                written.append(envd.write_info(path))
        return _json(200, msgspec.json.encode(written))

    def _decoded_upload(self, request: HttpRequest) -> bytes:
        encoding = (request.header("content-encoding") or "identity").strip().lower()
        if encoding == "identity":
            return request.body
        if encoding != "gzip":
            raise rpc.RpcError("invalid_argument", f"unsupported Content-Encoding {encoding!r}")
        inflater = zlib.decompressobj(wbits=31)
        try:
            data = inflater.decompress(request.body, self.e2b.max_upload_bytes + 1)
        except zlib.error as exc:
            raise rpc.RpcError("invalid_argument", f"the gzip body is corrupt: {exc}") from None
        if len(data) > self.e2b.max_upload_bytes or inflater.unconsumed_tail:
            raise rpc.RpcError(
                "resource_exhausted",
                f"the upload is larger than {self.e2b.max_upload_bytes} bytes unpacked",
            )
        if not inflater.eof:
            raise rpc.RpcError("invalid_argument", "the gzip body is truncated")
        return data


async def _relay(receive: trio.MemoryReceiveChannel[bytes]) -> AsyncGenerator[bytes, None]:
    with receive:
        async for chunk in receive:
            yield chunk


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace").strip()[:1000]


__all__ = ["E2bEndpoint", "owner_caller", "resolve_keys"]
