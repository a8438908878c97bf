"""The rehearsal: the real state machine and handlers against local servers, pgbouncer and a live workload.

Starts a source and a target PostgreSQL server and a pgbouncer in front of the source,
loads the sample shop, runs writers through pgbouncer until just before the retire, and executes
statemachine/migration.asl.json in a real ASL interpreter (moto's) with every Lambda task
routed to its handler in-process. The health gates read a CloudWatch alarm (in the mock)
that this process sets from local signals, or trips on purpose when a fault is injected.
The rollback window is shortened by the execution input. The writers stop just before the
reverse replication is retired (the cutover handler is wrapped: synchronous, unlike the
history hooks): the retire leaves the source whole up to the target's position when it
began, so with no writes after that the two databases must end equal.
At the end: every committed insert is looked up on the database that holds the writer,
the two databases are compared row for row, and summary.json plus report.html are written.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import importlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from psycopg2 import sql

from lambdas.core.config import Migration, load_migration
from lambdas.core.db import connect, execute, fetch_value
from lambdas.core.fence import lift_fence, make_writable
from lambdas.core.routers import Side, router_for
from lambdas.core.telemetry import composite_alarm_name
from lambdas.handlers.runtime import VALIDATION_BUCKET_ENV
from rehearsal import sample
from rehearsal.alarms import put_stand_in_alarm
from rehearsal.broker import start_broker
from rehearsal.changestream import LocalChangeStream, LocalStreamSettings
from rehearsal.compare import compare_databases
from rehearsal.faults import (
    AT_THE_FENCE,
    AT_THE_ROLLBACKS_FENCE,
    CRASHES,
    IN_A_CHUNK,
    IN_A_CHUNK_SLICE_ROWS,
    NEW_TABLE,
    REVERSE_FAULT_LASTING_SECONDS,
    AlarmRule,
    Crash,
    Crashable,
    at_a_read_shift_step,
    at_the_cutovers_fence,
    creating_a_table_after_the_start,
    fail_the_cutover,
    failed_outside,
    in_a_validation_chunk,
)
from rehearsal.losses import (
    caught_up_position,
    lost_updates_and_deletes,
    missing_children,
    missing_orders,
    replication_still_there,
    sequences_behind,
    stale_views,
)
from rehearsal.pgbouncer import LocalBackend, start_pgbouncer
from rehearsal.servers import PostgresServer, running_servers
from rehearsal.stepfunctions import (
    REGION,
    STATE_PAYLOAD_LIMIT_BYTES,
    ExecutionResult,
    Invocation,
    LocalStateMachine,
)
from rehearsal.timeline import Timeline, say
from rehearsal.workload import WorkloadProcess, WorkloadStats

ROOT = Path(__file__).resolve().parent.parent
DEFINITION = ROOT / "statemachine" / "migration.asl.json"
VALIDATION_BUCKET = "zdm-local-validation"  # in the mock: the plans' chunks and the chunks' results
ENGINES = ("logical", "debezium")
DBNAME = "shop"
# What each state belongs to, for phase timings and the report's bands.
PHASE_OF = {
    "Preflight": "preflight",
    "StartReplication": "initial copy",
    "WaitForCopy": "catch up",
    "CopyStatus": "catch up",
    "AddNewTables": "catch up",
    "ValidatePlan": "validation",
    "ValidateChunks": "validation",
    "ValidateSummary": "validation",
    "RefreshMaterializedViews": "refresh views",
    "ReadShift": "read shift",
    "Cutover": "cutover",
    "PostCutoverBake": "post-cutover bake",
    "PostCutoverGate": "post-cutover bake",
    "Finalize": "finalize",
    "OpenRollbackWindow": "rollback window",
    "RollbackWindowGate": "rollback window",
    "RollbackWindowWait": "rollback window",
    "RetireRequested": "retire reverse",
    "RetireReverseReplication": "retire reverse",
    "Rollback": "rollback",
    "Abandon": "abandon",
    "AbandonTeardown": "abandon",
}


class PhaseTracker:
    """Turns the execution history into phases: a phase runs from its first state's entry to the next phase."""

    def __init__(self, timeline: Timeline, on_phase: Callable[[str], None]) -> None:
        self.timeline = timeline
        self.current: tuple[str, float] | None = None
        self.on_phase = on_phase
        self.failed_states: list[str] = []

    def event(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        t = self.timeline.now()
        stamp = event.get("timestamp")
        if isinstance(stamp, datetime.datetime):  # when it happened, not when the poll saw it
            t -= max(0.0, (datetime.datetime.now(stamp.tzinfo) - stamp).total_seconds())
        details = event.get("stateEnteredEventDetails") or {}
        if kind.endswith("StateEntered") and details.get("name") in PHASE_OF:
            phase = PHASE_OF[details["name"]]
            if self.current is None or self.current[0] != phase:
                self.close(t, failed=phase == "rollback")  # what ran when the rollback began failed
                self.current = (phase, t)
                self.on_phase(phase)
        exited = event.get("stateExitedEventDetails") or {}
        if exited.get("name") and exited.get("output"):
            self.timeline.state_outputs[exited["name"]] = json.loads(exited["output"])
        if kind in ("ExecutionSucceeded", "ExecutionFailed", "ExecutionAborted", "ExecutionTimedOut"):
            self.close(t, failed=kind != "ExecutionSucceeded")

    def close(self, t: float, failed: bool = False) -> None:
        if self.current is not None:
            name, started = self.current
            status = "rollback" if name == "rollback" else ("failed" if failed else "ok")
            self.timeline.phases.append((name, started, t, status))
            self.current = None


def local_settings(migration: Migration) -> dict[str, Any]:
    """The settings the state machine reads, with the local DSNs (trust auth: no passwords)."""
    data = migration.model_dump(mode="json")
    data["source"]["dsn"] = migration.source.dsn.get_secret_value() if migration.source.dsn else None
    data["target"]["dsn"] = migration.target.dsn.get_secret_value() if migration.target.dsn else None
    admin = migration.router.pgbouncer.admin_dsn
    data["router"]["pgbouncer"]["admin_dsn"] = admin.get_secret_value() if admin else None
    return data


def handler_map() -> dict[str, Callable[[dict[str, Any], Any], Any]]:
    """Every function the state machine invokes, from the same registry the stack deploys."""
    from stacks.registry import HANDLERS

    return {
        spec.placeholder: importlib.import_module(f"lambdas.handlers.{spec.module}").handler
        for spec in HANDLERS
        if spec.invoked_by == "state-machine"
    }


def handler_timeouts() -> dict[str, float]:
    """Each function's timeout as the stack deploys it (the local run keeps it: `rehearsal.stepfunctions`)."""
    from stacks.registry import HANDLERS

    return {spec.placeholder: float(spec.timeout_seconds) for spec in HANDLERS if spec.invoked_by == "state-machine"}


def invocation_summary(invocations: Sequence[Invocation]) -> dict[str, dict[str, Any]]:
    """Per function: how often it ran and failed (by error), its longest run and largest result, against its
    limits."""
    by_function: dict[str, dict[str, Any]] = {}
    for i in invocations:
        entry = by_function.setdefault(
            i.function,
            {
                "invocations": 0,
                "errors": {},
                "longest_seconds": 0.0,
                "timeout_seconds": i.timeout_seconds,
                "largest_result_bytes": 0,
                "result_limit_bytes": STATE_PAYLOAD_LIMIT_BYTES,
            },
        )
        entry["invocations"] += 1
        if i.error is not None:
            entry["errors"][i.error] = entry["errors"].get(i.error, 0) + 1
        entry["longest_seconds"] = round(max(entry["longest_seconds"], i.seconds), 3)
        entry["largest_result_bytes"] = max(entry["largest_result_bytes"], i.result_bytes)
    return dict(sorted(by_function.items()))


@dataclass
class Rehearsal:
    rows: int
    fault: str | None
    out: Path
    clients: int = 8
    rate: float | None = 60.0  # transactions per second per client
    migration_file: Path = ROOT / "migrations" / "local.yaml"
    poll_seconds: int = 1
    rollback_window_seconds: int = 2  # the input's override of cutover.rollback_window_hours
    engine: str = "logical"  # logical, or debezium (a local broker, connector and applier; see docs/change-stream.md)
    rows_snapshotted: int | None = None  # debezium: rows the applier wrote from the connector's snapshot
    reverse_mended: bool | None = None  # fault reverse-ddl: the reverse replication mended and retired after the stop
    abandoned: dict[str, Any] | None = None  # fault retry: how the abandon ended, and what it left
    outage: tuple[float, float] | None = None  # crash faults: from the crash to the restart, timeline seconds
    fault_missed: str | None = None  # why the fault's injection failed (it did not happen as named)
    alarm_rule: dict[str, Any] | None = None  # fault alarm-rule: the execution it stopped, what it did
    task_errors: list[str] = field(default_factory=list)  # each failed task's error (retried or caught), in order
    timeline: Timeline = field(default_factory=lambda: Timeline(time.monotonic()))

    def run_with_timeline(self) -> tuple[dict[str, Any], Timeline]:
        summary = self.run()
        return summary, self.timeline

    def run(self) -> dict[str, Any]:
        self.timeline = Timeline(time.monotonic())
        base = load_migration(self.migration_file)
        settings = {"wal_retrieve_retry_interval": "200ms"}  # apply workers start at once, not within 5 s
        if self.fault in CRASHES:
            # Acknowledged commits survive the crash (as on RDS): the fault asks what the migration loses, and with
            # the servers' fast default (off) the crash itself would drop the last few hundred milliseconds
            settings["synchronous_commit"] = "on"
        with running_servers(["rehearsal-source", "rehearsal-target"], settings=settings) as servers:
            if self.engine != "debezium":
                return self._run(base, *servers)
            with change_stream_environment(servers[1].dsn(DBNAME), base) as stream:
                try:
                    return self._run(base, *servers)
                finally:
                    stream.teardown()  # a rollback leaves it stopped, not removed

    def _run(self, base: Migration, source: PostgresServer, target: PostgresServer) -> dict[str, Any]:
        timeline = self.timeline
        for server in (source, target):
            server.create_database(DBNAME)
        src, tgt = source.dsn(DBNAME), target.dsn(DBNAME)
        say(f"servers: source :{source.port}, target :{target.port}; loading about {self.rows:,} rows ...")
        conn = connect(src)
        sample.create_schema(conn)
        sizes = sample.load_data(conn, self.rows)
        conn.close()
        conn = connect(tgt)
        sample.create_schema(conn)
        conn.close()
        pgb = start_pgbouncer({"app": LocalBackend(source, DBNAME), "app_ro": LocalBackend(source, DBNAME)})
        try:
            migration = self._migration(base, src, tgt, pgb, source, target)
            return self._execute(migration, timeline, sizes.total, src, tgt, pgb, source, target)
        finally:
            pgb.stop()

    def _migration(
        self, base: Migration, src: str, tgt: str, pgb: Any, source: PostgresServer, target: PostgresServer
    ) -> Migration:
        data = base.model_dump(mode="json")
        data["source"] = {"dsn": src}
        data["target"] = {"dsn": tgt}
        data["engine"]["type"] = self.engine
        if self.engine == "debezium":
            data["engine"]["debezium"]["heartbeat_interval_ms"] = 1000
        data["router"] = {
            "type": "pgbouncer",
            "pgbouncer": {  # the file's settings (reconnect_seconds), this run's pgbouncer
                **data["router"]["pgbouncer"],
                "admin_dsn": pgb.admin_dsn(),
                "config_path": str(pgb.config_path),
                "database_alias": "app",
                "reader_alias": "app_ro",
                "source_backend": pgb.backend(source, DBNAME),
                "target_backend": pgb.backend(target, DBNAME),
            },
        }
        from lambdas.core.config import parse_migration

        return parse_migration(data, str(self.migration_file))

    def _execute(
        self,
        migration: Migration,
        timeline: Timeline,
        total_rows: int,
        src: str,
        tgt: str,
        pgb: Any,
        source: PostgresServer,
        target: PostgresServer,
    ) -> dict[str, Any]:
        alarm = composite_alarm_name(migration.name)
        router = router_for(migration)
        workload = _Writers(WorkloadProcess(pgb.dsn("app"), clients=self.clients, rate=self.rate).start())
        say(f"workload: {self.clients} writers through pgbouncer ({pgb.dsn('app').split(' password')[0]})")
        stop = threading.Event()
        injected: list[str] = []

        def set_alarm(state: str, reason: str) -> None:
            boto3.client("cloudwatch", region_name=REGION).set_alarm_state(
                AlarmName=alarm, StateValue=state, StateReason=reason
            )

        def create_alarm() -> None:
            put_stand_in_alarm(boto3.client("cloudwatch", region_name=REGION), alarm, "OK", "rehearsal started")

        crash = CRASHES.get(self.fault or "")

        def crash_soon(crash: Crash, *, until_down: bool = False) -> None:
            """Crash the fault's server beside the caller, `crash.delay` seconds from now or once the copy has
            committed rows (`until_down`: return once it is down, or `crash.resume_after_restart` seconds after it
            is back)."""
            server: Crashable = {"source": source, "target": target, "router": pgb}[crash.side]
            down, back = threading.Event(), threading.Event()

            def alarm() -> None:
                set_alarm("ALARM", f"fault injected: the {crash.what} crashed")

            def inject() -> None:
                if crash.once_rows_copied:
                    self._wait_for_copied_rows(tgt)
                self._crash(server, crash, timeline, down, back, on_down=alarm if crash.alarm else None)

            threading.Thread(target=self._missed_if_raises, args=(inject, timeline), daemon=True).start()
            if until_down:
                down.wait(timeout=30)
            if until_down and crash.resume_after_restart is not None:
                back.wait(timeout=60)
                time.sleep(crash.resume_after_restart)

        def on_phase(phase: str) -> None:
            say(f"[{timeline.now():7.1f}s] phase: {phase}")
            if crash is not None and phase == crash.moment and not injected:
                injected.append(str(self.fault))
                crash_soon(crash)
            if self.fault == "kill-target" and phase == "initial copy" and not injected:
                injected.append("kill-target")
                threading.Thread(
                    target=self._missed_if_raises,
                    args=(lambda: self._kill_target_soon(target, tgt, timeline), timeline),
                    daemon=True,
                ).start()

        tracker = PhaseTracker(timeline, on_phase)

        def on_event(event: dict[str, Any]) -> None:
            tracker.event(event)
            details = event.get("stateEnteredEventDetails") or {}
            if self.fault == "gate" and details.get("name") == "Bake" and not injected:
                injected.append("gate")
                set_alarm("ALARM", "fault injected: health gate tripped during the read shift")
                timeline.note("fault: composite alarm set to ALARM during the read shift")
            if (
                details.get("name") == "PostCutoverBake"
                and not injected
                and (self.fault == "retry" or (crash is not None and crash.moment == AT_THE_ROLLBACKS_FENCE))
            ):
                if self.fault == "retry":
                    injected.append("retry")  # the crash faults' count once their crash is in
                set_alarm("ALARM", "fault injected: health gate tripped after the cutover")
                timeline.note("fault: composite alarm set to ALARM after the cutover")
            if self.fault == "reverse-ddl" and details.get("name") == "OpenRollbackWindow" and not injected:
                injected.append("reverse-ddl")
                with contextlib.closing(connect(tgt)) as conn:  # the application's next release, on its new database
                    execute(conn, "ALTER TABLE orders ADD COLUMN gift_note text")
                timeline.note("fault: a column added to orders on the target (the writer) only")
            if self.fault == "ddl" and details.get("name") == "Bake" and not injected:
                injected.append("ddl")
                with contextlib.closing(connect(src)) as conn:  # as a release run against the old database would
                    execute(conn, "ALTER TABLE orders ADD COLUMN gift_note text")
                timeline.note("fault: a column added to orders on the source only")
            failed = event.get("taskFailedEventDetails") or event.get("executionFailedEventDetails")
            if failed:
                self.task_errors.append(str(failed.get("error")))
                timeline.events.append((timeline.now(), str(failed.get("error"))))

        monitor = threading.Thread(
            target=self._monitor, args=(migration, router, timeline, stop, src, tgt), daemon=True
        )
        monitor.start()
        handlers = handler_map()
        if self.fault == "cutover":
            handlers["CutoverFunctionArn"] = at_the_cutovers_fence(
                handlers["CutoverFunctionArn"], "cutover", injected, fail_the_cutover
            )
        alarm_rule = AlarmRule(migration, alarm, timeline)
        if self.fault == "alarm-rule":
            handlers["CutoverFunctionArn"] = at_the_cutovers_fence(
                handlers["CutoverFunctionArn"], "alarm-rule", injected, alarm_rule.fire
            )
        if self.fault == "alarm-rule-reads":
            handlers["ReadShiftFunctionArn"] = at_a_read_shift_step(
                handlers["ReadShiftFunctionArn"], migration.read_shift.steps[1], injected, alarm_rule, tgt
            )
        if crash is not None and crash.moment in (AT_THE_FENCE, AT_THE_ROLLBACKS_FENCE, IN_A_CHUNK):
            # Inside a task: the crash happens in it, which goes on once the server is down
            crash_inside = functools.partial(crash_soon, crash, until_down=True)
            if crash.moment == IN_A_CHUNK:
                handlers["ValidateChunkFunctionArn"] = in_a_validation_chunk(
                    handlers["ValidateChunkFunctionArn"], str(self.fault), injected, crash_inside
                )
            else:
                handlers["CutoverFunctionArn"] = at_the_cutovers_fence(
                    handlers["CutoverFunctionArn"],
                    str(self.fault),
                    injected,
                    crash_inside,
                    action="run" if crash.moment == AT_THE_FENCE else "rollback",
                )
        if self.fault == "new-table":
            handlers["ReplicationFunctionArn"] = creating_a_table_after_the_start(
                handlers["ReplicationFunctionArn"], src, tgt, injected, timeline
            )
        handlers["CutoverFunctionArn"] = _stopping_writers_before_retire(
            handlers["CutoverFunctionArn"], workload, timeline
        )
        settings_data = local_settings(migration)
        if self.fault == "reverse-ddl":
            settings_data["lag"]["problems_max_seconds"] = REVERSE_FAULT_LASTING_SECONDS
        if crash is not None and crash.moment == IN_A_CHUNK:
            settings_data["validation"]["slice_rows"] = IN_A_CHUNK_SLICE_ROWS
        machine = LocalStateMachine(
            DEFINITION,
            handlers,
            values={
                "SettingsParameterName": f"/zdm/{migration.name}/settings",
                "MigrationName": migration.name,
                "RollbackWindowSeconds": str(migration.cutover.rollback_window_seconds),
                "ValidationBucketName": VALIDATION_BUCKET,
            },
            parameters={f"/zdm/{migration.name}/settings": json.dumps(settings_data)},
            buckets=[VALIDATION_BUCKET],
            environment={VALIDATION_BUCKET_ENV: VALIDATION_BUCKET},
            timeouts=handler_timeouts(),
        )
        execution_input = {
            "timing": {"poll_seconds": self.poll_seconds},
            "rollback_window_seconds": self.rollback_window_seconds,
        }
        alarm_rule.machine = machine
        runs: list[ExecutionResult] = []  # every execution: the migration's, and the runbook's after it (faults)

        def execute_machine(execution: dict[str, Any]) -> ExecutionResult:
            runs.append(
                machine.run(execution, timeout=1800, on_event=on_event, on_start=create_alarm, on_end=alarm_rule.join)
            )
            return runs[-1]

        try:
            result = execute_machine(execution_input)
            if result.followed:  # the alarm rule stopped it and started the rollback: how that one ended counts
                self.alarm_rule = {
                    "stopped": {"status": result.status, "error": result.error, "cause": (result.cause or "")[:500]},
                    "rule": alarm_rule.result,
                    "late_read_shift": alarm_rule.late_read_shift,
                }
                result = result.last
            if self.fault == "retry" and _rolled_back(result):
                result = self._abandon_and_migrate_again(result, execution_input, migration, src, tgt, execute_machine)
        finally:
            if not workload.stopped:
                time.sleep(0.5)  # writes after the last step, through the final writer
            stats = workload.stop()
            stop.set()
            monitor.join(timeout=10)
        say(f"[{timeline.now():7.1f}s] execution {result.status}: {result.error or ''} {(result.cause or '')[:200]}")
        if self.fault == "reverse-ddl" and result.error == "ReverseReplicationBroken":
            self.reverse_mended = self._mend_reverse(src, timeline, lambda e: execute_machine({**execution_input, **e}))
        return self._summarize(migration, result, runs, stats, timeline, total_rows, src, tgt, router, injected)

    def _new_tables(self, injected: list[str]) -> list[Any]:
        from lambdas.core.tables import TableName

        return [TableName("public", NEW_TABLE)] if "new-table" in injected else []

    def _mend_reverse(self, src: str, timeline: Timeline, execute_machine: Callable[[dict[str, Any]], Any]) -> bool:
        """What the stop asks a person to do: the target's column added on the source too (the reverse
        replication then applies the rows it held back), then an execution of `{"action": "retire_reverse"}`."""
        with contextlib.closing(connect(src)) as conn:
            make_writable(conn)  # the source stays fenced after the cutover; this session may still run DDL
            execute(conn, "ALTER TABLE orders ADD COLUMN gift_note text")
        say(f"[{timeline.now():7.1f}s] mended: the same column added to orders on the source; starting the retire ...")
        retired = execute_machine({"action": "retire_reverse"})
        say(f"[{timeline.now():7.1f}s] retire execution {retired.status}: {retired.error or ''} {retired.cause or ''}")
        return bool(retired.status == "SUCCEEDED")

    def _abandon_and_migrate_again(
        self,
        rolled_back: ExecutionResult,
        execution_input: dict[str, Any],
        migration: Migration,
        src: str,
        tgt: str,
        execute_machine: Callable[[dict[str, Any]], Any],
    ) -> Any:
        """What the runbook (docs/operations.md) says to do after a rollback, to migrate again: start
        `{"action": "abandon"}`, lift the target's fence if a rollback after the cutover left it, empty the
        target's tables, start `{}`. The execution that migrated (or
        the one that stopped) is returned; `self.abandoned` says how the abandon ended and what it left."""
        timeline = self.timeline
        say(f"[{timeline.now():7.1f}s] rolled back; starting the abandon, as the runbook says to migrate again ...")
        abandon = execute_machine({**execution_input, "action": "abandon"})
        left = replication_still_there(migration, src, tgt)
        self.abandoned = {
            "rolled_back_because": (rolled_back.cause or "")[:500],
            "status": abandon.status,
            "error": abandon.error,
            "cause": abandon.cause,
            "left": left,
        }
        say(f"[{timeline.now():7.1f}s] abandon {abandon.status}: {abandon.error or ''} left: {left or 'nothing'}")
        if abandon.status != "SUCCEEDED":
            return abandon
        with contextlib.closing(connect(tgt)) as conn:
            # A rollback after the cutover leaves the target fenced (preflight's read_only_fence): lifted as it says
            self.abandoned["target_fence_lifted"] = lift_fence(conn)
        with contextlib.closing(connect(tgt)) as conn:  # a new session: the database's default is read at its start
            tables = sql.SQL(", ").join(sql.Identifier(t.schema, t.name) for t in migration_tables())
            execute(conn, sql.SQL("TRUNCATE {}").format(tables))
        lifted = "fence lifted and " if self.abandoned["target_fence_lifted"] else ""
        say(f"[{timeline.now():7.1f}s] target's {lifted}tables emptied; starting the migration anew ...")
        return execute_machine(execution_input)

    def _crash(
        self,
        server: Crashable,
        crash: Crash,
        timeline: Timeline,
        down: threading.Event,
        back: threading.Event,
        *,
        on_down: Callable[[], None] | None = None,
    ) -> None:
        """Crash faults: `crash.delay` seconds from now, the server stops as a crash would (`down` set, then
        `on_down` run), and starts again `crash.down_seconds` later (as RDS restarts a failed instance; `back`
        set); `self.outage` says when, on the timeline."""
        time.sleep(crash.delay)
        crashed = timeline.now()
        server.kill()
        if server.is_running():
            raise RuntimeError(f"the {crash.what} is still running after it was stopped as a crash would")
        down.set()
        timeline.note(f"fault: {crash.what} crashed during the {crash.moment}")
        if on_down is not None:
            on_down()
        time.sleep(crash.down_seconds)
        server.restart()
        self.outage = (crashed, timeline.now())
        back.set()
        timeline.note(f"{crash.what} restarted")

    def _kill_target_soon(self, target: PostgresServer, tgt: str, timeline: Timeline) -> None:
        """Kill the target once the copy has written rows to it (mid-copy, not before it starts)."""
        self._wait_for_copied_rows(tgt)
        target.kill()
        timeline.note("fault: target server killed during the initial copy")

    def _missed_if_raises(self, inject: Callable[[], None], timeline: Timeline) -> None:
        """Run a fault's injection beside the migration; one that fails is recorded as missed (the summary's
        `fault_missed`), so a rehearsal whose fault never happened cannot pass."""
        try:
            inject()
        except Exception as exc:
            self.fault_missed = f"{type(exc).__name__}: {exc}"
            timeline.note(f"fault {self.fault} missed its moment: {self.fault_missed}")

    @staticmethod
    def _wait_for_copied_rows(tgt: str, timeout: float = 60) -> None:
        """Until the copy has committed rows to the target (mid-copy, not before it starts)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with contextlib.closing(connect(tgt)) as conn:
                    if fetch_value(conn, "SELECT count(*) FROM order_items"):
                        return
            except ConnectionError:
                pass
            time.sleep(0.02)
        raise TimeoutError(f"the initial copy committed no rows to the target within {timeout:g}s")

    def _monitor(
        self, migration: Migration, router: Any, timeline: Timeline, stop: threading.Event, src: str, tgt: str
    ) -> None:
        from lambdas.handlers.replication import engine_for

        engine = None
        while not stop.is_set():
            t = timeline.now()
            try:
                state = router.state()
                if state.read_weight is not None:
                    timeline.reads_on_target.append((t, float(state.read_weight)))
                if state.writer is not None:
                    timeline.writer_on_target.append((t, 100.0 if state.writer is Side.TARGET else 0.0))
            except Exception:  # noqa: S110 - the router may be mid-change; the next sample will do
                pass
            try:
                engine = engine or engine_for(migration)
                status = engine.status()
                if status.engine == "debezium" and status.tables:
                    self.rows_snapshotted = sum(t.rows_copied or 0 for t in status.tables)
                if status.lag_seconds is not None:
                    timeline.lag_seconds.append((t, status.lag_seconds))
                if status.lag_bytes is not None:
                    timeline.lag_bytes.append((t, float(status.lag_bytes)))
            except Exception:  # noqa: S110 - target down (fault) or replication gone (after finalize)
                pass
            stop.wait(0.5)

    def _summarize(
        self,
        migration: Migration,
        result: Any,
        runs: list[ExecutionResult],
        stats: WorkloadStats,
        timeline: Timeline,
        total_rows: int,
        src: str,
        tgt: str,
        router: Any,
        injected: list[str],
    ) -> dict[str, Any]:
        outcome = (
            "migrated"
            if result.status == "SUCCEEDED"
            else "reverse_replication_broken"
            if result.error == "ReverseReplicationBroken"
            else ("rolled_back" if result.error != "RollbackFailed" and _rolled_back(result) else "failed")
        )
        routed = router.state()  # where the writer and the reads are at the end
        writer = routed.writer
        writer_dsn = tgt if writer is Side.TARGET else src
        lost = missing_orders(writer_dsn, stats.order_ids)
        behind = sequences_behind(writer_dsn, migration_tables())
        updates_lost, deletes_lost = lost_updates_and_deletes(writer_dsn, stats)
        child_rows_lost = missing_children(writer_dsn, stats)
        views_stale = stale_views(src, tgt) if writer is Side.TARGET else []
        differences: int | None = None
        rows_compared = 0
        retire = (timeline.state_outputs.get("RetireReverseReplication") or {}).get("retire") or {}
        left: list[str] | None = None  # not looked for when not migrated: the target may be down (a fault)
        rows_by_table: dict[str, int] = {}
        if outcome == "migrated" or self.reverse_mended:
            left = replication_still_there(migration, src, tgt, back_only=True)
            # The retire waited until the source had applied the target's writes up to its start,
            # and the writers had stopped before it: the two must be equal row for row.
            tables = [*migration_tables(), *self._new_tables(injected)]
            diffs = compare_databases(src, tgt, tables)
            differences = sum(len(d.missing_on_target) + len(d.extra_on_target) + len(d.changed) for d in diffs)
            rows_compared = sum(d.source_rows for d in diffs)
            rows_by_table = {d.table: d.source_rows for d in diffs}
        # Each state's output from the history: there even when the execution failed.
        output = {
            "start": (timeline.state_outputs.get("StartReplication") or {}).get("start"),
            "validation_summary": (timeline.state_outputs.get("ValidateSummary") or {}).get("validation_summary"),
            "cutover": (timeline.state_outputs.get("Cutover") or {}).get("cutover"),
        }
        phases = {name: round(end - start, 3) for name, start, end, _ in timeline.phases}
        return {
            "outcome": outcome,
            "fault": self.fault,
            "fault_injected": bool(injected) and self.fault_missed is None if self.fault else False,
            "fault_missed": self.fault_missed,
            "error": result.error,
            "cause": (result.cause or "")[:2000],
            "phase_seconds": phases,
            "total_seconds": round(timeline.now(), 3),
            "rows_in_source": total_rows,
            "engine": self.engine,
            "rows_copied": self.rows_snapshotted
            if self.engine == "debezium"
            else (output.get("start") or {}).get("rows_copied"),
            "lag_seconds": _percentiles([v for _, v in timeline.lag_seconds]),
            "lag_bytes": _percentiles([v for _, v in timeline.lag_bytes]),
            "rows_validated": (output.get("validation_summary") or {}).get("rows_compared"),
            "persistent_differences": (output.get("validation_summary") or {}).get("differences"),
            "longest_write_pause_ms": round(stats.max_latency * 1000, 1),
            "longest_write_pause_during": _phase_at(timeline, _slowest_start(stats) - timeline.start),
            "cutover_pause_ms": _ms((output.get("cutover") or {}).get("pause_seconds")),
            "committed_transactions": stats.committed,
            "failed_transactions": stats.failed,
            "failed_read_only": stats.refused_read_only,
            "failed_transaction_errors": stats.errors[:5],
            "rows_lost": lost,
            "sequences_behind": behind,
            "updates_lost": updates_lost,
            "deletes_lost": deletes_lost,
            "child_rows_lost": child_rows_lost,
            "views_stale": views_stale,
            "views_refreshed": [
                v["view"]
                for v in (
                    (timeline.state_outputs.get("RefreshMaterializedViews") or {}).get("materialized_views") or {}
                ).get("views", [])
                if v["refreshed"]
            ],
            "writer_on": writer.value if writer is not None else None,
            "reads_on_target_percent": routed.read_weight,
            "final_rows_compared": rows_compared,
            "final_rows_by_table": rows_by_table,
            "final_differences": differences,
            "reverse_replication_retired": retire.get("status") in ("done", "already_done") and left == [],
            "reverse_replication_left": left,
            "source_whole_as_of_lsn": caught_up_position(retire),
            "rollback_problems": ((timeline.state_outputs.get("RollbackWindowGate") or {}).get("gate") or {}).get(
                "rollback_problems"
            ),
            "reverse_mended": self.reverse_mended,
            "abandoned": self.abandoned,
            "alarm_rule": self.alarm_rule,
            "outage": self.outage,
            "task_errors": self.task_errors,
            # transactions that failed while no crash explains it (all of them, without fault source-crash)
            "failed_outside_outage": failed_outside(stats, timeline, self.outage),
            # before_cutover, after_cutover (over the reverse replication), or nothing (rolled back already)
            "rollback_kind": ((timeline.state_outputs.get("Rollback") or {}).get("rollback") or {}).get("kind"),
            "tables_added": ((timeline.state_outputs.get("AddNewTables") or {}).get("added_tables") or {}).get("added"),
            "lambda_invocations": invocation_summary([i for run in runs for i in run.invocations]),
            "lambda_limits_broken": [broken for run in runs for broken in run.limits_broken],
            "_latencies": [(round(s - timeline.start, 3), round(d, 4)) for s, d in stats.latencies],
            "_failed_starts": [round(s - timeline.start, 3) for s in stats.failed_starts],
        }


@contextlib.contextmanager
def change_stream_environment(target_dsn: str, base: Migration) -> Iterator[LocalChangeStream]:
    """A local broker, and the environment that makes the handlers run the debezium engine on it."""
    from lambdas.handlers.replication import CHANGE_STREAM_ENV

    say("change stream: starting a local Kafka-compatible broker (Tansu) ...")
    broker = start_broker()
    workdir = Path(tempfile.mkdtemp(prefix="zdm-stream-"))
    settings = LocalStreamSettings(
        workdir=str(workdir),
        bootstrap=broker.bootstrap,
        target_dsn=target_dsn,
        prefix=base.topic_prefix,
        tables=tuple(sample.SAMPLE_TABLES),
        batch_size=base.engine.debezium.batch_size,
        batch_window_seconds=0.2,
    )
    previous = os.environ.get(CHANGE_STREAM_ENV)
    os.environ[CHANGE_STREAM_ENV] = settings.to_json()
    try:
        yield LocalChangeStream(settings)
    finally:
        if previous is None:
            os.environ.pop(CHANGE_STREAM_ENV, None)
        else:
            os.environ[CHANGE_STREAM_ENV] = previous
        broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _slowest_start(stats: WorkloadStats) -> float:
    return max(stats.latencies, key=lambda item: item[1], default=(0.0, 0.0))[0]


def _phase_at(timeline: Timeline, t: float) -> str | None:
    """The phase running at `t` seconds (a transaction that started then was the slowest)."""
    for name, start, end, _ in timeline.phases:
        if start <= t <= end:
            return name
    return None


def migration_tables() -> list[Any]:
    from lambdas.core.tables import TableName

    return [TableName.parse(t) for t in sample.SAMPLE_TABLES]


def _rolled_back(result: Any) -> bool:
    """The RolledBack Fail state (statemachine/migration.asl.json) ends every completed rollback."""
    return bool(result.error == "RolledBack")


class _Writers:
    """The workload, stopped once: before the retire of reverse replication, or at the end."""

    def __init__(self, workload: WorkloadProcess) -> None:
        self._workload = workload
        self._stats: WorkloadStats | None = None
        self._lock = threading.Lock()

    @property
    def stopped(self) -> bool:
        return self._stats is not None

    def stop(self) -> WorkloadStats:
        with self._lock:
            if self._stats is None:
                self._stats = self._workload.stop()
            return self._stats


def _stopping_writers_before_retire(
    handler: Callable[[dict[str, Any], Any], Any], writers: _Writers, timeline: Timeline
) -> Callable[[dict[str, Any], Any], Any]:
    """The cutover handler, stopping the writers before it retires the reverse replication.

    A wrapper, not an `on_event` hook: the hooks see the history after the fact (polled), so a
    short window could end, and the retire begin, before they stop anything.
    """

    def wrapped(event: dict[str, Any], context: Any) -> Any:
        if event.get("action") == "retire_reverse" and not writers.stopped:
            stats = writers.stop()
            timeline.events.append((timeline.now(), "writers stopped"))
            say(f"[{timeline.now():7.1f}s] writers stopped before the retire ({stats.committed:,} transactions)")
        return handler(event, context)

    return wrapped


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(values)
    return {
        "p50": round(ordered[len(ordered) // 2], 4),
        "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 4),
        "max": round(ordered[-1], 4),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)
