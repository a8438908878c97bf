"""The rehearsal's faults: what each injects, and the wrappers and helpers that inject them.

`Rehearsal` (rehearsal/run.py) decides when; these do it: a handler wrapped to act at a step
(the cutover's fence, the replication's start), the alarm rule delivered as EventBridge would,
the failed transactions a crash explains.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import boto3
from psycopg2 import sql

from lambdas.core.config import Migration
from lambdas.core.db import connect, execute
from rehearsal.stepfunctions import REGION, LambdaContext, LocalStateMachine
from rehearsal.timeline import Timeline
from rehearsal.workload import WorkloadStats

# Fault new-table: the table the application's release creates on both sides right after the start
NEW_TABLE = "coupons"


FAULTS = (
    "gate",
    "kill-target",
    "cutover",
    "ddl",
    "reverse-ddl",
    "new-table",
    "retry",
    "alarm-rule",
    "alarm-rule-reads",
    "source-crash",
    "target-crash",
    "source-crash-after",
    "source-crash-fence",
    "target-crash-fence",
    "target-crash-copy",
    "source-outage-fence",
    "target-outage-after",
    "source-crash-rollback",
    "target-crash-rollback",
    "source-crash-validate",
    "target-crash-validate",
    "router-crash-fence",
    "router-crash-rollback",
    "router-restart-fence",
)


# Crash faults' moment inside the cutover: right after its fence is recorded, the writes held
AT_THE_FENCE = "cutover's fence"
# ... and inside the rollback after the cutover (the gate trips in the bake after it), right after its fence
AT_THE_ROLLBACKS_FENCE = "rollback's fence"
# ... and inside a validation chunk's task: its first key range compared, the rest to come
IN_A_CHUNK = "validation chunk"
# ... which the rehearsal cuts into slices of this many rows, so that a chunk has a rest after its first slice
IN_A_CHUNK_SLICE_ROWS = 1_000


class Crashable(Protocol):
    """What a crash fault does to a server or the router: stops it as a crash would, and starts it again."""

    def kill(self) -> None: ...

    def is_running(self) -> bool: ...

    def restart(self) -> None: ...


@dataclass(frozen=True)
class Crash:
    """A fault that crashes a server and starts it again: which server, in which phase (or at the cutover's or
    the rollback's fence), how far into it, and for how long."""

    side: str  # source, target or router (pgbouncer, in front of the application's writers and readers)
    moment: str  # a phase of the timeline, AT_THE_FENCE, AT_THE_ROLLBACKS_FENCE or IN_A_CHUNK
    once_rows_copied: bool = False  # not a second in (which may be past a short copy): once it has committed rows
    down_seconds: float = 3.0  # from the crash to the restart (RDS restarts a failed instance)
    alarm: bool = False  # the composite alarm enters ALARM at the crash, as the server's own alarm would make it
    # Inside a task: it goes on once the server is down (None), or this many seconds after it is back
    resume_after_restart: float | None = None

    @property
    def what(self) -> str:
        """What crashes, as the timeline says it."""
        return "pgbouncer (the router)" if self.side == "router" else f"{self.side} server"

    @property
    def delay(self) -> float:
        """Seconds from the moment to the crash: a second into a phase, at once at a fence, in a chunk or on copied
        rows."""
        return (
            0.0 if self.moment in (AT_THE_FENCE, AT_THE_ROLLBACKS_FENCE, IN_A_CHUNK) or self.once_rows_copied else 1.0
        )


CRASHES = {
    "source-crash": Crash("source", "read shift"),
    "target-crash": Crash("target", "post-cutover bake"),
    "source-crash-after": Crash("source", "post-cutover bake"),  # the old writer, now the reverse subscriber
    "source-crash-fence": Crash("source", AT_THE_FENCE),
    "target-crash-fence": Crash("target", AT_THE_FENCE),
    "target-crash-copy": Crash("target", "initial copy", once_rows_copied=True),
    # Down longer than the cutover's retries (3, 6 and 12 s apart): its catch rolls back, riding the rest out
    "source-outage-fence": Crash("source", AT_THE_FENCE, down_seconds=25.0),
    # The new writer down 10 s, its alarm tripping the gate after the cutover: the rollback must wait for it
    "target-outage-after": Crash("target", "post-cutover bake", down_seconds=10.0, alarm=True),
    # The old writer, as it catches up on the new one's writes inside the rollback's fence
    "source-crash-rollback": Crash("source", AT_THE_ROLLBACKS_FENCE),
    "target-crash-rollback": Crash("target", AT_THE_ROLLBACKS_FENCE),  # the new writer, fenced by the rollback
    # Mid-chunk, replication running: the chunk's task fails and its retry compares the chunk anew
    "source-crash-validate": Crash("source", IN_A_CHUNK),
    "target-crash-validate": Crash("target", IN_A_CHUNK),
    # The router, holding the writers at the fence: its hold is lost with it, the old database's fence is not
    "router-crash-fence": Crash("router", AT_THE_FENCE),
    # ... and holding them at the rollback's fence, after the cutover (its pgbouncer.ini still on the target)
    "router-crash-rollback": Crash("router", AT_THE_ROLLBACKS_FENCE),
    # ... back before the cutover switches the writer (its task held 1 s more): the writers reconnecting through it
    # go to the old database, fenced, and are refused until the switch
    "router-restart-fence": Crash("router", AT_THE_FENCE, resume_after_restart=1.0),
}


FAULT_HELP = {
    "gate": "trip the health gate during the read shift",
    "kill-target": "kill the target server during the initial copy",
    "cutover": "fail the cutover after the fence is taken",
    "ddl": "add a column to a table on the source only during the read shift (DDL is not replicated)",
    "reverse-ddl": "add a column on the target (the new writer) as the rollback window opens: the reverse "
    "replication breaks, the window stops naming it; then the rehearsal mends it (the same column on the source) "
    "and retires the reverse replication, as an operator would",
    "new-table": f"create a table ({NEW_TABLE}) on both sides right after the start, with rows on the source: the copy "
    "loop adds it to the replication, it is validated and migrated with the rest",
    "alarm-rule": "set the composite alarm to ALARM while the cutover runs (right after its fence), and deliver "
    "the alarm's state change to the alarm rule's Rollback function, as EventBridge does: it stops the execution "
    "and starts the rollback one, which waits for the cutover still running in its Lambda, then rolls it back",
    "alarm-rule-reads": "the same as alarm-rule, at the read shift's second step, before it moves reads: that step "
    "of the stopped execution goes on once the rollback has started, and must be refused, reads staying on the "
    "source",
    "source-crash": "crash the source (immediate shutdown) a second into the read shift and start it again 3 s "
    "later, its commits durable (synchronous_commit on): the application's transactions fail meanwhile; the "
    "replication must resume with nothing lost or applied twice, and the migration complete",
    "target-crash": "crash the target, the new writer, a second into the bake after the cutover and start it again "
    "3 s later: the reverse replication must resume from its slot on the target, the source stay whole, and the "
    "migration complete",
    "source-crash-after": "crash the source, the old writer, a second into the bake after the cutover and start it "
    "again 3 s later: its reverse subscription must resume from its origin, the source stay whole for a rollback, "
    "and the migration complete",
    "source-crash-fence": "crash the source, fenced and holding the last writes, right after the cutover's fence "
    "is recorded, and start it again 3 s later: the cutover's task fails and is retried; the retry resumes the "
    "cutover where it stopped, nothing lost",
    "target-crash-fence": "crash the target while it catches up inside the cutover's fence (its steps are recorded "
    "there), and start it again 3 s later: the retried cutover resumes from its records, nothing lost",
    "target-crash-copy": "crash the target once the initial copy has committed rows to it, and start it again 3 s "
    "later: the copy's task is retried and the copy completes, nothing copied twice or left out",
    "source-outage-fence": "crash the source right after the cutover's fence is recorded and start it again only "
    "25 s later, past the cutover task's retries: the cutover fails for good and the rollback, retried until the "
    "source answers, lifts the fence and sends the writers back to the source, nothing lost",
    "target-outage-after": "crash the target, the new writer, a second into the bake after the cutover, its alarm "
    "entering ALARM, and start it again only 10 s later: the gate trips and the rollback, which needs the target to "
    "bring its writes back, waits for it (its task's retries), then rolls back over the reverse replication, "
    "nothing lost",
    "source-crash-rollback": "trip the health gate in the bake after the cutover, and crash the source right after "
    "the rollback's fence is recorded (the source catching up on the target's writes), starting it again 3 s "
    "later: the rollback's task is retried and resumes from its records, every write of the target on the source",
    "target-crash-rollback": "the same, crashing the target, fenced by the rollback and holding the writes the "
    "source catches up on",
    "source-crash-validate": "crash the source inside a validation chunk's task (one with key ranges left to "
    f"compare, the chunks cut into slices of {IN_A_CHUNK_SLICE_ROWS:,} rows) and start it again 3 s "
    "later: the chunk's task fails and is retried, comparing the chunk anew; the validation finds no difference and "
    "the migration completes",
    "target-crash-validate": "the same, crashing the target, which is applying the source's changes as the chunks "
    "compare",
    "router-crash-fence": "crash pgbouncer, the router holding the writers, right after the cutover's fence is "
    "recorded, and start it again 3 s later with its pgbouncer.ini as it is then: the held transactions fail with "
    "it, and the writers reconnecting go where the file points (the old database refuses them while fenced); the "
    "cutover goes on once the router answers, nothing lost",
    "router-restart-fence": "the same as router-crash-fence, the cutover going on only 1 s after pgbouncer is back: "
    "meanwhile its pgbouncer.ini still points at the old database, so the writers reconnecting through it are "
    "refused by that database's fence (read-only), and must be refused, never lost, until the switch",
    "router-crash-rollback": "trip the health gate in the bake after the cutover, and crash pgbouncer right after "
    "the rollback's fence is recorded, starting it again 3 s later: the writers reconnecting meet the target's fence "
    "until the rollback, going on once the router answers, has switched them back to the source, nothing lost",
    "retry": "trip the health gate in the bake after the cutover (rolled back over the reverse replication), then "
    "do what the runbook says to migrate again: start the abandon, lift the target's fence, empty the target's "
    "tables, start the migration anew; the writers run throughout",
}


# Fault reverse-ddl: the reverse replication's problems count as lasting after this long (lag.problems_max_seconds)
REVERSE_FAULT_LASTING_SECONDS = 3


# Crash faults: a transaction may fail from slightly before the crash (in flight) until pgbouncer has
# reconnected after the restart (server_login_retry = 1 s)
OUTAGE_MARGIN_BEFORE_SECONDS = 1.0


OUTAGE_MARGIN_AFTER_SECONDS = 3.0


def failed_outside(stats: WorkloadStats, timeline: Timeline, outage: tuple[float, float] | None) -> int:
    if outage is None:
        return stats.failed
    low, high = outage[0] - OUTAGE_MARGIN_BEFORE_SECONDS, outage[1] + OUTAGE_MARGIN_AFTER_SECONDS
    return sum(1 for started in stats.failed_starts if not low <= started - timeline.start <= high)


def creating_a_table_after_the_start(
    handler: Callable[[dict[str, Any], Any], Any], src: str, tgt: str, injected: list[str], timeline: Timeline
) -> Callable[[dict[str, Any], Any], Any]:
    """The replication handler; once its start has returned, the application's next release creates a table on
    both sides (as a schema migration tool run against each would) and writes rows to it on the source (fault
    'new-table'). A wrapper, so it happens before the copy loop's first poll."""

    def wrapped(event: dict[str, Any], context: Any) -> Any:
        result = handler(event, context)
        if event.get("action") == "start" and not injected:
            injected.append("new-table")
            table = sql.Identifier(NEW_TABLE)
            for dsn in (src, tgt):
                with contextlib.closing(connect(dsn)) as conn:
                    execute(
                        conn, sql.SQL("CREATE TABLE {} (code text PRIMARY KEY, percent int NOT NULL)").format(table)
                    )
            with contextlib.closing(connect(src)) as conn:
                execute(
                    conn,
                    sql.SQL("INSERT INTO {} SELECT 'c' || g, g % 50 FROM generate_series(1, 2000) g").format(table),
                )
            timeline.note(f"fault: table {NEW_TABLE} created on both sides after the start, 2,000 rows")
        return result

    return wrapped


def at_the_cutovers_fence(
    handler: Callable[[dict[str, Any], Any], Any],
    fault: str,
    injected: list[str],
    act: Callable[[], None],
    *,
    action: str = "run",
) -> Callable[[dict[str, Any], Any], Any]:
    """The cutover handler; once, right after the fence of its `action` (run: the cutover; rollback) is recorded,
    `act` runs in it (faults 'cutover': it raises; 'alarm-rule': it starts the alarm rule's rollback beside the
    cutover, which goes on)."""
    from lambdas.core.cutover import Hooks
    from lambdas.core.cutover.steps import Step
    from lambdas.handlers import cutover as cutover_handler

    def hook(operation: Any, step: Any) -> None:
        if step == Step.FENCE and not injected:
            injected.append(fault)
            act()

    def wrapped(event: dict[str, Any], context: Any) -> Any:
        if event.get("action") != action or injected:
            return handler(event, context)
        original = cutover_handler.build_runner

        def build_runner_with_fault(migration: Migration, **kwargs: Any) -> Any:
            runner = original(migration, **kwargs)
            runner.hooks = Hooks(after_record=hook)
            return runner

        cutover_handler.build_runner = build_runner_with_fault
        try:
            return handler(event, context)
        finally:
            cutover_handler.build_runner = original

    return wrapped


def in_a_validation_chunk(
    handler: Callable[[dict[str, Any], Any], Any], fault: str, injected: list[str], act: Callable[[], None]
) -> Callable[[dict[str, Any], Any], Any]:
    """The validation chunk handler; once, in the first chunk of more than one slice with slices still to compare
    (at its start, or between its pieces), `act` runs in it (the crash faults: it returns once the server is
    down). Not only between pieces: once the table's policy is informed (chunks share it, in any order the Map
    runs them) a chunk compares all its slices in one piece, and reports no step between them."""
    from lambdas.core.validation import compare_chunk as original
    from lambdas.handlers import validate_chunk as chunk_handler

    handler_globals = vars(chunk_handler)  # the name the handler calls, imported into its module
    lock = threading.Lock()  # chunks run side by side (the Map's concurrency)

    def compare_with_fault(pair: Any, chunk: Any, **kwargs: Any) -> Any:
        on_step = kwargs.pop("on_step", None)

        def step(seen: Any) -> None:
            if on_step is not None:
                on_step(seen)
            if seen.step != "key ranges" or (seen.total or 0) < 2 or seen.done >= seen.total:
                return
            with lock:
                if injected:
                    return
                injected.append(fault)
            act()

        return original(pair, chunk, on_step=step, **kwargs)

    def wrapped(event: dict[str, Any], context: Any) -> Any:
        if injected:
            return handler(event, context)
        handler_globals["compare_chunk"] = compare_with_fault
        try:
            return handler(event, context)
        finally:
            handler_globals["compare_chunk"] = original

    return wrapped


def fail_the_cutover() -> None:
    raise RuntimeError("fault injected: cutover failed right after the fence")


def at_a_read_shift_step(
    handler: Callable[[dict[str, Any], Any], Any], percent: int, injected: list[str], rule: AlarmRule, tgt: str
) -> Callable[[dict[str, Any], Any], Any]:
    """The read shift handler; once, at the step to `percent`, before it moves reads, the alarm rule fires (it stops
    the execution and starts the rollback one), and the step goes on once the rollback has started (fault
    'alarm-rule-reads'). On AWS the stop does not end a running Lambda: this late step must be refused, or reads
    would stay partly on the target after the rollback put them back. `rule.late_read_shift` says what it did."""
    from lambdas.core.cutover import store

    def rollback_started(migration: str) -> bool:
        with contextlib.closing(connect(tgt)) as conn:
            return store.last_rollback(conn, migration) is not None

    def wrapped(event: dict[str, Any], context: Any) -> Any:
        if event.get("percent") != percent or injected:
            return handler(event, context)
        injected.append("alarm-rule-reads")
        rule.fire("the read shift")
        rule.join()
        deadline = time.monotonic() + 60
        while not rollback_started(rule.migration.name):
            if time.monotonic() > deadline:
                raise RuntimeError("fault alarm-rule-reads: the rollback execution did not start within 60 s")
            time.sleep(0.05)
        try:
            result = handler(event, context)
        except Exception as exc:
            rule.late_read_shift = f"{type(exc).__name__}: {exc}"
            raise
        rule.late_read_shift = f"moved reads to {percent}%"  # what this fault exists to catch
        return result

    return wrapped


class AlarmRule:
    """What EventBridge does when the composite alarm enters ALARM: the alarm rule's Rollback function gets
    the state change event, stops the running execution and starts the rollback one (fault 'alarm-rule')."""

    def __init__(self, migration: Migration, alarm: str, timeline: Timeline) -> None:
        self.migration, self.alarm, self.timeline = migration, alarm, timeline
        self.machine: LocalStateMachine | None = None  # set once made: its ARN is the function's environment
        self.thread: threading.Thread | None = None
        self.result: dict[str, Any] | None = None
        self.late_read_shift: str | None = None  # fault alarm-rule-reads: what the stopped execution's step did

    def fire(self, moment: str = "the cutover") -> None:
        """Beside the caller (a Lambda still running, which the stop does not end), as on AWS."""
        self.thread = threading.Thread(target=self._deliver, args=(moment,), daemon=True)
        self.thread.start()

    def _deliver(self, moment: str) -> None:
        from lambdas.handlers import rollback as rollback_handler
        from lambdas.handlers import runtime

        reason = f"fault injected: the application's alarm fired during {moment}"
        boto3.client("cloudwatch", region_name=REGION).set_alarm_state(
            AlarmName=self.alarm, StateValue="ALARM", StateReason=reason
        )
        self.timeline.note(f"fault: composite alarm set to ALARM during {moment}; the alarm rule runs")
        event = {
            "id": str(uuid.uuid4()),
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "detail-type": "CloudWatch Alarm State Change",
            "source": "aws.cloudwatch",
            "detail": {"alarmName": self.alarm, "state": {"value": "ALARM", "reason": reason}},
        }
        assert self.machine is not None and self.machine.arn is not None
        os.environ[rollback_handler.STATE_MACHINE_ENV] = self.machine.arn
        os.environ[rollback_handler.MIGRATION_ENV] = self.migration.name
        runtime.aws_client.cache_clear()  # a client of this run's mock
        self.result = rollback_handler.handler(event, LambdaContext("zdm-rehearsal-rollback", "alarm-rule-1"))
        self.timeline.note("alarm rule: execution stopped, rollback started")

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join(timeout=60)
