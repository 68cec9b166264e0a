"""The options of a process and of a zone, declared once, and the one builder of requests.

Each option is the wire field of the same name (:mod:`zoned.protocol`); an
option left out takes the protocol's default, so defaults live in one place
too. The client's methods take them as keyword arguments
(``**options: Unpack[ExecOptions]``), and so does the sync twin:

=================  ==========================================================
:class:`ExecOptions`     what a process is: ``env``, ``user``, ``workdir``,
                         ``entrypoint``, ``memory_limit_mib``, ``pids_limit``,
                         ``no_new_privs``, ``agent_tools`` (and the older
                         ``cwd``, ``uid``, ``gid``)
:class:`ProcessOptions`  and how it is connected: ``stdin``, ``tty``, ``rows``,
                         ``cols`` (streamed processes only)
:class:`ZoneOptions`     what a new zone is: ``vcpus``, ``memory_mib``,
                         ``profile``, ``placement``, ``labels``, ``machine``,
                         ``image``, ``writable_layer``, ``writable_layer_mib``,
                         ``net``, ``publishes``
:class:`CreateOptions`   and ``kernel_args`` (a zone that lives on)
:class:`RunOptions`      or ``name``, ``timeout_s`` (a zone for one run)
=================  ==========================================================

:func:`wire_request` turns them into the request; nothing else copies them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypedDict, TypeVar

from zoned import protocol as p
from zoned.errors import InvalidRequest
from zoned.net.policy import split_net_option

__all__ = [
    "CreateOptions",
    "ExecOptions",
    "ImportOptions",
    "ProcessOptions",
    "PullOptions",
    "RunExecOptions",
    "RunOptions",
    "RunProcessOptions",
    "ZoneOptions",
    "wire_request",
]


class ExecOptions(TypedDict, total=False):
    """What a process is (``Exec``/``RunZone`` fields).

    The zone's image gives the defaults, as a container runtime does: ``env``
    is merged over the image's ``Env``; ``workdir`` replaces its
    ``WorkingDir``, ``user`` (``user[:group]``, by name or number) its
    ``User``, ``entrypoint`` its ``Entrypoint``. ``cwd``, ``uid`` and ``gid``
    are the older, numeric forms (counted only when not ``/``, 0, 0).
    ``memory_limit_mib`` and ``pids_limit`` bound the process and everything
    it starts (its own cgroup); ``no_new_privs`` keeps it from ever gaining
    privileges (setuid programs run as its own user); ``agent_tools`` runs
    ``argv`` with the agent's own busybox instead of the workload root's
    programs.
    """

    env: Mapping[str, str]
    user: str | None
    workdir: str | None
    entrypoint: Sequence[str] | None
    cwd: str
    uid: int
    gid: int
    memory_limit_mib: int | None
    pids_limit: int | None
    no_new_privs: bool
    agent_tools: bool


class PullOptions(TypedDict, total=False):
    """How an image is pulled (``PullImage`` fields): ``platform`` None is the
    host's; ``tags`` are added to it; credentials are a ``username`` and
    ``password`` or a bearer ``registry_token``; ``tls_verify=False`` only for
    a registry on loopback."""

    platform: str | None
    tags: Sequence[str]
    username: str | None
    password: str | None
    registry_token: str | None
    tls_verify: bool


class ImportOptions(TypedDict, total=False):
    """How an image is imported (``ImportImage`` fields): ``reference`` picks
    one image of a layout or archive holding several."""

    reference: str | None
    platform: str | None
    tags: Sequence[str]


class ProcessOptions(ExecOptions, total=False):
    """A streamed process: ``stdin=True`` takes input; ``tty`` a ``rows`` x ``cols`` terminal."""

    stdin: bool
    tty: bool
    rows: int
    cols: int


class ZoneOptions(TypedDict, total=False):
    """What a new zone is (``CreateZone``/``RunZone`` fields); ``machine`` None: the daemon's.

    ``image`` is an image of the daemon's store (``""``: its default image,
    ``"builtin"``: the small built-in root); ``writable_layer`` where the
    zone's writes go (``"tmpfs"`` in its RAM, ``"disk"`` a scratch disk of
    its own) and ``writable_layer_mib`` how much (None: the kind's default).
    ``net``: its egress allow-list, as rules or as one string the way
    ``zonectl --net`` takes it (``"pypi.org,*.pythonhosted.org:443"``,
    ``"open"``); None or ``"none"``: no network. ``publishes``: its TCP ports
    on the host, ``[ADDRESS:]HOST_PORT:ZONE_PORT`` (a zone that publishes has
    a network, with no egress unless ``net`` says).
    """

    vcpus: int
    memory_mib: int
    profile: str
    placement: p.Placement
    labels: Mapping[str, str]
    machine: p.Machine | None
    image: str
    writable_layer: p.WritableLayer
    writable_layer_mib: int | None
    net: str | Iterable[str] | None
    publishes: Iterable[str]


class CreateOptions(ZoneOptions, total=False):
    """A zone that lives on: extra guest kernel arguments too."""

    kernel_args: Iterable[str]


class RunOptions(ZoneOptions, total=False):
    """A zone for one run: its name (generated when empty) and the run's timeout."""

    name: str
    timeout_s: float | None


class RunProcessOptions(RunOptions, ProcessOptions, total=False):
    """:meth:`~zoned.client.Client.run_process`: a fresh zone and a streamed process."""


class RunExecOptions(RunOptions, ExecOptions, total=False):
    """:meth:`~zoned.client.Client.run`: a fresh zone and a process run to its end."""


# Options a caller may give as any mapping or iterable; the wire wants a
# dict or a list.
_AS_DICT = frozenset({"env", "labels"})
_AS_LIST = frozenset({"kernel_args", "entrypoint", "tags", "publishes"})


def net_rules(net: str | Iterable[str] | None) -> list[str] | None:
    """A ``net`` option as the wire's rules: a string is split as ``--net`` is
    (:func:`~zoned.net.policy.split_net_option`); ``"none"`` alone is None."""
    if net is None:
        return None
    rules = split_net_option(net) if isinstance(net, str) else list(net)
    return None if rules == ["none"] else rules


_M = TypeVar("_M", bound=p.Request)


def wire_request(
    kind: type[_M],
    request_id: int,
    options: Mapping[str, Any],
    *,
    argv: Sequence[str] | None = None,
    **fixed: Any,
) -> _M:
    """The request ``kind`` for ``options`` (a TypedDict above) and the ``fixed`` fields.

    :class:`~zoned.errors.InvalidRequest` for what cannot be a request at
    all (a string for ``argv``, the protocol's own checks); the daemon checks
    the bounds of every value. An empty ``argv`` runs the image's command.
    """
    fields: dict[str, Any] = dict(fixed)
    if argv is not None:
        if isinstance(argv, str):
            raise InvalidRequest("argv must be a list: the program, then its arguments")
        fields["argv"] = list(argv)
    for name, value in options.items():
        if value is not None and name in _AS_DICT:
            value = dict(value)
        elif value is not None and name in _AS_LIST:
            if isinstance(value, str):
                raise InvalidRequest(f"{name} must be a list of strings, not a string")
            value = list(value)
        elif name == "net":
            value = net_rules(value)
        fields[name] = value
    try:
        return kind(id=request_id, **fields)
    except ValueError as exc:  # a __post_init__ check, e.g. kernel_args too long
        raise InvalidRequest(str(exc)) from None
