"""Paths through the real definition that once ended wrongly, run in moto's ASL interpreter with stub
handlers (no servers): a loop that never ended, a failure after the cutover that did not roll back,
and an alarm's rollback that gave up while a cutover still held the lock."""

from __future__ import annotations

import json

from stacks.orchestration import ASL
from tests.infrastructure.asl_stubs import Stubs, execute, settings


class ReplicationSetupError(RuntimeError):
    pass


class OperationBusy(RuntimeError):  # the name is what Step Functions matches (lambdas.core.cutover.OperationBusy)
    pass


def test_the_dms_engine_without_a_byte_lag_leaves_the_copy_loop_on_its_lag_in_seconds() -> None:
    # Given the dms engine's status as DmsEngine.status() reports it: streaming, lag in seconds, no byte lag
    stubs = Stubs()
    stubs.status = {"phase": "streaming", "lag_seconds": 1.0, "lag_bytes": None, "problems": []}
    # When the migration runs
    result = execute(stubs, data=settings(engine={"type": "dms"}), timeout=60)
    # Then it leaves the copy loop (it once polled forever) and migrates
    assert ("ReadShift", "100") in stubs.path()
    assert result.status == "SUCCEEDED", (result.error, result.cause)


def test_a_logical_engine_status_without_a_byte_lag_keeps_waiting() -> None:
    # Given the logical engine reporting no byte lag (it always should: the gate may not pass on nothing)
    stubs = Stubs()
    stubs.status = {"phase": "streaming", "lag_seconds": 0.0, "lag_bytes": None, "problems": []}
    # and a sixth status that fails with an error no retry covers, which ends the run (counted polls, not a
    # clock: on a loaded machine 3 s once saw a single poll)
    stubs.failures[("Replication", "status")] = [None] * 5 + [ReplicationSetupError("stop here")]
    # When the migration runs / Then it kept polling and never moved on to validation or the read shift
    execute(stubs)
    path = stubs.path()
    assert path.count(("Replication", "status")) == 6
    assert not [
        call
        for call in path
        if call[0] in ("HealthGate", "RefreshViews", "ReadShift", "Cutover") and call[1] != "rollback"
    ]


def test_a_failed_finalize_after_the_cutover_rolls_back() -> None:
    # Given a teardown of the forward replication that fails with a data error after the writer moved
    stubs = Stubs()
    stubs.failures[("Replication", "teardown")] = [ReplicationSetupError("could not drop slot zdm_shop_orders")]
    # When the migration runs
    result = execute(stubs)
    # Then the cutover is rolled back (it once ended MigrationFailed with the writer on the target, unwatched)
    assert ("Cutover", "run") in stubs.path()
    assert stubs.path()[-1] == ("Cutover", "rollback")
    assert result.error == "RolledBack", (result.error, result.cause)


def test_an_alarms_rollback_that_meets_a_cutover_holding_the_lock_is_tried_again() -> None:
    # Given the alarm's rollback execution, whose first rollback attempt finds a cutover invocation still
    # holding the migration's lock (the alarm stopped the execution, not that invocation)
    stubs = Stubs()
    stubs.failures[("Cutover", "rollback")] = [OperationBusy("another cutover ... holds the lock; nothing was changed")]
    # When it runs
    result = execute(stubs, {"action": "rollback"})
    # Then the rollback is tried again and the execution ends rolled back (it once ended RollbackFailed)
    assert stubs.path().count(("Cutover", "rollback")) == 2
    assert result.error == "RolledBack", (result.error, result.cause)


class MaterializedViewsMissing(RuntimeError):  # lambdas.core.matviews.MaterializedViewsMissing
    pass


def test_materialized_views_are_refreshed_before_any_read_moves_with_or_without_validation() -> None:
    # Given a migration without validation
    stubs = Stubs()
    # When it runs
    result = execute(stubs)
    # Then the views are refreshed once, before the first read shift
    path = stubs.path()
    assert result.status == "SUCCEEDED", (result.error, result.cause)
    assert path.count(("RefreshViews", "refresh")) == 1
    assert path.index(("RefreshViews", "refresh")) < path.index(("ReadShift", "100"))
    # And a passed validation leads there too (the stubs cannot run the validation's distributed Map)
    passed = json.loads(ASL.read_text())["States"]["ValidationPassed"]
    assert passed["Choices"] == [
        {"Variable": "$.validation_summary.ok", "BooleanEquals": True, "Next": "RefreshMaterializedViews"}
    ]


def test_a_refresh_that_cannot_be_done_rolls_back_before_any_read_moves() -> None:
    # Given a view the target lacks
    stubs = Stubs()
    stubs.failures[("RefreshViews", "refresh")] = [MaterializedViewsMissing("public.daily exist on the source only")]
    # When the migration runs
    result = execute(stubs)
    # Then it rolls back, and no read ever went to the target
    assert ("ReadShift", "100") not in stubs.path()
    assert stubs.path()[-1] == ("Cutover", "rollback")
    assert result.error == "RolledBack", (result.error, result.cause)


def test_a_status_reporting_a_problem_holds_the_copy_loop_until_it_clears() -> None:
    # Given a replication streaming under the lag limit, whose status reports a problem at two polls
    # (a column added on the source only, say), then none
    stubs = Stubs()
    drift = {"problems": ["the schemas no longer match: public.orders.gift_note: missing on the target"]}
    stubs.status_replies = [drift, drift, {}]
    # When the migration runs
    result = execute(stubs, timeout=60)
    # Then nothing moved on (no validation, no read shift) until the problem was gone, and it then migrated
    assert result.status == "SUCCEEDED", (result.error, result.cause)
    path = stubs.path()
    assert path.count(("Replication", "status")) == 3
    assert path.index(("ReadShift", "100")) > max(i for i, call in enumerate(path) if call == ("Replication", "status"))


def test_tables_created_after_the_start_are_added_then_the_copy_loop_waits_for_their_copy() -> None:
    # Given a status naming a table created on the source after the start and since on the target, then the
    # table being copied by its table sync, then everything streaming
    stubs = Stubs()
    stubs.status_replies = [
        {"add_tables": True, "problems": ["public.coupons: created on the source after the start"]},
        {"phase": "copying", "lag_seconds": None, "lag_bytes": None},
        {},
    ]
    # When the migration runs
    result = execute(stubs, timeout=60)
    # Then the loop added the table once, right after the poll that named it, waited for its copy, and migrated
    assert result.status == "SUCCEEDED", (result.error, result.cause)
    path = stubs.path()
    assert path.count(("Replication", "add_tables")) == 1
    first = path.index(("Replication", "status"))
    assert path[first + 1] == ("Replication", "add_tables")
    assert path.count(("Replication", "status")) == 3
    assert result.output is not None and result.output["added_tables"]["added"] == ["public.coupons"]


def test_a_rollback_asked_for_in_the_input_names_its_reason_or_says_it_was_asked_for() -> None:
    # Given executions asking for a rollback: a person's with a reason, and one without
    stubs = Stubs()
    reasoned = execute(stubs, {"action": "rollback", "reason": "checkout errors seen by the on-call engineer"})
    bare = execute(Stubs(), {"action": "rollback"})
    # Then each rolls back at once, the cause naming the reason given, or that the input asked for it
    assert stubs.path() == [("Cutover", "rollback")]
    assert reasoned.error == "RolledBack"
    assert reasoned.cause == "rolled back after RollbackRequested: checkout errors seen by the on-call engineer"
    assert bare.cause == "rolled back after RollbackRequested: a rollback asked for in the execution's input"


def test_a_person_retires_the_reverse_replication_once_mended_by_starting_an_execution() -> None:
    # Given a migration stopped in ReverseReplicationBroken, its reverse replication mended since
    stubs = Stubs()
    # When an execution is started with {"action": "retire_reverse"}
    result = execute(stubs, {"action": "retire_reverse"})
    # Then only the retire runs (no preflight, no replication, no gate), and the migration ends Migrated
    assert stubs.path() == [("Cutover", "retire_reverse")]
    assert result.status == "SUCCEEDED", (result.error, result.cause)
    assert result.output is not None and result.output["retire"]["status"] == "done"


class RollbackError(RuntimeError):  # lambdas.core.cutover.RollbackError
    pass


def test_a_person_abandons_the_migration_rolling_back_what_moved_then_removing_the_replication() -> None:
    # Given a migration rolled back before its cutover (its stopped slot keeps WAL on the source)
    stubs = Stubs()
    # When an execution is started with {"action": "abandon"}
    result = execute(stubs, {"action": "abandon"})
    # Then the rollback's protocol runs first, then the forward replication is removed, then the cutover's
    # records are set aside (a new start gets a cutover of its own), and it ends Abandoned
    assert stubs.path() == [("Cutover", "rollback"), ("Replication", "teardown"), ("Cutover", "close_records")]
    assert result.status == "SUCCEEDED", (result.error, result.cause)
    assert result.output is not None and result.output["teardown"]["removed"] == ["subscription zdm_shop_orders"]
    assert result.output["records"]["notes"] == ["set aside: cutover attempt 1: done"]


def test_abandoning_after_the_retire_is_refused_and_removes_nothing() -> None:
    # Given a migration whose reverse replication was retired: a rollback is refused
    stubs = Stubs()
    stubs.failures[("Cutover", "rollback")] = [RollbackError("the back replication was retired after the window")]
    # When it is abandoned / Then it fails naming why, and nothing is torn down
    result = execute(stubs, {"action": "abandon"})
    assert result.status == "FAILED" and result.error == "AbandonFailed"
    assert "RollbackError" in (result.cause or "") and "retired after the window" in (result.cause or "")
    assert ("Replication", "teardown") not in stubs.path() and ("Cutover", "close_records") not in stubs.path()
