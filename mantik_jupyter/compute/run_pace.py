"""How often a follower asks a backend for a run's state.

A log follower, ``submit --wait``, ``run.wait()`` and a notebook's live lines all ask
again and again while a job waits or runs. On a cluster each ask is an ``squeue`` or
``sacct`` on the login node, whose sites discourage polling every few seconds for the
hours a job may wait in the queue. So a follower that finds the state unchanged waits
longer each time (x``BACK_OFF``), up to ``QUEUED_STATE_MAX`` seconds while the job is
queued and ``RUNNING_STATE_MAX`` while it runs (its end shows within that); a change of
state brings it back to its first pace, as the next change is then likely soon.
"""

from __future__ import annotations

from .states import RunState

FIRST_STATE_ASK = 2.0
RUNNING_STATE_MAX = 10.0
QUEUED_STATE_MAX = 30.0
BACK_OFF = 1.5

_WAITING = (RunState.QUEUED, RunState.SUBMITTING)


class StatePace:
    """The pace of one follower of one run. ``poll``: the pace it asks for (seconds),
    where it starts, and again after each change; it never asks more often than that,
    nor less often than the caps (unless ``poll`` itself is longer)."""

    def __init__(self, poll: float, state: RunState) -> None:
        self.poll = poll
        self.state = state
        self.every = poll

    def after(self, state: RunState) -> float:
        """Seconds until the next ask, once an ask found the run ``state``."""
        if state != self.state:
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
