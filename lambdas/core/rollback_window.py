"""The rollback window, watched: when its gate runs next and where the state machine goes after each.

Through the window the back replication (target -> source) keeps the old source whole, so an alarm
still rolls back losing nothing. DDL run on the target alone (the application's next release), a
subscription stopped or a slot lost breaks that: the rollback an alarm then asks for is refused,
and the back replication's slot keeps WAL on the new writer. So the window is not one long wait:
its gate reads the alarms and the back replication (`CutoverRunner.rollback_readiness`) every
check, from right after the cutover to the end.

- an alarm: roll back (the state machine's Choice, before this module's answer);
- the window not over: wait `next_check_seconds` and check again;
- over, and a rollback would run: retire the back replication;
- over, and the back replication's problems have lasted `lasting_seconds`: stop, naming them (the
  writer stays on the target, the back replication stays for a person to mend);
- over, with problems younger than that (a worker restarting): check again soon.

Checks are at least the file's poll apart, and at most MAX_WINDOW_CHECKS fit in a window, so a
window of days stays far inside Step Functions' 25,000 history events (about 8 per check).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

MAX_WINDOW_CHECKS = 400


class WindowNext(StrEnum):
    WAIT = "wait"
    RETIRE = "retire"
    BROKEN = "broken"


@dataclass(frozen=True)
class WindowCheck:
    started: datetime  # when the window's first check ran
    problems_since: datetime | None  # since when the back replication has had problems without a break
    problems_lasting: bool  # for at least `lasting_seconds`: published as RollbackReady 0
    seconds_left: int
    next: WindowNext
    next_check_seconds: int


def check_interval(window_seconds: int, poll_seconds: int) -> int:
    """Seconds between two checks: the file's poll, stretched so a window holds MAX_WINDOW_CHECKS at most."""
    return max(1, poll_seconds, math.ceil(window_seconds / MAX_WINDOW_CHECKS))


def window_check(
    *,
    now: datetime,
    started: datetime | None,
    window_seconds: int,
    poll_seconds: int,
    has_problems: bool,
    problems_since: datetime | None,
    lasting_seconds: float,
) -> WindowCheck:
    """What follows a check at `now` (see the module docstring); `started` and `problems_since` are the
    previous check's (None at the first)."""
    started = started or now
    since = (problems_since or now) if has_problems else None
    lasted = (now - since).total_seconds() if since is not None else 0.0
    lasting = since is not None and lasted >= lasting_seconds
    left = max(0, math.ceil(window_seconds - (now - started).total_seconds()))
    interval = check_interval(window_seconds, poll_seconds)
    if left > 0:
        return WindowCheck(started, since, lasting, left, WindowNext.WAIT, min(interval, left))
    if since is None:
        return WindowCheck(started, None, False, 0, WindowNext.RETIRE, 0)
    if lasting:
        return WindowCheck(started, since, True, 0, WindowNext.BROKEN, 0)
    until_lasting = max(1, math.ceil(lasting_seconds - lasted))
    return WindowCheck(started, since, False, 0, WindowNext.WAIT, min(interval, until_lasting))
