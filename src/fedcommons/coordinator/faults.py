"""Fault injection for crash-recovery tests: stop the coordinator at a named point.

``FEDCOMMONS_FAULT=<point>:<round>[:<action>]`` makes the coordinator process act when
the round loop reaches ``point`` in round ``round`` (once per process):

| point | where |
| --- | --- |
| ``collecting`` | an update of the round has just been folded into the aggregate |
| ``aggregating`` | every reply is in; the server step is about to be computed |
| ``committing`` | checkpoint written, the round's index transaction open, not committed |
| ``committed`` | the index transaction has committed; the ledger line is not written yet |

Actions: ``kill`` (default) sends SIGKILL to this process, so nothing runs after it (no
``finally``, no atexit), as when the machine loses power; ``pause`` stops and waits to
be killed by PID from outside (at most ``FEDCOMMONS_FAULT_PAUSE_S`` seconds, default
300, then it kills itself, so a forgotten process never lingers); ``raise`` raises
:class:`InjectedFault` (a ``BaseException`` no handler of ours catches: open
transactions roll back, nothing after the point runs) for fast in-process tests. Before acting it
writes one line, ``fedcommons-fault point=... round=... pid=...``, to stderr and, when
``FEDCOMMONS_FAULT_MARKER`` names a file, into that file, so a test knows the point was
reached. With a marker file the fault fires once per file, not once per process: a
coordinator started again (by hand or by the scheduler) that finds the point already in
the marker goes past it, so a resumed run is not killed again. Unset (the default),
every hook is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass

from fedcommons.errors import FaultSpecError

ENV = "FEDCOMMONS_FAULT"
ENV_MARKER = "FEDCOMMONS_FAULT_MARKER"
ENV_PAUSE = "FEDCOMMONS_FAULT_PAUSE_S"
POINTS = ("collecting", "aggregating", "committing", "committed")
ACTIONS = ("kill", "pause", "raise")

_fired = False


class InjectedFault(BaseException):
    """Raised at the fault point with action ``raise``."""


@dataclass(frozen=True)
class FaultSpec:
    """Where and how to fail."""

    point: str
    round: int
    action: str = "kill"

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        """Parse ``point:round[:action]``; raise :class:`FaultSpecError` naming the problem."""
        parts = text.strip().split(":")
        if len(parts) not in (2, 3):
            raise FaultSpecError(f"{ENV}={text!r}: expected POINT:ROUND[:ACTION]")
        point, rnd = parts[0], parts[1]
        action = parts[2] if len(parts) == 3 else "kill"
        if point not in POINTS:
            raise FaultSpecError(f"{ENV}={text!r}: point must be one of {', '.join(POINTS)}")
        if not rnd.isdigit() or int(rnd) < 1:
            raise FaultSpecError(f"{ENV}={text!r}: round must be an integer >= 1")
        if action not in ACTIONS:
            raise FaultSpecError(f"{ENV}={text!r}: action must be one of {', '.join(ACTIONS)}")
        return cls(point, int(rnd), action)

    def __str__(self) -> str:
        return f"{self.point}:{self.round}:{self.action}"


def configured() -> FaultSpec | None:
    """The fault this process is told to inject (``None`` when the variable is unset)."""
    text = os.environ.get(ENV, "").strip()
    return FaultSpec.parse(text) if text else None


def check_environment() -> None:
    """Fail before round 1 on a malformed ``FEDCOMMONS_FAULT`` (not mid-run)."""
    configured()


def reset() -> None:
    """Arm the fault again (in-process tests run several coordinators in one process)."""
    global _fired
    _fired = False


def reached(point: str, round_no: int) -> None:
    """The round loop reached ``point`` of ``round_no``: inject the fault if it is this one."""
    global _fired
    if _fired or not os.environ.get(ENV):
        return
    spec = configured()
    if spec is None or spec.point != point or spec.round != round_no:
        return
    _fired = True
    marker = os.environ.get(ENV_MARKER, "").strip()
    where = f"fedcommons-fault point={point} round={round_no} "
    if marker and os.path.exists(marker):
        with open(marker, encoding="utf-8") as fh:
            if any(seen.startswith(where) for seen in fh):
                return  # an earlier process of this run already failed here
    line = f"{where}pid={os.getpid()} action={spec.action}"
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    if marker:
        with open(marker, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    if spec.action == "raise":
        raise InjectedFault(line)
    if spec.action == "pause":
        deadline = time.monotonic() + float(os.environ.get(ENV_PAUSE, "300") or 300)
        while time.monotonic() < deadline:
            time.sleep(0.1)
    os.kill(os.getpid(), signal.SIGKILL)
