"""How often the state machine polls the copy, so that a long one stays within Step Functions' history.

A Standard execution fails when its history reaches 25,000 events, and no Catch sees that failure:
no rollback runs. Each poll of the copy loop adds about 11 events (wait, task, choices). At a fixed
30 s that is the limit after about 19 hours; the wait here grows with the time waited so far
(1/POLL_GROWTH of it, between the file's poll and MAX_POLL_SECONDS), which stretches the same
history over about 12 days. Past HISTORY_BUDGET_SECONDS the loop ends in a rollback the state
machine still controls, instead of a failure it does not (`within_history_budget`).
"""

from __future__ import annotations

import math

POLL_GROWTH = 200  # the next wait is 1/200 of the time waited so far (at least the file's poll)
MAX_POLL_SECONDS = 900
HISTORY_BUDGET_SECONDS = 12 * 24 * 3600  # ~20,000 events of polling at a 30 s poll: room for retries and the rest
HISTORY_LIMIT_EVENTS = 25_000  # https://docs.aws.amazon.com/step-functions/latest/dg/bp-history-limit.html


def next_poll_seconds(waited_seconds: float, base_seconds: int) -> int:
    """The wait before the next poll, after `waited_seconds` of waiting (whole seconds, as a Wait state takes)."""
    grown = math.ceil(max(0.0, waited_seconds) / POLL_GROWTH)
    return int(min(MAX_POLL_SECONDS, max(base_seconds, grown)))


def within_history_budget(waited_seconds: float) -> bool:
    return waited_seconds < HISTORY_BUDGET_SECONDS


def polls_within(seconds: float, base_seconds: int) -> int:
    """How many polls the loop makes in `seconds` (each poll then waits `next_poll_seconds`)."""
    t, polls = 0.0, 0
    while t < seconds:
        polls += 1
        t += max(1, next_poll_seconds(t, base_seconds))
    return polls
