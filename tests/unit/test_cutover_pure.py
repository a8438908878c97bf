"""The cutover's pure parts: step order, what a record means, fence decisions, pgbouncer lines.
No servers."""

from __future__ import annotations

from collections import Counter

import pytest

from lambdas.core.cutover.steps import (
    BACKWARD,
    CUTOVER_STEPS,
    FORWARD,
    POINT_OF_NO_RETURN,
    RETIRE_STEPS,
    ROLLBACK_STEPS,
    Operation,
    Progress,
    RollbackKind,
    Status,
    Step,
    remaining_steps,
    retire_blocker,
    rollback_kind,
    rollback_possible,
)
from lambdas.core.fence import SessionAction, SessionView, decide
from lambdas.core.routers.base import RouterError, Side
from lambdas.core.routers.pgbouncer import (
    PgbouncerBackend,
    database_line_value,
    set_database_entries,
    weighted_hosts,
)

# --- the protocol's order ----------------------------------------------------------------------


def before(steps: tuple[Step, ...], a: Step, b: Step) -> bool:
    return steps.index(a) < steps.index(b)


def test_the_cutover_order_is_what_makes_it_lose_nothing_and_loop_nowhere() -> None:
    s = CUTOVER_STEPS
    # The position is noted under the fence, and the target catches up to it before anything moves
    assert s[0] is Step.FENCE and before(s, Step.FENCE, Step.CATCH_UP)
    # Sequences are copied once the source can hand out no more values, before anyone writes on the target
    assert before(s, Step.CATCH_UP, Step.SYNC_SEQUENCES) and before(s, Step.SYNC_SEQUENCES, Step.UNFENCE_NEW)
    # No loop: forward replication stops before the back replication's slot exists
    assert before(s, Step.STOP_REPLICATION, Step.START_BACK_REPLICATION)
    # Nothing written on the target is missed: back replication starts before any writer can reach it
    assert before(s, Step.START_BACK_REPLICATION, Step.UNFENCE_NEW)
    assert before(s, Step.START_BACK_REPLICATION, Step.SWITCH_WRITER)
    # Clients are let go only when the writer points at the target
    assert before(s, Step.SWITCH_WRITER, Step.RELEASE)
    assert s[-1] is Step.RETIRE_REPLICATION
    assert POINT_OF_NO_RETURN is Step.UNFENCE_NEW


def test_the_rollback_is_the_same_protocol_backwards_without_starting_a_replication() -> None:
    assert tuple(s for s in CUTOVER_STEPS if s is not Step.START_BACK_REPLICATION) == ROLLBACK_STEPS
    assert (FORWARD.old, FORWARD.new, BACKWARD.old, BACKWARD.new) == (
        Side.SOURCE,
        Side.TARGET,
        Side.TARGET,
        Side.SOURCE,
    )
    assert FORWARD.starts_back_replication and not BACKWARD.starts_back_replication
    assert not Counter(CUTOVER_STEPS) - Counter(set(CUTOVER_STEPS))  # each step once


def progress(status: Status, step: Step | None, operation: Operation = Operation.CUTOVER) -> Progress:
    return Progress(operation, status, 1, step, "0/1000")


def test_a_run_resumes_after_the_last_recorded_step_and_restarts_after_an_abort() -> None:
    assert remaining_steps(FORWARD, None) == list(CUTOVER_STEPS)
    assert remaining_steps(FORWARD, progress(Status.RUNNING, None)) == list(CUTOVER_STEPS)
    assert remaining_steps(FORWARD, progress(Status.RUNNING, Step.SYNC_SEQUENCES)) == list(CUTOVER_STEPS[3:])
    assert remaining_steps(FORWARD, progress(Status.ABORTED, Step.CATCH_UP)) == list(CUTOVER_STEPS)
    assert remaining_steps(FORWARD, progress(Status.DONE, Step.RETIRE_REPLICATION)) == []


@pytest.mark.parametrize(
    ("cutover", "rollback", "writer", "expected"),
    [
        (None, None, Side.SOURCE, RollbackKind.BEFORE_CUTOVER),
        (progress(Status.RUNNING, Step.START_BACK_REPLICATION), None, Side.SOURCE, RollbackKind.BEFORE_CUTOVER),
        (progress(Status.ABORTED, Step.CATCH_UP), None, Side.SOURCE, RollbackKind.BEFORE_CUTOVER),
        # past the point of no return the target may have taken writes, wherever the router points
        (progress(Status.RUNNING, Step.UNFENCE_NEW), None, Side.SOURCE, RollbackKind.AFTER_CUTOVER),
        (progress(Status.DONE, Step.RETIRE_REPLICATION), None, Side.TARGET, RollbackKind.AFTER_CUTOVER),
        # the router's writer on the target outweighs a missing record
        (None, None, Side.TARGET, RollbackKind.AFTER_CUTOVER),
        (
            progress(Status.DONE, Step.RETIRE_REPLICATION),
            progress(Status.RUNNING, Step.CATCH_UP, Operation.ROLLBACK),
            Side.TARGET,
            RollbackKind.AFTER_CUTOVER,
        ),
        (
            progress(Status.DONE, Step.RETIRE_REPLICATION),
            progress(Status.DONE, Step.RETIRE_REPLICATION, Operation.ROLLBACK),
            Side.SOURCE,
            RollbackKind.NOTHING,
        ),
    ],
)
def test_which_rollback_fits_the_record_and_the_router(
    cutover: Progress | None, rollback: Progress | None, writer: Side, expected: RollbackKind
) -> None:
    assert rollback_kind(cutover, rollback, writer) is expected


# --- retiring the back replication ------------------------------------------------------------


def test_the_retire_catches_the_source_up_before_it_drops_anything() -> None:
    assert RETIRE_STEPS == (Step.CATCH_UP, Step.RETIRE_REPLICATION)
    # A retire record never counts as a cutover's or rollback's point of no return
    assert not progress(Status.RUNNING, Step.RETIRE_REPLICATION, Operation.RETIRE_REVERSE).past_point_of_no_return
    assert not progress(Status.RUNNING, Step.CATCH_UP, Operation.RETIRE_REVERSE).completed(Step.FENCE)


@pytest.mark.parametrize(
    ("retire", "possible"),
    [
        (None, True),
        # begun, the source not caught up yet (a wait that timed out): the back replication is whole
        (progress(Status.RUNNING, None, Operation.RETIRE_REVERSE), True),
        # caught up and recorded: the drop follows at once, or already happened
        (progress(Status.RUNNING, Step.CATCH_UP, Operation.RETIRE_REVERSE), False),
        (progress(Status.DONE, Step.RETIRE_REPLICATION, Operation.RETIRE_REVERSE), False),
    ],
)
def test_a_rollback_stays_possible_until_the_retire_recorded_the_source_caught_up(
    retire: Progress | None, possible: bool
) -> None:
    assert rollback_possible(retire) is possible


@pytest.mark.parametrize(
    ("cutover", "rollback", "blocker"),
    [
        (progress(Status.DONE, Step.RETIRE_REPLICATION), None, None),
        (progress(Status.DONE, Step.RETIRE_REPLICATION), progress(Status.ABORTED, None, Operation.ROLLBACK), None),
        (None, None, "its cutover is not done (never started)"),
        (progress(Status.RUNNING, Step.SWITCH_WRITER), None, "its cutover is not done (running)"),
        (progress(Status.ABORTED, Step.CATCH_UP), None, "its cutover is not done (aborted)"),
        (
            progress(Status.DONE, Step.RETIRE_REPLICATION),
            progress(Status.RUNNING, Step.CATCH_UP, Operation.ROLLBACK),
            "a rollback after its cutover is under way",
        ),
        (
            progress(Status.DONE, Step.RETIRE_REPLICATION),
            progress(Status.DONE, Step.RETIRE_REPLICATION, Operation.ROLLBACK),
            "it was rolled back after its cutover",
        ),
    ],
)
def test_the_back_replication_is_retired_only_after_a_cutover_that_was_not_rolled_back(
    cutover: Progress | None, rollback: Progress | None, blocker: str | None
) -> None:
    found = retire_blocker(cutover, rollback)
    assert found == blocker if blocker is None else (found is not None and found.startswith(blocker))


# --- fence decisions ---------------------------------------------------------------------------


def session(*, before: bool = True, in_tx: bool = False, xid: bool = False) -> SessionView:
    return SessionView(42, before, in_tx, xid, 0.5 if in_tx else 0.0, "app", "shop-api")


@pytest.mark.parametrize(
    ("view", "router_held", "elapsed", "terminate_long", "expected"),
    [
        # a session opened after the fence is read-only from its first transaction: left alone
        (session(before=False), False, 0.0, True, None),
        (session(before=False, in_tx=True), True, 5.0, True, None),
        # ... unless it holds a write xid (it turned read-only off itself)
        (session(before=False, in_tx=True, xid=True), True, 0.1, True, SessionAction.WAIT),
        (session(before=False, in_tx=True, xid=True), True, 2.0, True, SessionAction.END),
        # idle old sessions: ended once the router holds its clients (or after the grace)
        (session(), False, 0.1, True, SessionAction.WAIT),
        (session(), True, 0.1, True, SessionAction.END),
        (session(), False, 1.0, True, SessionAction.END),
        # old sessions in a transaction: the grace, then ended - or waited for, if ending is off
        (session(in_tx=True), True, 0.5, True, SessionAction.WAIT),
        (session(in_tx=True), True, 1.0, True, SessionAction.END),
        (session(in_tx=True), True, 9.0, False, SessionAction.WAIT),
    ],
)
def test_fence_decisions(
    view: SessionView, router_held: bool, elapsed: float, terminate_long: bool, expected: SessionAction | None
) -> None:
    got = decide(view, router_held=router_held, elapsed=elapsed, grace=1.0, terminate_long=terminate_long)
    assert got is expected


# --- pgbouncer lines ------------------------------------------------------------------------------

INI = """; managed by ops
[databases]
; the shop
app = host=10.0.0.5 port=5432 dbname=shop
app_ro = host=10.0.0.5 port=5432 dbname=shop
"other db" = host=10.0.0.9 dbname=other

[pgbouncer]
app = not-a-database-line
pool_mode = transaction
"""


def test_only_the_named_alias_lines_change_and_everything_else_is_kept() -> None:
    out = set_database_entries(INI, {"app": "host=10.0.0.6 port=5432 dbname=shop"})
    assert out.splitlines() == [
        line if not line.startswith("app = host=10.0.0.5") else "app = host=10.0.0.6 port=5432 dbname=shop"
        for line in INI.splitlines()
    ]
    assert "app = not-a-database-line" in out  # same key in another section: untouched


def test_an_alias_missing_from_the_file_is_an_error_not_an_addition() -> None:
    with pytest.raises(RouterError, match=r"no \[databases\] line for shop"):
        set_database_entries(INI, {"shop": "host=x dbname=y"})


@pytest.mark.parametrize("alias", ["app\nevil = x", "a b", "", "x=y"])
def test_aliases_that_could_break_the_file_are_refused(alias: str) -> None:
    with pytest.raises(RouterError, match="pgbouncer alias"):
        set_database_entries(INI, {alias: "host=x dbname=y"})


def test_values_are_quoted_the_way_pgbouncer_reads_them() -> None:
    assert database_line_value(["10.0.0.5"], 5432, "shop") == "host=10.0.0.5 port=5432 dbname=shop"
    assert database_line_value(["/tmp/a", "/tmp/b"], 5432, "my db") == "host=/tmp/a,/tmp/b port=5432 dbname='my db'"
    assert database_line_value(["h"], 1, "it's") == "host=h port=1 dbname='it''s'"
    with pytest.raises(RouterError, match="line break"):
        database_line_value(["h"], 1, "a\nb")


@pytest.mark.parametrize(
    ("percent", "entries", "on_target", "actual"),
    [(0, 1, 0, 0), (10, 10, 1, 10), (25, 4, 1, 25), (50, 2, 1, 50), (33, 3, 1, 33), (99, 20, 19, 95), (100, 1, 1, 100)],
)
def test_read_weights_become_host_lists(percent: int, entries: int, on_target: int, actual: int) -> None:
    hosts, really = weighted_hosts("src", "tgt", percent)
    assert len(hosts) == entries and hosts.count("tgt") == on_target and really == actual


def test_target_entries_are_spread_through_the_list() -> None:
    hosts, _ = weighted_hosts("s", "t", 40)
    assert hosts == ["s", "s", "t", "s", "t"]


def test_a_backend_with_a_password_is_refused_without_showing_it() -> None:
    with pytest.raises(RouterError) as caught:
        PgbouncerBackend.parse("host=db port=5432 dbname=shop password=hunter2-secret")
    assert "password" in str(caught.value) and "hunter2" not in str(caught.value)
    assert PgbouncerBackend.parse("host=db dbname=shop") == PgbouncerBackend("db", 5432, "shop")
    with pytest.raises(RouterError, match="sslmode"):
        PgbouncerBackend.parse("host=db dbname=shop sslmode=require")
