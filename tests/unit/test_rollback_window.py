"""The rollback window's checks: when the next runs, and when the window retires or stops (no servers)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from lambdas.core.polling import HISTORY_LIMIT_EVENTS
from lambdas.core.rollback_window import MAX_WINDOW_CHECKS, WindowCheck, WindowNext, check_interval, window_check

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
HOUR = 3600


def check(
    at: float,
    *,
    window: int = HOUR,
    poll: int = 30,
    problems: bool = False,
    since: float | None = None,
    lasting: float = 900,
) -> WindowCheck:
    """A check `at` seconds after the window opened (T0), with problems since `since` seconds after it."""
    return window_check(
        now=T0 + timedelta(seconds=at),
        started=T0 if at > 0 else None,
        window_seconds=window,
        poll_seconds=poll,
        has_problems=problems,
        problems_since=None if since is None else T0 + timedelta(seconds=since),
        lasting_seconds=lasting,
    )


def test_the_first_check_opens_the_window_and_the_next_comes_after_the_file_s_poll() -> None:
    first = check(0)
    assert (first.started, first.next, first.next_check_seconds, first.seconds_left) == (T0, WindowNext.WAIT, 30, HOUR)
    assert first.problems_since is None and not first.problems_lasting


def test_the_last_wait_ends_at_the_window_s_end_and_a_healthy_end_retires() -> None:
    assert check(HOUR - 10).next_check_seconds == 10
    end = check(HOUR)
    assert (end.next, end.next_check_seconds, end.seconds_left) == (WindowNext.RETIRE, 0, 0)


def test_problems_are_dated_from_the_first_check_that_saw_them_and_count_as_lasting_after_the_limit() -> None:
    # Given a problem first seen at 100 s
    seen = check(100, problems=True)
    assert seen.problems_since == T0 + timedelta(seconds=100) and not seen.problems_lasting
    # When it is still there 900 s later / Then it lasts (RollbackReady 0), while the window goes on
    later = check(1000, problems=True, since=100)
    assert later.problems_lasting and later.next is WindowNext.WAIT
    # When it is gone / Then its date is forgotten
    assert check(1030, since=100).problems_since is None


def test_a_window_ending_with_young_problems_checks_again_until_they_last_then_stops() -> None:
    # Given problems first seen 10 s before the end, with a limit of 60 s
    young = check(HOUR, problems=True, since=HOUR - 10, lasting=60)
    # Then neither retire nor stop: check again when they would have lasted (or after the poll)
    assert (young.next, young.next_check_seconds) == (WindowNext.WAIT, 30)
    assert check(HOUR + 40, problems=True, since=HOUR - 10, lasting=60).next_check_seconds == 10
    # When they have lasted / Then the window stops as broken
    assert check(HOUR + 50, problems=True, since=HOUR - 10, lasting=60).next is WindowNext.BROKEN
    # When they cleared instead / Then the back replication is retired
    assert check(HOUR + 50, lasting=60).next is WindowNext.RETIRE


def test_a_zero_window_retires_at_its_first_check_when_nothing_is_wrong() -> None:
    assert check(0, window=0).next is WindowNext.RETIRE


def test_a_window_of_days_keeps_its_checks_far_inside_the_execution_s_history() -> None:
    # Given a window of 30 days and a poll of 30 s
    window = 30 * 24 * HOUR
    # When every check waits as told until the window is over
    at, checks = 0, 0
    while True:
        checks += 1
        step = check(at, window=window)
        if step.next is not WindowNext.WAIT:
            break
        at += step.next_check_seconds
    # Then at most MAX_WINDOW_CHECKS (+1 at the end) ran, about 8 history events each
    assert check_interval(window, 30) == 6480
    assert checks <= MAX_WINDOW_CHECKS + 1
    assert checks * 8 < HISTORY_LIMIT_EVENTS // 5
