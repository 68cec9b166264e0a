"""zonectl: the command-line tool for zoned.

Usage::

    zonectl [--socket PATH] [--json] COMMAND [ARGS]

Commands: ``host``, ``create``, ``list``, ``show``, ``destroy``, ``watch``,
``logs``, ``exec``, ``run``, ``cp``, ``top``, ``audit``, ``quarantine``
(``zonectl COMMAND --help`` for each). ``--socket`` and ``--json`` may also
follow the command. The socket
is ``--socket``, else ``$ZONED_SOCKET``, else ``/run/zoned/zoned.sock``.

Output: aligned tables and ``key: value`` blocks for people; with ``--json``,
one JSON document per line holding the protocol's records with every field
(``list`` and ``destroy``: an array; ``watch``: one event per line; ``exec``
and ``run``: the zone, the pid, every field of the exit, the output).
``logs`` always writes the console's raw bytes.

Exit status (stable; scripts may rely on it):

===  ==========================================================================
  0  success
  1  the daemon reported another error (invalid_request, hypervisor, internal,
     unsupported_version), or its reply made no sense
  2  usage error (bad arguments)
  3  daemon unavailable: no socket, nothing listening, connection lost
  4  not_found
  5  conflict
  6  no_capacity
  7  permission_denied (refused by the daemon, or by the socket's file mode)
130  interrupted (Ctrl-C; during ``exec``/``run``, Ctrl-C twice)
141  stdout closed early (e.g. piped into ``head``)
143  terminated (SIGTERM during ``exec``/``run``)
===  ==========================================================================

``exec`` and ``run`` exit with the command's own status instead: 128+N when
signal N ended it, 124 when ``run --timeout`` killed it, 127/126 when it
could not be started. Errors are printed on one line to stderr as
``zonectl: <code>: <message>``, where ``<code>`` is the daemon's error code,
or ``unavailable``, ``connection_lost`` or ``protocol_error`` for failures
on this side. ``destroy`` with several names destroys them all
(concurrently), reports each failure, and exits with the status of the
first name that failed.

The package, by job:

=============================  ===============================================
:mod:`zoned.cli.exits`         exit statuses, their help text, error lines
:mod:`zoned.cli.format`        pure formatting (no IO, the time passed in)
:mod:`zoned.cli.args`          the parser; bounds and defaults from the protocol
:mod:`zoned.cli.commands`      the command runners
:mod:`zoned.cli.terminal`      raw mode, stdin, window size, signal relay
:mod:`zoned.cli.cp`            ``zonectl cp``
:mod:`zoned.cli.entry`         :func:`main`: every failure to its exit status
=============================  ===============================================
"""

from zoned.cli.entry import main

__all__ = ["main"]
