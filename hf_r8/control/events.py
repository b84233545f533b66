"""What the controller, rollback, the range test and the sampler decide, as events, and where they are kept.

Each decision is an `Event` (the value before and after, and why); every adapter keeps them in one bounded
`event_log`, logs them and writes them to its run files.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass
class Event:
    """One decision, with the value before and after and why."""

    step: int
    group: int
    rule: str
    action: str
    old_value: float
    new_value: float
    reason: str
    quantity: str = "lr_gain"


MAX_EVENTS_KEPT = 10_000


def event_log(events: Iterable[Event] = ()) -> deque[Event]:
    """The event store of every adapter: the last `MAX_EVENTS_KEPT` events, oldest first (a run of weeks
    would otherwise keep every decision it ever made in memory)."""
    return deque(events, maxlen=MAX_EVENTS_KEPT)
