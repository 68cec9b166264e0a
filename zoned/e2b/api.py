"""E2B's control-plane REST API: request bodies in, sandbox JSON out (pure).

The SDK's ``Sandbox.create`` posts :class:`NewSandbox` to ``/v2/sandboxes``
(older SDKs to ``/sandboxes``) and reads a ``Sandbox`` (:func:`sandbox_json`);
``get_info`` reads a ``SandboxDetail``, ``list`` a list of ``ListedSandbox``
(:func:`detail_json`). Errors are ``{"code": <status>, "message": ...}``
with that HTTP status (:class:`ApiError`): the SDK raises
``AuthenticationException`` for 401, ``NotFoundException`` (its
``SandboxNotFoundException``) for 404 where it expects a sandbox, and
``SandboxException`` carrying the message for the rest.

A sandbox is a zone the endpoint created: its id is the zone's name; its
template, owner and deadline are a :class:`SandboxRecord` the endpoint keeps
(:mod:`zoned.e2b.service`); its metadata are the zone's labels under
:data:`METADATA_PREFIX`. What a template makes comes from the ``[e2b]``
configuration (:class:`~zoned.config.E2bTemplate`).
"""

from __future__ import annotations

import datetime
import re
import secrets
import urllib.parse
from typing import TYPE_CHECKING, Any, Final

import msgspec

from zoned import protocol as p

if TYPE_CHECKING:
    from zoned.config import E2bConfig

#: The envd version every sandbox reports, and so the SDK features it turns on
#: (docs/e2b.md): command stdin (0.3.0), the template's default user (0.4.0),
#: closing stdin (0.5.2), octet-stream and gzip uploads (0.5.7). File metadata
#: (0.6.2) and the later watch options stay off: the SDK refuses them itself.
ENVD_VERSION: Final = "0.5.7"
#: Zone labels: the endpoint's mark, and each metadata key under its prefix.
SANDBOX_LABEL: Final = "e2b.sandbox"
METADATA_PREFIX: Final = "e2b.meta/"
_METADATA_KEY = re.compile(r"^[A-Za-z0-9._/-]{1,100}\Z")
#: Labels a zone may have beyond the metadata (the mark and the template).
_OWN_LABELS: Final = 2
SANDBOX_ID_PREFIX: Final = "e2b-"
_ID_ALPHABET: Final = "abcdefghijklmnopqrstuvwxyz0123456789"


class ApiError(Exception):
    """A REST call that fails with ``status`` and the message the SDK shows."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message[:2000]

    def body(self) -> bytes:
        return msgspec.json.encode({"code": self.status, "message": self.message})


class NewSandbox(msgspec.Struct, frozen=True, rename="camel"):
    """``NewSandbox``/``NewSandboxV2``: what the SDK sends; unknown fields ignored."""

    template_id: str = msgspec.field(name="templateID")
    timeout: int | None = None
    metadata: dict[str, str] | None = None
    env_vars: dict[str, str] | None = None
    auto_pause: bool | None = None
    allow_internet_access: bool | None = msgspec.field(default=None, name="allow_internet_access")
    network: dict[str, Any] | None = None
    mcp: dict[str, Any] | None = None
    volume_mounts: list[Any] | None = None
    lifecycle: dict[str, Any] | None = None


class TimeoutBody(msgspec.Struct, frozen=True):
    timeout: int


class ConnectBody(msgspec.Struct, frozen=True):
    timeout: int | None = None


class SandboxRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What the endpoint keeps of a sandbox beyond its zone (state_dir/e2b)."""

    sandbox_id: str
    #: The zone's uuid: a zone of the same name made later is not this sandbox.
    zone_uuid: str
    template: str
    owner_uid: int
    key_name: str
    envs: dict[str, str] = {}
    started_at: float
    end_at: float


def is_its_zone(record: SandboxRecord, zone: p.ZoneInfo | None) -> bool:
    """Whether ``zone`` is the sandbox's, still there (not a later zone of its name)."""
    return zone is not None and zone.uuid == record.zone_uuid and zone.state != "stopped"


def decode_body(body: bytes, kind: type[Any]) -> Any:
    try:
        return msgspec.json.decode(body or b"{}", type=kind)
    except msgspec.ValidationError as exc:
        raise ApiError(400, f"invalid request body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"the request body is not JSON: {exc}") from None


def check_new_sandbox(body: NewSandbox, config: E2bConfig) -> None:
    """Refuse what zoned does not do, with the reason, before anything is made."""
    if body.template_id not in config.templates:
        known = ", ".join(sorted(config.templates))
        raise ApiError(
            404, f"template {body.template_id[:128]!r} not found (this host has: {known})"
        )
    if body.auto_pause or (body.lifecycle and body.lifecycle.get("onTimeout") == "pause"):
        raise ApiError(
            400, "pause/resume is not supported by zoned: sandboxes end at their timeout"
        )
    if body.mcp:
        raise ApiError(400, "the MCP gateway is not supported by zoned's E2B endpoint")
    if body.volume_mounts:
        raise ApiError(400, "volumes are not supported by zoned's E2B endpoint")
    timeout = body.timeout
    if timeout is not None and not 1 <= timeout <= config.max_timeout_s:
        raise ApiError(400, f"timeout must be within 1..{config.max_timeout_s} seconds")
    metadata = body.metadata or {}
    if len(metadata) > p.MAX_LABELS - _OWN_LABELS:
        raise ApiError(400, f"at most {p.MAX_LABELS - _OWN_LABELS} metadata entries")
    for key in metadata:
        if not _METADATA_KEY.fullmatch(key):
            raise ApiError(
                400, f"metadata key {key[:100]!r}: 1-100 characters of A-Z a-z 0-9 . _ / -"
            )
    for name in body.env_vars or {}:
        if not name or "=" in name or "\x00" in name:
            raise ApiError(400, f"invalid environment variable name {name[:100]!r}")


def zone_labels(template: str, metadata: dict[str, str] | None) -> dict[str, str]:
    labels = {SANDBOX_LABEL: template.replace(":", "_")}
    labels.update({METADATA_PREFIX + key: value for key, value in (metadata or {}).items()})
    return labels


def metadata_of(zone: p.ZoneInfo) -> dict[str, str]:
    return {
        key.removeprefix(METADATA_PREFIX): value
        for key, value in zone.labels.items()
        if key.startswith(METADATA_PREFIX)
    }


def new_sandbox_id() -> str:
    return SANDBOX_ID_PREFIX + "".join(secrets.choice(_ID_ALPHABET) for _ in range(16))


def _time(unix: float) -> str:
    moment = datetime.datetime.fromtimestamp(unix, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def sandbox_json(record: SandboxRecord, access_token: str) -> bytes:
    """The ``Sandbox`` of a create or connect."""
    return msgspec.json.encode(
        {
            "templateID": record.template,
            "sandboxID": record.sandbox_id,
            "clientID": "zoned",
            "envdVersion": ENVD_VERSION,
            "envdAccessToken": access_token,
            "domain": None,
        }
    )


def detail(record: SandboxRecord, zone: p.ZoneInfo) -> dict[str, Any]:
    """A ``SandboxDetail`` (get_info) and ``ListedSandbox`` (list)."""
    return {
        "templateID": record.template,
        "sandboxID": record.sandbox_id,
        "clientID": "zoned",
        "startedAt": _time(record.started_at),
        "endAt": _time(record.end_at),
        "envdVersion": ENVD_VERSION,
        "cpuCount": zone.vcpus,
        "memoryMB": zone.memory_mib,
        "diskSizeMB": 0,
        "state": "running",
        "metadata": metadata_of(zone),
        **network_info(zone.net),
    }


def network_info(net: list[str] | None) -> dict[str, Any]:
    """``allowInternetAccess`` and ``network`` (E2B's shape) from the zone's own rules."""
    if net is None:
        return {"allowInternetAccess": False}
    rules = [rule for rule in net if rule != "open"]
    if "open" in net:
        return {"allowInternetAccess": True, "network": {"allowOut": rules}}
    return {"allowInternetAccess": True, "network": {"allowOut": rules, "denyOut": ["0.0.0.0/0"]}}


class ListQuery(msgspec.Struct, frozen=True):
    metadata: dict[str, str]
    states: frozenset[str]
    template: str
    limit: int | None
    offset: int


def list_query(query: str) -> ListQuery:
    """``GET /v2/sandboxes``' query: metadata (``k=v&...``, itself URL-encoded),
    state, template, limit and nextToken (an offset here)."""
    fields = urllib.parse.parse_qs(query, keep_blank_values=True, max_num_fields=100)
    metadata: dict[str, str] = {}
    for encoded in fields.get("metadata", []):
        for key, value in urllib.parse.parse_qsl(encoded, keep_blank_values=True):
            metadata[urllib.parse.unquote(key)] = urllib.parse.unquote(value)
    states = frozenset(s for value in fields.get("state", []) for s in value.split(",") if s)
    try:
        limit = int(fields["limit"][0]) if "limit" in fields else None
        offset = int(fields["nextToken"][0]) if fields.get("nextToken", [""])[0] else 0
    except ValueError:
        raise ApiError(400, "limit and nextToken must be numbers") from None
    if (limit is not None and not 1 <= limit <= 10000) or offset < 0:
        raise ApiError(400, "limit must be within 1..10000, nextToken not negative")
    return ListQuery(
        metadata=metadata,
        states=states,
        template=fields.get("template", [""])[0],
        limit=limit,
        offset=offset,
    )


def matches(query: ListQuery, record: SandboxRecord, zone: p.ZoneInfo) -> bool:
    if query.states and "running" not in query.states:
        return False
    if query.template and query.template != record.template:
        return False
    metadata = metadata_of(zone)
    return all(metadata.get(key) == value for key, value in query.metadata.items())
