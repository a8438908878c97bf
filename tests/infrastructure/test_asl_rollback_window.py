"""The end of the migration in the real definition: Finalize -> rollback window -> gate -> retire of
the reverse replication -> Migrated, run in moto's ASL interpreter with stub handlers (no servers).

The stubs record each call (function, action or gate phase) so the tests read the path taken.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.infrastructure.asl_stubs import Stubs, execute, settings
from tests.infrastructure.conftest import Synth


class CutoverError(RuntimeError):
    pass


class ReverseReplicationBehind(RuntimeError):
    pass


END = [
    ("Replication", "teardown"),
    ("HealthGate", "rollback window"),
    ("Cutover", "retire_reverse"),
]


def test_after_finalize_the_window_is_checked_from_its_start_to_its_end_then_reverse_replication_is_retired() -> None:
    # Given a stack whose migration file gives a rollback window of 2 s, and no override in the input
    stubs = Stubs()
    # When the migration runs through
    result = execute(stubs, {}, window_seconds=2)
    # Then it ends Migrated: forward replication torn down, the window checked, the retire run
    assert result.status == "SUCCEEDED", (result.error, result.cause)
    end = stubs.path()[stubs.path().index(("Replication", "teardown")) :]
    checks = end[1:-1]
    assert end[0] == ("Replication", "teardown") and end[-1] == ("Cutover", "retire_reverse")
    assert checks == [("HealthGate", "rollback window")] * len(checks) and len(checks) >= 2
    assert ("Cutover", "rollback") not in stubs.path()
    assert result.output is not None and result.output["retire"]["status"] == "done"
    # And the first check opened the window: no state waited between the teardown and it, and it was given no
    # start; the retire ran once the window had lasted the file's seconds from that check. Read from the
    # history and the checks' input, not from how soon after the teardown they ran: a loaded machine delays a
    # transition by a second or more (seen: 1.2 s in CI).
    entered = [e["stateEnteredEventDetails"]["name"] for e in result.history if e["type"].endswith("StateEntered")]
    between = entered[entered.index("Finalize") : entered.index("RollbackWindowGate")]  # Finalize tears down
    assert between and not [name for name in between if "Wait" in name], between
    assert stubs.windows[0]["started"] is None
    assert all(window["started"] is not None for window in stubs.windows[1:])
    gates = [t for f, w, t in stubs.calls if (f, w) == ("HealthGate", "rollback window")]
    assert stubs.at("Cutover", "retire_reverse") - gates[0] >= 1.8


def test_the_input_shortens_the_window_and_a_zero_window_is_accepted() -> None:
    # Given a file's window of an hour, and an execution input asking for none
    stubs = Stubs()
    started = time.monotonic()
    # When it runs
    result = execute(stubs, {"rollback_window_seconds": 0}, window_seconds=3600)
    # Then it did not wait the hour: the input's value replaced the default
    assert result.status == "SUCCEEDED", (result.error, result.cause)
    assert stubs.path()[-3:] == END
    assert time.monotonic() - started < 60


def test_an_alarm_in_the_window_rolls_back_over_the_reverse_replication_instead_of_retiring_it() -> None:
    # Given the composite alarm in ALARM when the window ends
    stubs = Stubs()
    stubs.unhealthy_phase = "rollback window"
    # When the gate reads it
    result = execute(stubs, {"rollback_window_seconds": 0}, window_seconds=3600)
    # Then the rollback runs (the reverse replication is still there) and the retire never does
    assert result.status == "FAILED" and result.error == "RolledBack"
    assert "in the rollback window" in (result.cause or "")
    assert stubs.path()[-2:] == [("HealthGate", "rollback window"), ("Cutover", "rollback")]
    assert ("Cutover", "retire_reverse") not in stubs.path()


GIFT_NOTE = (
    "the schemas no longer match: public.orders.gift_note: missing on the source (target type text). DDL is not "
    "replicated: make the same change on the source as on the target"
)


def test_a_reverse_replication_still_broken_when_the_window_ends_stops_without_retiring_or_rolling_back() -> None:
    # Given a back replication broken by a column added on the target only, and problems that count as
    # lasting after 1 s
    stubs = Stubs()
    stubs.reverse_problems = [[GIFT_NOTE]]
    # When the window (of none) ends
    result = execute(stubs, {"rollback_window_seconds": 0}, window_seconds=3600, data=lasting_after_1s())
    # Then it stops once the problem has lasted, naming it and what to do; the writer stays on the target
    assert result.status == "FAILED" and result.error == "ReverseReplicationBroken", (result.error, result.cause)
    cause = result.cause or ""
    assert "migrated, but the reverse replication is broken" in cause
    assert "public.orders.gift_note: missing on the source" in cause and "retire_reverse" in cause
    assert stubs.path().count(("HealthGate", "rollback window")) >= 2  # a young problem is checked again
    assert ("Cutover", "retire_reverse") not in stubs.path() and ("Cutover", "rollback") not in stubs.path()


def test_a_reverse_replication_mended_within_the_window_is_retired_at_its_end() -> None:
    # Given a back replication broken at the window's first check, mended (the same DDL on the source) by the next
    stubs = Stubs()
    stubs.reverse_problems = [[GIFT_NOTE], []]
    # When the 2 s window runs
    result = execute(stubs, {}, window_seconds=2, data=lasting_after_1s())
    # Then the migration completes: the retire ran once the window was over and the problem gone
    assert result.status == "SUCCEEDED", (result.error, result.cause)
    assert stubs.path()[-1] == ("Cutover", "retire_reverse")
    assert result.output is not None and result.output["gate"]["rollback_ready"] is True


def lasting_after_1s() -> dict[str, Any]:
    """The settings, the back replication's problems counting as lasting after 1 s (lag.problems_max_seconds)."""
    data = settings()
    data["lag"]["problems_max_seconds"] = 1
    return data


def test_a_retire_that_fails_leaves_the_writer_on_the_target_and_names_what_to_do() -> None:
    # Given a retire that fails with a data error (not retried)
    stubs = Stubs()
    stubs.failures[("Cutover", "retire_reverse")] = [
        CutoverError("the back replication's subscription zdm_shop_orders_rev is missing")
    ]
    # When the migration reaches it
    result = execute(stubs, {"rollback_window_seconds": 0}, window_seconds=3600)
    # Then the execution fails as not retired (the migration itself is done), and nothing rolls back
    assert result.status == "FAILED" and result.error == "ReverseReplicationNotRetired"
    assert "migrated, but reverse replication was not retired" in (result.cause or "")
    assert "zdm_shop_orders_rev is missing" in (result.cause or "")
    assert ("Cutover", "rollback") not in stubs.path()
    assert stubs.path().count(("Cutover", "retire_reverse")) == 1


def test_a_source_still_catching_up_is_retried() -> None:
    # Given a retire whose first attempt times out waiting for the source to catch up
    stubs = Stubs()
    stubs.failures[("Cutover", "retire_reverse")] = [
        ReverseReplicationBehind("the source did not apply the target's writes up to 0/3000")
    ]
    # When the migration reaches it / Then the task is retried and the migration completes
    result = execute(stubs, {"rollback_window_seconds": 0}, window_seconds=3600)
    assert result.status == "SUCCEEDED", (result.error, result.cause)
    assert stubs.path().count(("Cutover", "retire_reverse")) == 2


@pytest.mark.parametrize(("path", "hours"), [("migrations/example.yaml", 48), ("migrations/serverless-proxy.yaml", 24)])
def test_the_stack_fills_the_window_from_the_file_in_whole_seconds(
    synth: Callable[..., Synth], path: str, hours: int
) -> None:
    machine = next(iter(synth(path).resources("AWS::StepFunctions::StateMachine").values()))["Properties"]
    assert machine["DefinitionSubstitutions"]["RollbackWindowSeconds"] == str(hours * 3600)


def test_a_fraction_of_an_hour_rounds_up_to_whole_seconds(synth: Callable[..., Synth]) -> None:
    result = synth("migrations/example.yaml", cutover={"rollback_window_hours": 0.0001})
    machine = next(iter(result.resources("AWS::StepFunctions::StateMachine").values()))["Properties"]
    assert machine["DefinitionSubstitutions"]["RollbackWindowSeconds"] == "1"  # 0.36 s -> 1 s
