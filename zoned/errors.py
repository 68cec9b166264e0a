"""One exception family for zoned; each class carries its protocol error code.

The codes are part of the wire protocol (see :mod:`zoned.protocol`). Code that
raises one of these says exactly what went wrong for the caller; anything else
that escapes a request handler is logged with its traceback and reported to the
caller only as ``internal``.

Whose fault it is picks the code:

- the caller's request (a bad value, a name that does not exist, a zone in
  the wrong state, no room): ``invalid_request``, ``not_found``,
  ``conflict``, ``no_capacity``, ``permission_denied``;
- libvirt, QEMU or a zone's agent failing: ``hypervisor``;
- the daemon's own bugs and the host's set-up (the config file, a tool or
  file the host lacks): ``internal``, with :class:`ConfigError` for a
  configuration mistake. A client can do nothing about those but tell the
  operator, so they are never ``invalid_request``.
"""

from __future__ import annotations

from typing import ClassVar, Literal

ErrorCode = Literal[
    "not_found",
    "conflict",
    "invalid_request",
    "no_capacity",
    "permission_denied",
    "hypervisor",
    "unsupported_version",
    "internal",
]


class ZonedError(Exception):
    """Base of every error that zoned reports to a caller with a code."""

    code: ClassVar[ErrorCode] = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(ZonedError):
    code = "not_found"


class Conflict(ZonedError):
    code = "conflict"


class InvalidRequest(ZonedError):
    code = "invalid_request"


class NoCapacity(ZonedError):
    code = "no_capacity"


class PermissionDenied(ZonedError):
    code = "permission_denied"


class HypervisorError(ZonedError):
    code = "hypervisor"


class AgentFault(HypervisorError):
    """A zone's agent channel failed: it closed, or could not be used.

    Raised by the host side of the channel (:mod:`zoned.agentlink`); the zone
    manager fails the zone. A request that meets it fails as ``hypervisor``:
    the zone broke, not the caller.
    """


class AgentProtocolError(AgentFault):
    """The guest agent broke the agent protocol (a bad frame or message, a flood,
    output beyond its credit...)."""


class AgentSilent(AgentFault):
    """The guest agent did not answer in time (no hello, no heartbeat reply)."""


class UnsupportedVersion(ZonedError):
    code = "unsupported_version"


class InternalError(ZonedError):
    code = "internal"


class ConfigError(InternalError):
    """The daemon's configuration is wrong: its file, or what it names on the host."""


class IntegrityError(InternalError):
    """A file every zone boots (kernel, boot image, workload root) is not as recorded."""


ERRORS_BY_CODE: dict[str, type[ZonedError]] = {
    cls.code: cls
    for cls in (
        NotFound,
        Conflict,
        InvalidRequest,
        NoCapacity,
        PermissionDenied,
        HypervisorError,
        UnsupportedVersion,
        InternalError,
    )
}


def error_from_code(code: str, message: str) -> ZonedError:
    """Rebuild the typed exception for a code received over the wire."""
    return ERRORS_BY_CODE.get(code, InternalError)(message)


def innermost(exc: BaseException) -> BaseException:
    """The one exception inside (nested) single-member exception groups.

    Code that runs tasks in a nursery raises its errors wrapped in groups;
    callers and error replies want the typed error itself.
    """
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
