"""How an image runs: its config and the process it gives, as a container runtime does (pure).

The rules, Docker's and runc's:

- The command is ``Entrypoint + Cmd``. Arguments given at run time replace
  ``Cmd`` (not ``Entrypoint``); an empty override keeps the image's ``Cmd``.
  Overriding the entrypoint also drops the image's ``Cmd`` (``docker run
  --entrypoint``). Nothing left at all is an error: the image has no command.
- ``Env`` is the image's list with the request's variables merged over it by
  name (a request variable replaces the image's in place; new ones follow in
  order). ``PATH`` gets Docker's default when neither sets it, ``HOME`` the
  user's home directory from the image's ``/etc/passwd`` (else ``/``).
- ``WorkingDir`` defaults to ``/``; a relative one is taken from ``/``.
- ``User`` is ``name``, ``uid``, ``name:group``, ``uid:gid`` (any mix),
  resolved against the image's own ``/etc/passwd`` and ``/etc/group`` the
  way runc does: a user given by name must exist; a numeric one need not
  (then gid 0, home ``/``); a group given by name must exist, a numeric one
  need not. Supplementary groups (the groups listing the user by name) are
  used only when no group is given. An empty ``User`` is root.

:class:`Accounts` is what the store kept of the image's ``/etc/passwd`` and
``/etc/group`` at conversion, so nothing reads the EROFS image later.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Final

import msgspec

from zoned.images.errors import InvalidImage
from zoned.images.oci import ContainerConfig

DEFAULT_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_ID: Final = 2**31 - 1
#: Bounds on what is kept of an image's account files.
MAX_ACCOUNT_FILE_BYTES: Final = 4 * 1024 * 1024
MAX_ACCOUNTS: Final = 65536


class ImageConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The run settings of an image, from its OCI config."""

    entrypoint: list[str] = msgspec.field(default_factory=list)
    cmd: list[str] = msgspec.field(default_factory=list)
    env: list[str] = msgspec.field(default_factory=list)
    working_dir: str = ""
    user: str = ""
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    stop_signal: str = ""

    @classmethod
    def from_container_config(cls, config: ContainerConfig | None) -> ImageConfig:
        if config is None:
            return cls()
        return cls(
            entrypoint=list(config.Entrypoint or ()),
            cmd=list(config.Cmd or ()),
            env=list(config.Env or ()),
            working_dir=config.WorkingDir or "",
            user=config.User or "",
            labels=dict(config.Labels or {}),
            stop_signal=config.StopSignal or "",
        )


class PasswdEntry(msgspec.Struct, frozen=True, array_like=True):
    name: str
    uid: int
    gid: int
    home: str


class GroupEntry(msgspec.Struct, frozen=True, array_like=True):
    name: str
    gid: int
    members: list[str]


class Accounts(msgspec.Struct, frozen=True, kw_only=True):
    """The users and groups of an image (empty when it has no account files)."""

    users: list[PasswdEntry] = msgspec.field(default_factory=list)
    groups: list[GroupEntry] = msgspec.field(default_factory=list)


class ResolvedUser(msgspec.Struct, frozen=True, kw_only=True):
    uid: int
    gid: int
    additional_gids: list[int]
    home: str
    name: str | None = None


class ProcessSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What to start in the zone: argv (``argv[0]`` looked up on ``PATH`` from
    ``env``, as ``execvpe`` does), environment, working directory, identity."""

    argv: list[str]
    env: list[str]
    cwd: str
    uid: int
    gid: int
    additional_gids: list[int]


def _parse_id(text: str) -> int | None:
    if not text.isdigit() or not text.isascii():
        return None
    value = int(text)
    return value if value <= MAX_ID else None


def _account_lines(text: str, fields: int) -> Iterator[list[str]]:
    """The fields of each line that has at least ``fields`` of them and a name,
    skipping comments and NIS markers (as libc does), at most MAX_ACCOUNTS."""
    count = 0
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) < fields or not parts[0] or line.startswith(("#", "+", "-")):
            continue
        yield parts
        count += 1
        if count >= MAX_ACCOUNTS:
            return


def parse_passwd(text: str) -> list[PasswdEntry]:
    """Entries of an ``/etc/passwd``; malformed lines are skipped."""
    entries = []
    for name, _, uid_text, gid_text, _, home, *_ in _account_lines(text, 7):
        uid, gid = _parse_id(uid_text), _parse_id(gid_text)
        if uid is not None and gid is not None:
            entries.append(PasswdEntry(name, uid, gid, home or "/"))
    return entries


def parse_group(text: str) -> list[GroupEntry]:
    """Entries of an ``/etc/group``; malformed lines are skipped."""
    entries = []
    for name, _, gid_text, members, *_ in _account_lines(text, 4):
        gid = _parse_id(gid_text)
        if gid is not None:
            entries.append(GroupEntry(name, gid, [m for m in members.split(",") if m]))
    return entries


def resolve_user(image: str, spec: str, accounts: Accounts) -> ResolvedUser:
    """``spec`` (``user[:group]``) as ids, by runc's rules (see the module docstring)."""
    if not spec:
        spec = "0"
    user_part, has_group, group_part = spec.partition(":")
    if not user_part or (has_group and not group_part):
        raise InvalidImage(image, f"user {spec!r} is not user[:group]")
    user_number = _parse_id(user_part)
    match = next(
        (u for u in accounts.users if u.name == user_part or u.uid == user_number),
        None,
    )
    if match is not None:
        uid, gid, home, name = match.uid, match.gid, match.home, match.name
    elif user_number is not None:
        uid, gid, home, name = user_number, 0, "/", None
    else:
        raise InvalidImage(image, f"user {user_part!r} is not in the image's /etc/passwd")
    additional: list[int] = []
    if has_group:
        group_number = _parse_id(group_part)
        group = next(
            (g for g in accounts.groups if g.name == group_part or g.gid == group_number),
            None,
        )
        if group is not None:
            gid = group.gid
        elif group_number is not None:
            gid = group_number
        else:
            raise InvalidImage(image, f"group {group_part!r} is not in the image's /etc/group")
    elif name is not None:
        additional = sorted({g.gid for g in accounts.groups if name in g.members} - {gid})
    return ResolvedUser(uid=uid, gid=gid, additional_gids=additional, home=home, name=name)


def _env_name(entry: str) -> str:
    return entry.partition("=")[0]


def merge_env(base: Iterable[str], overrides: Iterable[str]) -> list[str]:
    """``base`` with ``overrides`` merged over it by variable name, order kept."""
    merged: dict[str, str] = {}
    for entry in (*base, *overrides):
        merged[_env_name(entry)] = entry  # a replaced name keeps its first position
    return list(merged.values())


def _check_env(image: str, env: Sequence[str]) -> None:
    for entry in env:
        if "=" not in entry or not _env_name(entry) or "\0" in entry:
            raise InvalidImage(image, f"environment entry {entry[:80]!r} is not NAME=value")


def process_for(
    image: str,
    config: ImageConfig,
    accounts: Accounts,
    *,
    args: Sequence[str] = (),
    entrypoint: Sequence[str] | None = None,
    env: Sequence[str] = (),
    working_dir: str | None = None,
    user: str | None = None,
) -> ProcessSpec:
    """The process a container runtime starts for ``image``.

    ``args`` replace the image's ``Cmd`` (``zonectl run IMAGE -- ARGS``);
    ``entrypoint`` replaces its ``Entrypoint`` and drops its ``Cmd``; ``env``
    is merged over the image's; ``working_dir`` and ``user`` replace the
    image's when given.
    """
    _check_env(image, env)
    base_entrypoint = list(config.entrypoint) if entrypoint is None else list(entrypoint)
    image_cmd = list(config.cmd) if entrypoint is None else []
    argv = base_entrypoint + (list(args) if args else image_cmd)
    if not argv or not argv[0]:
        raise InvalidImage(image, "no command: the image has neither Entrypoint nor Cmd")
    if any("\0" in arg for arg in argv):
        raise InvalidImage(image, "a command argument holds a NUL byte")
    identity = resolve_user(image, config.user if user is None else user, accounts)
    image_env = [e for e in config.env if "=" in e and _env_name(e)]
    merged = merge_env(image_env, env)
    names = {_env_name(e) for e in merged}
    defaults = []
    if "PATH" not in names:
        defaults.append(f"PATH={DEFAULT_PATH}")
    if "HOME" not in names:
        defaults.append(f"HOME={identity.home}")
    cwd = config.working_dir if working_dir is None else working_dir
    cwd = "/" + cwd.lstrip("/") if cwd else "/"
    return ProcessSpec(
        argv=argv,
        env=defaults + merged,
        cwd=cwd,
        uid=identity.uid,
        gid=identity.gid,
        additional_gids=identity.additional_gids,
    )


def request_process(
    image: str,
    config: ImageConfig,
    accounts: Accounts,
    *,
    argv: Sequence[str],
    entrypoint: Sequence[str] | None,
    env: Mapping[str, str],
    working_dir: str | None,
    user: str | None,
    whole_command: bool,
) -> ProcessSpec:
    """The process an exec or run request starts in a zone of ``image``.

    A run (``docker run IMAGE ARGS``): ``argv`` replaces the image's ``Cmd``.
    An exec with a command (``whole_command``, ``docker exec``): ``argv`` is
    the whole command line, after ``entrypoint`` when one is given. Either
    with no ``argv`` runs the image's ``Entrypoint`` + ``Cmd``.
    """
    if whole_command and argv and entrypoint is None:
        entrypoint = ()
    return process_for(
        image,
        config,
        accounts,
        args=argv,
        entrypoint=entrypoint,
        env=[f"{name}={value}" for name, value in env.items()],
        working_dir=working_dir,
        user=user,
    )
