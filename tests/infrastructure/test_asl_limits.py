"""Paths through the real definition where a run in moto and a run on AWS would differ: payload limits
(States.DataLimitExceeded, which no Catch catches), the history limit, error names, function timeouts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from lambdas.core import polling
from rehearsal.stepfunctions import ExecutionResult, LocalStateMachine
from stacks.orchestration import ASL
from tests.infrastructure.asl_stubs import Stubs, execute, settings

BUCKET = "zdm-test-validation"


def _validating_stubs(stubs: Stubs, summary: dict[str, Any], chunks: int = 2) -> dict[str, Any]:
    handlers = stubs.handlers()

    def plan(event: dict[str, Any], context: Any) -> dict[str, Any]:
        stubs.calls.append(("ValidatePlan", "plan", 0.0))
        key = f"validation/{event['run']}/chunks.json"
        boto3.client("s3").put_object(
            Bucket=BUCKET, Key=key, Body=json.dumps([{"n": i} for i in range(chunks)]).encode()
        )
        return {
            "started_at": 0.0,
            "tables": [],
            "chunks": [],
            "items": {"bucket": BUCKET, "key": key, "results_prefix": "r/", "chunks": chunks},
        }

    def chunk(event: dict[str, Any], context: Any) -> dict[str, Any]:
        stubs.calls.append(("ValidateChunk", str(event["chunk"]["n"]), 0.0))
        return {"table": "public.t", "chunk": event["chunk"]["n"], "differences": 0, "unsettled": 0}

    def summarize(event: dict[str, Any], context: Any) -> dict[str, Any]:
        stubs.calls.append(("ValidateSummary", "summary", 0.0))
        return summary

    handlers["ValidatePlanFunctionArn"] = plan
    handlers["ValidateChunkFunctionArn"] = chunk
    handlers["ValidateSummaryFunctionArn"] = summarize
    return handlers


def _run(
    handlers: dict[str, Any],
    data: dict[str, Any],
    timeout: float = 120,
    environment: dict[str, str] | None = None,
    poll_interval: float = 0.05,
) -> ExecutionResult:
    machine = LocalStateMachine(
        ASL,
        handlers,
        values={
            "MigrationName": "shop-orders",
            "SettingsParameterName": "/zdm/shop-orders/settings",
            "RollbackWindowSeconds": "0",
            "ValidationBucketName": BUCKET,
        },
        parameters={"/zdm/shop-orders/settings": json.dumps(data)},
        buckets=[BUCKET],
        environment=environment,
    )
    return machine.run({"timing": {"poll_seconds": 0}}, timeout=timeout, poll_interval=poll_interval)


def _validation_on() -> dict[str, Any]:
    data = settings()
    data["validation"]["enabled"] = True
    return data


def test_a_validation_with_persistent_differences_rolls_back_naming_the_differences() -> None:
    # Given a validation whose summary finds 3 persistent differences (ValidateSummary's real fields)
    stubs = Stubs()
    summary = {"ok": False, "rows_compared": 10, "differences": 3, "problems": 0}
    # When the migration runs
    result = _run(_validating_stubs(stubs, summary), _validation_on())
    # Then it rolls back before any read moves, and the cause names the 3 differences
    assert ("ReadShift", "100") not in stubs.path()
    assert stubs.path()[-1] == ("Cutover", "rollback")
    assert result.error == "RolledBack", (result.error, result.cause)
    assert "validation failed: 3 persistent difference(s), 0 table problem(s)" in (result.cause or ""), result.cause


# -- payload sizes: the real plan, store and summary handler ------------------------------------------


def _real_validation(stubs: Stubs, tables: int, columns: int, key_length: int = 0) -> dict[str, Any]:
    """ValidatePlan returns what the real handler returns for `tables` tables of `columns` columns each
    (the real model, stored by the real S3 store); each chunk stores a real result and returns its
    receipt; ValidateSummary is the real handler."""
    from lambdas.core.validation.model import (
        ChunkResult,
        ChunkSpec,
        ColumnSpec,
        DiffList,
        KeyDiff,
        StoredItems,
        TableSpec,
        ValidationPlan,
    )
    from lambdas.core.validation.store_s3 import S3ValidationStore
    from lambdas.handlers import validate_plan, validate_summary

    handlers = stubs.handlers()

    def store() -> S3ValidationStore:
        return S3ValidationStore(boto3.client("s3"), BUCKET)

    def plan(event: dict[str, Any], context: Any) -> dict[str, Any]:
        stubs.calls.append(("ValidatePlan", "plan", 0.0))
        specs = [
            TableSpec(
                schema_name="public",
                name=f"table_{i:05d}",
                key=["id"],
                key_types=["bigint"],
                columns=[ColumnSpec(name=f"column_{j:02d}", type="character varying(255)") for j in range(columns)],
                estimated_rows=1_000_000,
            )
            for i in range(tables)
        ]
        chunks = [ChunkSpec(table=s, number=0, chunks=1) for s in specs]
        whole = ValidationPlan(started_at=0.0, tables=specs, chunks=chunks)
        stored = store().store_chunks(whole, event["run"])
        # the real handler's last step (before the fix: `return plan.model_dump(mode="json")`)
        for_state = getattr(validate_plan, "for_state", lambda p: p.model_dump(mode="json"))
        return for_state(stored)

    def chunk(event: dict[str, Any], context: Any) -> dict[str, Any]:
        spec = ChunkSpec.model_validate(event["chunk"])
        items = StoredItems.model_validate(event["results"])
        diffs: dict[str, Any] = {}
        if key_length:  # 20 first keys per list (report_first_keys' default), each key_length characters
            keys = DiffList(count=100, first=[KeyDiff(key=[f"{k:04d}" + "k" * key_length]) for k in range(20)])
            diffs = {"missing": keys, "extra": keys}
        result = ChunkResult(
            table=spec.table.label, chunk=spec.number, chunks=spec.chunks, source_rows=1, target_rows=1, **diffs
        )
        store().store_result(items, result)
        return {"table": result.table, "chunk": result.chunk, "differences": result.differences, "unsettled": 0}

    handlers["ValidatePlanFunctionArn"] = plan
    handlers["ValidateChunkFunctionArn"] = chunk
    handlers["ValidateSummaryFunctionArn"] = validate_summary.handler
    return handlers


def _run_real(handlers: dict[str, Any], data: dict[str, Any]) -> ExecutionResult:
    """The real validation handlers: their bucket in the environment, no tracing."""
    environment = {"ZDM_VALIDATION_BUCKET": BUCKET, "POWERTOOLS_TRACE_DISABLED": "true"}
    return _run(handlers, data, timeout=300, environment=environment, poll_interval=0.2)


def test_a_small_schema_validates_and_migrates() -> None:
    # Given 5 tables of 20 columns, equal on both sides
    stubs = Stubs()
    # When the migration runs with validation on / Then it migrates
    result = _run_real(_real_validation(stubs, tables=5, columns=20), _validation_on())
    assert result.status == "SUCCEEDED", (result.error, result.cause)


def test_a_schema_of_200_tables_of_20_columns_validates_and_migrates() -> None:
    # Given 200 tables of 20 columns (a common schema), equal on both sides
    stubs = Stubs()
    # When the migration runs with validation on
    result = _run_real(_real_validation(stubs, tables=200, columns=20), _validation_on())
    # Then it validates and migrates (on AWS the plan's 331 KB result is States.DataLimitExceeded, which no
    # Catch on States.ALL catches: the execution fails there, without a rollback; moto catches it and rolls back)
    failures = [
        e
        for e in result.history
        if e["type"] in ("LambdaFunctionFailed", "TaskFailed") and "DataLimit" in json.dumps(e, default=str)
    ]
    assert not failures, failures[0]
    assert result.status == "SUCCEEDED", (result.error, result.cause)


def test_differences_with_long_keys_in_a_few_tables_roll_back_as_a_failed_validation() -> None:
    # Given 8 tables whose chunks each find 100 missing and 100 extra rows, keys of 1000 characters
    # (text keys of that length are indexable: a btree entry holds up to ~2700 bytes)
    stubs = Stubs()
    # When the migration runs with validation on
    result = _run_real(_real_validation(stubs, tables=8, columns=5, key_length=1000), _validation_on())
    # Then it rolls back as a failed validation. (The summary task's result is ~330 KB: on AWS it is
    # States.DataLimitExceeded, which no Catch on States.ALL catches: the execution fails without a rollback.)
    assert stubs.path()[-1] == ("Cutover", "rollback")
    assert result.error == "RolledBack", (result.error, result.cause)
    assert "validation failed: 1600 persistent difference(s)" in (result.cause or ""), result.cause


# -- the execution history: AWS fails an execution at 25,000 events (not catchable, no rollback) ------


class CopyingFor(Stubs):
    """Replication's status says `copying` for the first `polls` reads, then streaming."""

    def __init__(self, polls: int) -> None:
        super().__init__()
        self.polls = polls

    def handlers(self) -> dict[str, Any]:
        handlers = super().handlers()
        inner = handlers["ReplicationFunctionArn"]

        def replication(event: dict[str, Any], context: Any) -> dict[str, Any]:
            if event["action"] == "status":
                copying = sum(1 for f, w in self.path() if (f, w) == ("Replication", "status")) < self.polls
                self.status = {**self.status, "phase": "copying" if copying else "streaming"}
            result: dict[str, Any] = inner(event, context)
            return result

        handlers["ReplicationFunctionArn"] = replication
        return handlers


def _events_per_poll() -> int:
    short, long = CopyingFor(1), CopyingFor(11)
    a, b = execute(short), execute(long)
    assert a.status == b.status == "SUCCEEDED", (a.error, b.error)
    return (len(b.history) - len(a.history)) // 10


def test_a_copy_polled_until_its_history_budget_ends_stays_within_the_history_limit() -> None:
    # Given the definition's default poll (30 s) and a copy (or a lag above the limit) that never ends
    asl = json.loads(ASL.read_text())
    poll = asl["States"]["Defaults"]["Parameters"]["defaults"]["timing"]["poll_seconds"]
    # When the copy loop polls, its wait growing as the handler says, until the history budget ends it
    polls = polling.polls_within(polling.HISTORY_BUDGET_SECONDS, poll)
    # (events per poll measured in moto's history, which records the event types AWS does)
    per_poll = _events_per_poll()
    # Then the loop's events, with room for the states before and after it and for retries, stay under
    # AWS's hard limit (reaching it fails the execution with no rollback); a fixed 30 s poll would not
    assert per_poll * polls + 2_000 < polling.HISTORY_LIMIT_EVENTS, f"{per_poll} x {polls}"
    assert per_poll * (polling.HISTORY_BUDGET_SECONDS // poll) > polling.HISTORY_LIMIT_EVENTS


def assert_rolled_back_at_the_first_poll(stubs: Stubs, result: ExecutionResult, cause: str) -> None:
    assert stubs.path() == [
        ("Preflight", "check"),
        ("Replication", "start"),
        ("Replication", "status"),
        ("Cutover", "rollback"),
    ]
    assert result.error == "RolledBack"
    assert cause in (result.cause or "")


def test_a_copy_past_its_history_budget_rolls_back_naming_why() -> None:
    # Given a copy loop whose status says the history budget is spent
    stubs = Stubs()
    stubs.status = {
        "phase": "copying",
        "lag_seconds": None,
        "lag_bytes": None,
        "problems": [],
        "within_history_budget": False,
    }
    # When the definition runs
    result = execute(stubs)
    # Then it polled once and rolled back, the cause naming the history limit
    assert_rolled_back_at_the_first_poll(stubs, result, "history limit of 25,000 events")


# -- function timeouts the local run does not enforce ------------------------------------------------


def test_a_read_shift_step_s_longest_wait_fits_the_read_shift_function_or_the_file_is_refused() -> None:
    from lambdas.core.cutover.readshift import READ_SHIFT_LOCK_WAIT_SECONDS
    from stacks.registry import HANDLERS
    from tests.infrastructure.conftest import load

    # Given a route53 router whose changes may take 600 s to reach INSYNC (accepted: the cutover's waits
    # fit the Cutover function's 900 s), and the ReadShift function's timeout from the registry
    read_shift_timeout = next(s.timeout_seconds for s in HANDLERS if s.name == "ReadShift")
    changes = {"router": {"type": "route53", "route53": {"hosted_zone_id": "Z0123", "insync_timeout_seconds": 600}}}
    # When the file is parsed
    try:
        migration = load("migrations/example.yaml", **changes)
    except ValueError:
        return  # refused: fine
    # Then each read-shift step's longest wait (the lock, then INSYNC) ends before Lambda stops the function
    # (Sandbox.Timedout on AWS; locally nothing stops it)
    wait = READ_SHIFT_LOCK_WAIT_SECONDS + migration.router.route53.insync_timeout_seconds
    assert wait < read_shift_timeout, f"a read shift step may wait {wait:g} s; ReadShift runs {read_shift_timeout} s"


# -- ErrorEquals matches the error name exactly: a subclass of a retried exception is another name ------


def test_a_status_read_cut_by_a_database_failover_is_retried() -> None:
    import psycopg2.errors

    # Given the source failing over while the status is read: the server ends the session with 57P01,
    # which psycopg2 raises as AdminShutdown, an OperationalError (the Lambda's errorType is the class name)
    stubs = Stubs()
    failover = psycopg2.errors.AdminShutdown("terminating connection due to administrator command")
    assert isinstance(failover, psycopg2.OperationalError)
    stubs.failures[("Replication", "status")] = [failover]
    # When the migration runs
    result = execute(stubs)
    # Then the read is retried, as an OperationalError is, and the migration goes on (not a rollback)
    assert stubs.path().count(("Replication", "status")) >= 2, stubs.path()
    assert result.status == "SUCCEEDED", (result.error, result.cause)


def states_of(machine: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every state of the definition with its name, in Parallel branches and Map processors too."""
    for name, state in machine["States"].items():
        yield name, state
        for inner in [*state.get("Branches", []), *(state[k] for k in ("ItemProcessor", "Iterator") if k in state)]:
            yield from states_of(inner)


@pytest.mark.parametrize(
    "lost",
    [
        "DatabaseError",  # the connection dropped in the middle of a COPY: psycopg2 raises the bare base class
        "InterfaceError",  # a connection found closed (the server went away since it was last used)
    ],
)
def test_a_task_that_lost_its_connection_mid_copy_or_found_it_closed_is_retried(lost: str) -> None:
    import psycopg2

    from lambdas.core.db import connection_lost

    # Given the target restarting while a task reads: psycopg2 raises a bare DatabaseError or an InterfaceError,
    # whose names are not OperationalError's (Step Functions matches the errorType exactly)
    error = getattr(psycopg2, lost)("server closed the connection unexpectedly")
    assert connection_lost(error)
    stubs = Stubs()
    stubs.failures[("Replication", "status")] = [error]
    # When the migration runs
    result = execute(stubs)
    # Then the read is retried, and the migration goes on (not a rollback)
    assert stubs.path().count(("Replication", "status")) >= 2, stubs.path()
    assert result.status == "SUCCEEDED", (result.error, result.cause)


def test_every_retry_for_a_lost_connection_names_every_error_a_lost_connection_raises() -> None:
    # Given the definition's retriers that retry a lost connection (they name OperationalError)
    retriers = [
        retrier
        for _, state in states_of(json.loads(ASL.read_text()))
        for retrier in state.get("Retry", [])
        if "OperationalError" in retrier["ErrorEquals"]
    ]
    # Then each also names the other classes psycopg2 raises for one, and the failover errors
    assert len(retriers) >= 19
    for retrier in retriers:
        assert {"DatabaseUnreachable", "DatabaseError", "InterfaceError", "AdminShutdown", "CrashShutdown"} <= set(
            retrier["ErrorEquals"]
        )


def test_every_retry_of_a_lost_connection_outlasts_a_server_restart_whatever_the_draw() -> None:
    # Given each task's retrier for a lost connection (the Cutover's inside the fence holds the application's
    # writes, and its retry resumes the attempt; any task's retries spent in a restart's first seconds end in a
    # rollback or a failed execution)
    retriers = [
        (name, retrier)
        for name, state in states_of(json.loads(ASL.read_text()))
        for retrier in state.get("Retry", [])
        if "DatabaseUnreachable" in retrier["ErrorEquals"]
    ]
    assert len(retriers) >= 19
    for name, retrier in retriers:
        # Then its waits are fixed (no jitter, whose draws may all be near 0) and its last retry comes 20 s or
        # more after the failure: a restarted server (3 s in the rehearsal, tens of seconds on RDS) is back by then
        assert retrier.get("JitterStrategy", "NONE") == "NONE", name
        waits = [retrier["IntervalSeconds"] * retrier["BackoffRate"] ** n for n in range(retrier["MaxAttempts"])]
        assert waits[0] >= 3 and sum(waits) >= 20, (name, waits)


def test_the_status_of_a_3000_table_migration_passes_through_the_copy_loop() -> None:
    from lambdas.core.engines.base import Phase, ReplicationStatus, SlotHealth, TableStatus, TableSyncState
    from lambdas.handlers import replication

    # Given a schema of 3000 tables (a schema per tenant, say), all ready, and the status task returning what
    # the real handler returns for it (before the fix: ReplicationStatus.to_json(), one entry per table, 330 KB)
    status = ReplicationStatus(
        engine="logical",
        phase=Phase.STREAMING,
        tables=[
            TableStatus(f"tenant_{i // 10:04d}.table_{i % 10:02d}", TableSyncState.READY, rows_copied=123456)
            for i in range(3000)
        ],
        lag_bytes=0,
        lag_seconds=0.0,
        source_lsn="0/3000000",
        applied_lsn="0/3000000",
        slot=SlotHealth("zdm_shop_orders", exists=True, active=True, wal_status="reserved"),
    )
    returned = getattr(replication, "status_for_state", ReplicationStatus.to_json)(status)
    stubs = Stubs()
    stubs.status = json.loads(json.dumps(returned, default=str))
    # When the migration runs / Then it migrates (on AWS a status result over 256 KiB is States.DataLimitExceeded,
    # which no Catch on States.ALL catches: the execution fails in the copy loop without a rollback; moto rolls back)
    result = execute(stubs)
    assert result.status == "SUCCEEDED", (result.error, result.cause)


def test_the_status_task_returns_what_the_3000_table_test_feeds_the_definition() -> None:
    # The status result the real handler returns for the 3000-table status stays far below 256 KiB
    from lambdas.core.engines.base import Phase, ReplicationStatus, TableStatus, TableSyncState
    from lambdas.handlers import replication

    status = ReplicationStatus(
        engine="logical",
        phase=Phase.COPYING,
        tables=[TableStatus(f"t.table_{i:05d}", TableSyncState.COPYING) for i in range(3000)],
    )
    out = getattr(replication, "status_for_state", ReplicationStatus.to_json)(status)
    assert len(json.dumps(out, default=str)) < 64 * 1024


def test_a_migration_of_12000_tables_starts_and_migrates() -> None:
    from dataclasses import asdict

    from lambdas.core.engines.base import StartResult
    from lambdas.handlers import replication

    # Given 12,000 selected tables: the start task returns what the real handler returns for them
    # (before the fix: asdict(StartResult), every table's name, ~300 KB)
    names = [f"tenant_{i // 12:04d}.table_{i % 12:02d}" for i in range(12000)]
    started = StartResult("logical", already_running=False, tables=names, rows_copied=10**9)
    returned = getattr(replication, "start_for_state", asdict)(started)
    stubs = Stubs()
    handlers = stubs.handlers()
    inner = handlers["ReplicationFunctionArn"]

    def replication_stub(event: dict[str, Any], context: Any) -> Any:
        out = inner(event, context)
        return returned if event["action"] == "start" else out

    handlers["ReplicationFunctionArn"] = replication_stub
    stubs.handlers = lambda: handlers  # type: ignore[method-assign]
    # When the migration runs / Then it migrates (over 256 KiB: States.DataLimitExceeded; on AWS no Catch
    # catches it and the execution fails right after the replication started, without a rollback)
    result = execute(stubs)
    assert result.status == "SUCCEEDED", (result.error, result.cause)


def test_a_logical_engine_chunk_s_re_checks_fit_the_chunk_function(monkeypatch: Any) -> None:
    from lambdas.core.config import Validation
    from lambdas.core.validation import planner
    from stacks.registry import HANDLERS

    # Given the logical engine's subscription enabled on the target, and a file asking for 20 re-checks of
    # up to 60 s each (accepted: recheck_attempts may be up to 100; its description says it is capped to fit)
    monkeypatch.setattr(planner, "fetch_one", lambda *args, **kwargs: (True,))
    settings = Validation(recheck_attempts=20, recheck_timeout_seconds=60)
    chunk_timeout = next(s.timeout_seconds for s in HANDLERS if s.name == "ValidateChunk")
    # When the plan gives its chunks the re-check settings (validate_plan calls replication_of for logical)
    from lambdas.handlers import validate_plan

    cap = getattr(validate_plan, "within_chunk_budget", lambda r: r)  # what the handler applies (after the fix)
    replication = cap(planner.replication_of(object(), "zdm_shop_orders", slot="zdm_shop_orders", settings=settings))  # type: ignore[arg-type]
    # Then a chunk's waits and a minute to compare fit the ValidateChunk function (as engine_replication
    # ensures for debezium and dms); else Lambda stops it (Sandbox.Timedout), the Distributed Map fails and
    # the migration rolls back; locally nothing stops it
    assert replication is not None
    assert replication.attempts * replication.timeout_seconds + 60 <= chunk_timeout, replication


def test_replication_problems_that_last_past_the_limit_roll_back_naming_them() -> None:
    # Given a copy whose status keeps reporting a problem, and problems allowed to last 0 s
    stubs = Stubs()
    stubs.status = {
        "phase": "copying",
        "lag_seconds": None,
        "lag_bytes": None,
        "problems": ["public.daily_stats no longer in publication zdm_shop_orders"],
    }
    data = settings()
    data["lag"]["problems_max_seconds"] = 0
    # When the definition runs
    result = execute(stubs, data=data)
    # Then the copy loop rolls back at its first poll, the cause naming the problem
    # (before, it polled on for the loop's whole history budget: 12 days)
    assert_rolled_back_at_the_first_poll(stubs, result, "no longer in publication")


def test_a_problem_that_clears_before_the_limit_does_not_stop_the_migration() -> None:
    # Given a copy whose first status reports a problem and the next ones none, within the default limit
    stubs = Stubs()
    problem = {"phase": "copying", "lag_seconds": None, "lag_bytes": None, "problems": ["apply worker not running"]}
    healthy = dict(stubs.status)
    replies = iter([problem, healthy])
    original = stubs.handlers

    def handlers() -> dict[str, Any]:
        functions = original()
        replication = functions["ReplicationFunctionArn"]

        def replication_then_healthy(event: dict[str, Any], context: Any) -> Any:
            if event["action"] == "status":
                stubs.status = next(replies, healthy)
            return replication(event, context)

        functions["ReplicationFunctionArn"] = replication_then_healthy
        return functions

    stubs.handlers = handlers  # type: ignore[method-assign]
    # When the definition runs, Then it migrates, having polled twice
    result = execute(stubs)
    assert result.status == "SUCCEEDED", (result.error, result.cause)
    assert stubs.path().count(("Replication", "status")) == 2
