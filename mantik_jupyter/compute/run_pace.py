"""How often a follower asks a backend for a run's state.

A log follower, ``submit --wait``, ``run.wait()`` and a notebook's live lines all ask
again and again while a job waits or runs. On a cluster each ask is an ``squeue`` or
``sacct`` on the login node, whose sites discourage polling every few seconds for the
hours a job may wait in the queue. So a follower that finds the state unchanged waits
longer each time (x``BACK_OFF``), up to ``QUEUED_STATE_MAX`` seconds while the job is
queued and ``RUNNING_STATE_MAX`` while it runs (its end shows within that); a change of
state brings it back to its first pace, as the next change is then likely soon.

A local run's state and log are files of this machine: its followers keep their pace
(``asks_a_cluster``), so a short run's end shows at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .states import RunState

if TYPE_CHECKING:
    from .run_record import RunInfo

# The local backend's name: ``LocalBackend.capabilities`` takes it from here, so that
# this module, loaded by the ``mantik`` command's quick paths, imports no backend.
LOCAL_BACKEND = "local"

FIRST_STATE_ASK = 2.0
RUNNING_STATE_MAX = 10.0
QUEUED_STATE_MAX = 30.0
BACK_OFF = 1.5

_WAITING = (RunState.QUEUED, RunState.SUBMITTING)


class StatePace:
    """The pace of one follower of one run. ``poll``: the pace it asks for (seconds),
    where it starts, and again after each change; it never asks more often than that,
    nor less often than the caps (unless ``poll`` itself is longer)."""

    def __init__(self, poll: float, state: RunState, *, backs_off: bool = True) -> None:
        self.poll = poll
        self.state = state
        self.every = poll
        self.backs_off = backs_off

    def after(self, state: RunState) -> float:
        """Seconds until the next ask, once an ask found the run ``state``."""
        if state != self.state or not self.backs_off:
            self.state = state
            self.every = self.poll
        else:
            cap = QUEUED_STATE_MAX if state in _WAITING else RUNNING_STATE_MAX
            self.every = min(self.every * BACK_OFF, max(cap, self.poll))
        return self.every

    @property
    def waiting(self) -> bool:
        """Whether the run waits in the queue (it writes no log yet)."""
        return self.state in _WAITING


def asks_a_cluster(run: RunInfo) -> bool:
    """Whether following ``run`` asks another machine (a login node, a UNICORE server)."""
    return run.backend != LOCAL_BACKEND


class SyncPace:
    """The pace of a lab's unattended sync of all active runs (``MantikApp``): every
    ``interval`` seconds, but while every active run waits in the queue and none
    changed, longer each time, up to ``QUEUED_STATE_MAX``. A lab left open overnight
    with a sweep in the queue asked squeue every 10 s all night."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.delay = interval
        self._seen: frozenset[tuple[str, RunState]] | None = None

    def after(self, runs: Sequence[RunInfo]) -> float:
        """Seconds until the next sync, once a sync found the active ``runs``."""
        states = frozenset((r.run_id, r.state) for r in runs)
        changed, self._seen = states != self._seen, states
        if changed or not runs or any(r.state not in _WAITING for r in runs):
            self.delay = self.interval
        else:
            self.delay = min(self.delay * BACK_OFF, max(QUEUED_STATE_MAX, self.interval))
        return self.delay
