"""The copy loop's poll interval grows with the time waited, and its history budget ends the loop."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from lambdas.core import polling
from lambdas.handlers.replication import ReplicationRequest, poll_for_state, problems_for_state

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def _request(waited: timedelta | None, poll: int = 30) -> ReplicationRequest:
    since = (NOW - waited).isoformat().replace("+00:00", "Z") if waited is not None else None
    return ReplicationRequest.model_validate(
        {"migration": {}, "action": "status", "since": since, "poll_seconds": poll}
    )


def test_the_wait_is_the_files_poll_at_first_then_grows_to_a_ceiling() -> None:
    assert polling.next_poll_seconds(0, 30) == 30
    assert polling.next_poll_seconds(3600, 30) == 30  # an hour in: 3600 / 200 = 18 < 30
    assert polling.next_poll_seconds(10 * 3600, 30) == 180
    assert polling.next_poll_seconds(30 * 86400, 30) == polling.MAX_POLL_SECONDS
    assert polling.next_poll_seconds(0, 0) == 0  # the tests' zero poll stays zero at first


def test_the_handler_says_when_to_poll_and_when_the_budget_is_spent() -> None:
    # Given status requests from the copy loop, at several times after the execution began
    # Then the answer follows the execution's age; past 12 days the loop may not go on
    assert poll_for_state(_request(timedelta(minutes=5)), NOW) == {
        "next_poll_seconds": 30,
        "within_history_budget": True,
    }
    assert poll_for_state(_request(timedelta(hours=10)), NOW)["next_poll_seconds"] == 180
    assert poll_for_state(_request(timedelta(days=13)), NOW) == {
        "next_poll_seconds": 900,
        "within_history_budget": False,
    }
    # And a request from elsewhere (no start time) polls at the file's interval
    assert poll_for_state(_request(None, poll=7), NOW) == {"next_poll_seconds": 7, "within_history_budget": True}


def test_a_fixed_poll_would_reach_the_history_limit_within_a_day_the_growing_one_within_none_of_the_budget() -> None:
    # At ~11 events a poll: 2,880 polls a day at a fixed 30 s; the growing wait makes ~730 in a day
    assert polling.polls_within(86400, 30) < 800
    assert polling.polls_within(polling.HISTORY_BUDGET_SECONDS, 30) * 11 < 21_000


def _problems_since(since: datetime | None) -> ReplicationRequest:
    return ReplicationRequest.model_validate(
        {"migration": {}, "action": "status", "problems_since": since.isoformat() if since else None}
    )


def test_problems_are_carried_from_poll_to_poll_and_last_too_long_past_the_limit() -> None:
    # Given a first poll that finds a problem, Then it starts the clock, not yet too long
    first = problems_for_state(_problems_since(None), ["apply worker not running"], 900, NOW)
    assert first == {"problems_since": NOW.isoformat(), "problems_lasting": False}
    # And a later poll still finding problems keeps the clock; 15 minutes on, they last too long
    later = _problems_since(NOW)
    assert problems_for_state(later, ["x"], 900, NOW + timedelta(minutes=14))["problems_lasting"] is False
    assert problems_for_state(later, ["x"], 900, NOW + timedelta(minutes=15)) == {
        "problems_since": NOW.isoformat(),
        "problems_lasting": True,
    }
    # And a poll without problems stops the clock (a break starts it anew)
    assert problems_for_state(later, [], 900, NOW + timedelta(hours=1)) == {
        "problems_since": None,
        "problems_lasting": False,
    }
