"""The zone lifecycle state machine (pure).

A zone's state changes only through :func:`transition`, which maps the
current state and one input (a fact the shell observed, or a request) to the
next state and a reason. The shell persists the record when the state
changes, then acts on the new state (start the domain, destroy it, ...).

Rules (``-`` raises ``conflict``; ``=`` is a legal no-op, the state stays)::

                        creating booting     ready       stopping stopped failed   quarantined
  started               booting  -           -           =        -       -        -
  agent_hello           -        ready       =           =        -       -        =
  destroy_requested     stopping stopping    stopping    =        =       stopping stopping
  domain_stopped        failed   failed      failed      stopped  =       =        failed
  domain_crashed        failed   failed      failed      stopped  =       =        failed
  boot_timeout          failed   failed      -           =        -       -        =
  agent_silent          -        -           failed      =        -       -        =
  agent_misbehaved      -        failed      failed      =        -       -        =
  domain_vanished       failed   failed      failed      stopped  =       =        failed
  resumed_after_restart booting  booting     booting     =        -       -        =
  quarantine_requested  -        quarantined quarantined -        -       -        =

Why:

- ``creating`` covers defining and starting the domain (one libvirt call);
  ``started`` (fed once, when that call returns; libvirt's own "started"
  event is not an input) moves on to ``booting``, where the zone waits for
  its agent's hello. A create that fails before ``started`` is undone whole
  (no domain, no record, no placement): that is not a transition, the zone
  never existed.
- A zone stops only because it was asked to (``destroy_requested``). A domain
  that stops, crashes or disappears on its own is ``failed``, with the reason.
  So is a boot that does not reach the agent's hello in time, an agent that
  goes silent once ready, and an agent that breaks the agent protocol
  (``agent_misbehaved``, booting or ready). Entering ``failed`` obliges the
  shell to destroy the domain if it still runs.
- Once a destroy is requested, stopping wins: the domain going away in any
  manner ends in ``stopped``; every other fact is stale (a start call that
  returns late, a timer that fires late) and absorbed.
- ``stopped`` and ``failed`` are terminal: the zone never runs again. Late
  events saying its domain is gone are absorbed; facts saying it runs are a
  conflict (a bug, or a domain that must be destroyed). Destroying a
  ``stopped`` zone is an idempotent no-op; destroying a ``failed`` zone goes
  through ``stopping`` so the shell cleans up what is left of its domain,
  and ends ``stopped``.
- ``quarantine_requested``: an operator froze a zone that runs (booting or
  ready): its vCPUs are paused, it runs no processes, its agent is no longer
  heard (the shell stops supervising it, so silence is not a failure: those
  facts are stale and absorbed), and it stays so, for inspection, until it
  is destroyed (through ``stopping``, as any zone). Its domain stopping on
  its own fails it. Quarantining a quarantined zone is a no-op (the shell
  may collect evidence again); a zone not running (creating, stopping,
  stopped, failed) cannot be quarantined.
- ``resumed_after_restart``: a restarted daemon found the zone's domain
  running and re-adopted it. It waits for the agent's hello again (the
  channel is reconnected), so it is ``booting`` until then; a ``stopping``
  zone stays ``stopping`` and the shell re-issues the destroy. A domain not
  found on restart is ``domain_vanished``; one found shut off is
  ``domain_stopped``. A quarantined zone stays quarantined (still paused).

When a transition leaves the state unchanged, the zone's stored reason
should stay as it was: :attr:`Transition.changed` says which case applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, get_args

from zoned.errors import Conflict
from zoned.protocol import ZoneState

Input = Literal[
    "started",
    "agent_hello",
    "destroy_requested",
    "domain_stopped",
    "domain_crashed",
    "boot_timeout",
    "agent_silent",
    "agent_misbehaved",
    "domain_vanished",
    "resumed_after_restart",
    "quarantine_requested",
]

STATES: Final[tuple[ZoneState, ...]] = get_args(ZoneState)
INPUTS: Final[tuple[Input, ...]] = get_args(Input)

# What each input means, used as the reason when the caller gives none and
# as the prefix of the caller's reason otherwise.
_DEFAULT_REASONS: Final[dict[Input, str]] = {
    "started": "domain started, waiting for the agent",
    "agent_hello": "agent said hello",
    "destroy_requested": "destroy requested",
    "domain_stopped": "domain stopped",
    "domain_crashed": "domain crashed",
    "boot_timeout": "no agent hello within the boot timeout",
    "agent_silent": "agent went silent",
    "agent_misbehaved": "agent broke the protocol",
    "domain_vanished": "domain vanished",
    "resumed_after_restart": "re-adopted after a daemon restart, waiting for the agent",
    "quarantine_requested": "quarantined: vCPUs paused, processes refused",
}

_TABLE: Final[dict[tuple[ZoneState, Input], ZoneState]] = {
    # creating: defining and starting the domain.
    ("creating", "started"): "booting",
    ("creating", "destroy_requested"): "stopping",
    ("creating", "domain_stopped"): "failed",
    ("creating", "domain_crashed"): "failed",
    ("creating", "boot_timeout"): "failed",
    ("creating", "domain_vanished"): "failed",
    ("creating", "resumed_after_restart"): "booting",
    # booting: the domain runs, the agent has not said hello yet.
    ("booting", "agent_hello"): "ready",
    ("booting", "destroy_requested"): "stopping",
    ("booting", "domain_stopped"): "failed",
    ("booting", "domain_crashed"): "failed",
    ("booting", "boot_timeout"): "failed",
    ("booting", "agent_misbehaved"): "failed",
    ("booting", "domain_vanished"): "failed",
    ("booting", "resumed_after_restart"): "booting",
    ("booting", "quarantine_requested"): "quarantined",
    # ready: the agent answers.
    ("ready", "agent_hello"): "ready",
    ("ready", "destroy_requested"): "stopping",
    ("ready", "domain_stopped"): "failed",
    ("ready", "domain_crashed"): "failed",
    ("ready", "agent_silent"): "failed",
    ("ready", "agent_misbehaved"): "failed",
    ("ready", "domain_vanished"): "failed",
    ("ready", "resumed_after_restart"): "booting",
    ("ready", "quarantine_requested"): "quarantined",
    # stopping: only the domain going away matters; everything else is stale,
    # but a quarantine cannot start on a zone on its way out.
    **{("stopping", event): "stopping" for event in INPUTS if event != "quarantine_requested"},
    ("stopping", "domain_stopped"): "stopped",
    ("stopping", "domain_crashed"): "stopped",
    ("stopping", "domain_vanished"): "stopped",
    # stopped: terminal; destroy again is a no-op, late "gone" events too.
    ("stopped", "destroy_requested"): "stopped",
    ("stopped", "domain_stopped"): "stopped",
    ("stopped", "domain_crashed"): "stopped",
    ("stopped", "domain_vanished"): "stopped",
    # failed: terminal; destroy cleans up through stopping.
    ("failed", "destroy_requested"): "stopping",
    ("failed", "domain_stopped"): "failed",
    ("failed", "domain_crashed"): "failed",
    ("failed", "domain_vanished"): "failed",
    # quarantined: paused for inspection; the agent's facts are stale; only a
    # destroy or the domain going away ends it.
    **{("quarantined", event): "quarantined" for event in INPUTS if event != "started"},
    ("quarantined", "destroy_requested"): "stopping",
    ("quarantined", "domain_stopped"): "failed",
    ("quarantined", "domain_crashed"): "failed",
    ("quarantined", "domain_vanished"): "failed",
}


@dataclass(frozen=True)
class Transition:
    """The outcome of one input: the next state, why, and whether it changed."""

    new_state: ZoneState
    reason: str
    changed: bool = True


def transition(state: ZoneState, event: Input, reason: str = "") -> Transition:
    """The zone's next state after ``event`` in ``state``.

    ``reason`` is the shell's detail (an error message, libvirt's stop
    reason); the returned reason is the input's meaning followed by that
    detail. Raises :class:`~zoned.errors.Conflict` naming the state and the
    input when ``event`` cannot happen in ``state`` (see the module table).
    """
    try:
        new_state = _TABLE[(state, event)]
    except KeyError:
        if state not in STATES or event not in INPUTS:
            raise Conflict(f"unknown zone state {state!r} or input {event!r}") from None
        raise Conflict(f"zone in state {state!r} cannot take {event!r}") from None
    meaning = _DEFAULT_REASONS[event]
    return Transition(
        new_state=new_state,
        reason=f"{meaning}: {reason}" if reason else meaning,
        changed=new_state != state,
    )


# ----------------------------------------------------------------- predicates
# What the shell asks of a state. Each names a rule, so that no caller spells
# out a tuple of states of its own.


def is_terminal(state: ZoneState) -> bool:
    """The zone will never run again (``stopped``, ``failed``)."""
    return state in ("stopped", "failed")


def is_settled(state: ZoneState) -> bool:
    """The outcome of a create is known: the zone is past ``creating`` and ``booting``.

    A create request waits until then, and answers with the zone if it is
    ``ready``, with an error otherwise.
    """
    return state not in ("creating", "booting")


def runs_domain(state: ZoneState) -> bool:
    """The zone's domain is up (``booting``, ``ready``, ``quarantined``: paused).

    Only then do its domain's events, its libvirt stats and its pins matter,
    and only then is the record mirrored into the domain's metadata. A
    ``creating`` zone's domain is not started yet; a ``stopping`` one is on
    its way out.
    """
    return state in ("booting", "ready", "quarantined")


def hears_agent(state: ZoneState) -> bool:
    """The zone's agent is supervised (``booting``, ``ready``): its silence or
    misbehaviour fails the zone. A quarantined zone's agent is paused with it."""
    return state in ("booting", "ready")


def is_quarantined(state: ZoneState) -> bool:
    """Frozen for inspection: paused, refusing processes, until destroyed."""
    return state == "quarantined"


def is_ready(state: ZoneState) -> bool:
    """The agent answers: the zone runs processes and reports guest metrics."""
    return state == "ready"


def input_of_reason(reason: str) -> Input | None:
    """The input a reason :func:`transition` made names (its meaning comes first).

    Counting failures by cause reads the cause back from a zone's reason.
    """
    for event, meaning in _DEFAULT_REASONS.items():
        if reason == meaning or reason.startswith(meaning + ": "):
            return event
    return None
