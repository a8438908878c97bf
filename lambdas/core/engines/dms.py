"""AWS DMS: a full-load-and-cdc task on a replication instance, or a DMS Serverless replication.

The task (or replication config) is created by the CDK stack; this engine starts, resumes,
watches and stops it through a boto3 DMS client, and reads CDC latency from CloudWatch. Both
clients are passed in (the core builds none), so tests give moto clients or Stubbers.

Status per table comes from DescribeTableStatistics (instance) or
DescribeReplicationTableStatistics (serverless): full-load rows, table state, DMS validation.
Lag is the larger of the CDCLatencySource and CDCLatencyTarget metrics over the last minutes.
DMS does not report a byte lag or the slot's retained WAL; those stay None here.
"""

from __future__ import annotations

import fnmatch
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

from lambdas.core.engines.base import (
    Phase,
    ReplicationEngine,
    ReplicationStatus,
    StartResult,
    TableStatus,
    TableSyncState,
    TeardownResult,
)
from lambdas.core.tables import TableName

# The table the cutover writes its fence marker into on the source (engines.dms_fence); the task carries it.
FENCE_MARKER_TABLE = TableName("_zdm", "dms_fence_markers")


class DmsEngineError(RuntimeError):
    pass


class DmsBehind(TimeoutError):
    """DMS had not applied the source's changes up to the wanted time within the timeout."""


class DmsTaskBusy(DmsEngineError):
    """The task is being created, modified or moved: retry later (Step Functions retries it)."""


class DmsClient(Protocol):
    """The DMS calls the engine makes (a boto3 'dms' client satisfies it)."""

    def describe_replication_tasks(self, **kwargs: Any) -> dict[str, Any]: ...
    def describe_table_statistics(self, **kwargs: Any) -> dict[str, Any]: ...
    def start_replication_task(self, **kwargs: Any) -> dict[str, Any]: ...
    def stop_replication_task(self, **kwargs: Any) -> dict[str, Any]: ...
    def describe_replications(self, **kwargs: Any) -> dict[str, Any]: ...
    def describe_replication_table_statistics(self, **kwargs: Any) -> dict[str, Any]: ...
    def start_replication(self, **kwargs: Any) -> dict[str, Any]: ...
    def stop_replication(self, **kwargs: Any) -> dict[str, Any]: ...


class CloudWatchClient(Protocol):
    def get_metric_data(self, **kwargs: Any) -> dict[str, Any]: ...


@dataclass(frozen=True)
class DmsTarget:
    """What the engine drives: a replication task (instance) or a replication config (serverless).

    `metric_dimensions` are the CloudWatch dimensions of the task's AWS/DMS metrics:
    ReplicationInstanceIdentifier + ReplicationTaskIdentifier for a task, ReplicationConfigId
    for a serverless replication (the stack computes both).
    """

    kind: Literal["task", "serverless"]
    arn: str
    metric_dimensions: dict[str, str] = field(default_factory=dict)
    migration_type: Literal["full-load-and-cdc", "cdc", "full-load"] = "full-load-and-cdc"

    @classmethod
    def from_json(cls, text: str) -> DmsTarget:
        data = json.loads(text)
        return cls(
            kind=data["kind"],
            arn=data["arn"],
            metric_dimensions=dict(data.get("metric_dimensions", {})),
            migration_type=data.get("migration_type", "full-load-and-cdc"),
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "kind": self.kind,
                "arn": self.arn,
                "metric_dimensions": self.metric_dimensions,
                "migration_type": self.migration_type,
            },
            sort_keys=True,
        )


@dataclass(frozen=True)
class _Run:
    """The task or serverless replication as DMS describes it, in one shape."""

    status: str
    stop_reason: str
    failure: str | None
    full_load_percent: int | None
    tables_errored: int


# DMS statuses (lower-case) -> what start() does and what status() reports.
_RUNNING = {"starting", "running"}
_STOPPED = {"stopped", "stopping"}
_NEVER_STARTED = {"ready", "created"}
_BUSY = {"creating", "modifying", "moving", "testing", "deleting", "initializing", "provisioning"}

_TABLE_STATES = {
    "before load": TableSyncState.PENDING,
    "table does not exist": TableSyncState.PENDING,
    "full load": TableSyncState.COPYING,
    "table is being reloaded": TableSyncState.COPYING,
    "table completed": TableSyncState.COPIED,
}
_TABLE_PROBLEM_STATES = {"table error", "table cancelled"}
_VALIDATION_PROBLEM_STATES = {"mismatched records", "suspended records", "error", "table error", "no primary key"}


class DmsEngine(ReplicationEngine):
    name = "dms"

    def __init__(
        self,
        dms: DmsClient,
        cloudwatch: CloudWatchClient,
        target: DmsTarget,
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        latency_window: timedelta = timedelta(minutes=5),
    ) -> None:
        self._dms = dms
        self._cloudwatch = cloudwatch
        self.target = target
        self._now = now
        self._window = latency_window

    # -- start -----------------------------------------------------------------------------
    def start(self, *, reload: bool = False) -> StartResult:
        """Start the task the first time, resume it after a stop or a recoverable failure; with `reload`, a
        task that ran before loads every table again and then applies the changes from there (DMS's
        reload-target: a resume would apply only the changes since its stop). A running task is left alone
        (idempotent)."""
        run = self._describe()
        tables = [t.table for t in self._tables(run)[0]] if run.status in _RUNNING else []
        if run.status in _RUNNING:
            return StartResult(self.name, already_running=True, tables=tables)
        if run.status in _BUSY:
            raise DmsTaskBusy(f"DMS {self._what()} is {run.status}; start it once that finishes")
        if run.status in _NEVER_STARTED:
            start_type = "start-replication"  # the only type DMS accepts for a task's first run
        else:
            start_type = "reload-target" if reload else "resume-processing"
        if self.target.kind == "task":
            self._dms.start_replication_task(ReplicationTaskArn=self.target.arn, StartReplicationTaskType=start_type)
        else:
            self._dms.start_replication(ReplicationConfigArn=self.target.arn, StartReplicationType=start_type)
        return StartResult(self.name, already_running=False, tables=tables)

    # -- status ----------------------------------------------------------------------------
    def status(self) -> ReplicationStatus:
        run = self._describe()
        problems: list[str] = []
        if run.failure:
            problems.append(f"DMS {self._what()} failed: {run.failure}")
        if run.tables_errored:
            problems.append(f"{run.tables_errored} table(s) errored in DMS")
        if run.status in _NEVER_STARTED:
            return ReplicationStatus(self.name, Phase.NOT_STARTED, problems=problems)
        if run.status in _BUSY:
            problems.append(f"DMS {self._what()} is {run.status}")
            return ReplicationStatus(self.name, Phase.NOT_STARTED, problems=problems)
        tables, table_problems = self._tables(run)
        problems += table_problems
        full_load_done = self.target.migration_type == "cdc" or (
            run.full_load_percent == 100
            and all(t.state not in (TableSyncState.PENDING, TableSyncState.COPYING) for t in tables)
        )
        if full_load_done and run.status in _RUNNING | _STOPPED:
            # DMS marks a table 'Table completed' after its full load; from then on it follows the stream.
            tables = [
                TableStatus(t.table, TableSyncState.READY, t.rows_copied) if t.state is TableSyncState.COPIED else t
                for t in tables
            ]
        if run.status == "failed" or "fatal" in run.stop_reason.lower():
            phase = Phase.FAILED
        elif run.status in _STOPPED:
            phase = Phase.STOPPED
        else:
            phase = Phase.STREAMING if full_load_done else Phase.COPYING
        lag = self._latency_seconds() if run.status in _RUNNING else None
        return ReplicationStatus(self.name, phase, tables=tables, lag_seconds=lag, problems=problems)

    # -- caught up? --------------------------------------------------------------------------
    def catch_up(
        self,
        timeout: float,
        *,
        margin_seconds: float = 5.0,
        poll_seconds: float = 15.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> datetime:
        """Return once DMS has applied on the target every change the source committed before this call.

        DMS exposes no applied position, but CDCLatencyTarget says how far behind its apply is: over a
        datapoint's minute starting at t, the oldest change waiting to be committed on the target was
        at most L seconds old, so everything committed on the source before t - L was applied. The wait
        ends at the first datapoint with t - L past the call's time plus `margin_seconds` (clocks of the
        DMS instance and of this function differ a little): with one-minute datapoints, one to three
        minutes. Returns that applied-through time; raises DmsBehind after `timeout` seconds.
        """
        wanted = self._now() + timedelta(seconds=margin_seconds)
        deadline = time.monotonic() + timeout
        while True:
            applied = self._applied_through()
            if applied is not None and applied >= wanted:
                return applied
            if time.monotonic() >= deadline:
                seen = "no CDCLatencyTarget datapoint" if applied is None else f"applied through {applied:%H:%M:%S}"
                raise DmsBehind(
                    f"DMS {self._what()} had not applied the changes up to {wanted:%H:%M:%S} UTC within"
                    f" {timeout:g} s ({seen})"
                )
            sleep(poll_seconds)

    def _applied_through(self) -> datetime | None:
        """The latest one-minute CDCLatencyTarget datapoint's start minus its maximum latency."""
        if not self.target.metric_dimensions:
            return None
        end = self._now()
        dims = [{"Name": k, "Value": v} for k, v in sorted(self.target.metric_dimensions.items())]
        result = self._cloudwatch.get_metric_data(
            MetricDataQueries=[
                {
                    "Id": "cdclatencytarget",
                    "MetricStat": {
                        "Metric": {"Namespace": "AWS/DMS", "MetricName": "CDCLatencyTarget", "Dimensions": dims},
                        "Period": 60,
                        "Stat": "Maximum",
                    },
                    "ReturnData": True,
                }
            ],
            StartTime=end - self._window,
            EndTime=end,
            ScanBy="TimestampDescending",
        )
        points = [
            (started, float(value))
            for r in result.get("MetricDataResults", [])
            for started, value in zip(r.get("Timestamps", []), r.get("Values", []), strict=False)
        ]
        if not points:
            return None
        started, latency = max(points)  # the latest minute
        applied: datetime = started - timedelta(seconds=latency)
        return applied

    # -- stop / teardown -------------------------------------------------------------------
    def stop(self) -> None:
        """Stop applying changes; DMS keeps its slot and position, so start() resumes."""
        run = self._describe()
        if run.status not in _RUNNING:
            return
        if self.target.kind == "task":
            self._dms.stop_replication_task(ReplicationTaskArn=self.target.arn)
        else:
            self._dms.stop_replication(ReplicationConfigArn=self.target.arn)

    def wait_stopped(
        self, timeout: float, *, poll_seconds: float = 2.0, sleep: Callable[[float], None] = time.sleep
    ) -> str:
        """Stop the task and return once DMS says it has stopped (or failed): from then on it applies nothing.
        Raises DmsEngineError after `timeout` seconds, naming the status it was left in."""
        self.stop()
        deadline = time.monotonic() + timeout
        while True:
            status = self._describe().status
            if status not in _RUNNING and status != "stopping":
                return status
            if time.monotonic() >= deadline:
                raise DmsEngineError(f"DMS {self._what()} was still {status} {timeout:g} s after it was told to stop")
            sleep(poll_seconds)

    def teardown(self) -> TeardownResult:
        """Stop the task. The task, its endpoints and DMS's slot on the source belong to the
        CloudFormation stack: `cdk destroy` (or removing the engine from the file) deletes them,
        and DMS drops its slot with the task. Deleting them here would leave the stack drifted."""
        self.stop()
        return TeardownResult(removed=[f"{self._what()} stopped (deleted with the stack)"])

    def loaded_tables(self) -> list[TableName]:
        """The tables the task's earlier runs loaded, from DMS's table statistics; none for a task that never ran."""
        run = self._describe()
        if run.status in _NEVER_STARTED or run.status in _BUSY:
            return []
        return sorted({TableName(str(row.get("SchemaName")), str(row.get("TableName"))) for row in self._statistics()})

    # -- DMS reads -------------------------------------------------------------------------
    def _what(self) -> str:
        return ("task " if self.target.kind == "task" else "replication ") + self.target.arn.rsplit(":", 1)[-1]

    def _describe(self) -> _Run:
        if self.target.kind == "task":
            found = self._dms.describe_replication_tasks(
                Filters=[{"Name": "replication-task-arn", "Values": [self.target.arn]}], WithoutSettings=True
            ).get("ReplicationTasks", [])
            if not found:
                raise DmsEngineError(f"DMS task {self.target.arn} not found: is the stack deployed in this region?")
            task = found[0]
            stats = task.get("ReplicationTaskStats", {})
            return _Run(
                status=str(task.get("Status", "")).lower(),
                stop_reason=str(task.get("StopReason", "")),
                failure=task.get("LastFailureMessage") or None,
                full_load_percent=stats.get("FullLoadProgressPercent"),
                tables_errored=int(stats.get("TablesErrored", 0)),
            )
        found = self._dms.describe_replications(
            Filters=[{"Name": "replication-config-arn", "Values": [self.target.arn]}]
        ).get("Replications", [])
        if not found:
            # A serverless replication exists only once started: the config alone is 'created'.
            return _Run(status="created", stop_reason="", failure=None, full_load_percent=None, tables_errored=0)
        replication = found[0]
        stats = replication.get("ReplicationStats", {})
        failures = replication.get("FailureMessages") or []
        return _Run(
            status=str(replication.get("Status", "")).lower(),
            stop_reason=str(replication.get("StopReason", "")),
            failure="; ".join(failures) or None,
            full_load_percent=stats.get("FullLoadProgressPercent"),
            tables_errored=int(stats.get("TablesErrored", 0)),
        )

    def _statistics(self) -> Iterator[dict[str, Any]]:
        marker: str | None = None
        while True:
            page_args: dict[str, Any] = {"MaxRecords": 500}
            if marker:
                page_args["Marker"] = marker
            if self.target.kind == "task":
                page = self._dms.describe_table_statistics(ReplicationTaskArn=self.target.arn, **page_args)
                rows = page.get("TableStatistics", [])
            else:
                page = self._dms.describe_replication_table_statistics(
                    ReplicationConfigArn=self.target.arn, **page_args
                )
                rows = page.get("ReplicationTableStatistics", [])
            yield from rows
            marker = page.get("Marker")
            if not marker:
                return

    def _tables(self, run: _Run) -> tuple[list[TableStatus], list[str]]:
        problems: list[str] = []
        if run.status in _NEVER_STARTED or run.status in _BUSY:
            return [], problems
        tables: list[TableStatus] = []
        for row in self._statistics():
            name = f"{row.get('SchemaName')}.{row.get('TableName')}"
            raw_state = str(row.get("TableState", "")).lower()
            state = _TABLE_STATES.get(raw_state, TableSyncState.PENDING)
            if raw_state in _TABLE_PROBLEM_STATES:
                problems.append(f"{name}: {row.get('TableState')} ({row.get('FullLoadErrorRows', 0)} error rows)")
            validation = str(row.get("ValidationState", "")).lower()
            failed = int(row.get("ValidationFailedRecords", 0) or 0)
            if validation in _VALIDATION_PROBLEM_STATES or failed:
                problems.append(
                    f"{name}: DMS validation {row.get('ValidationState')} ({failed} failed, "
                    f"{row.get('ValidationSuspendedRecords', 0)} suspended records)"
                )
            tables.append(TableStatus(name, state, rows_copied=row.get("FullLoadRows")))
        return sorted(tables, key=lambda t: t.table), problems

    def _latency_seconds(self) -> float | None:
        if not self.target.metric_dimensions:
            return None
        end = self._now()
        dims = [{"Name": k, "Value": v} for k, v in sorted(self.target.metric_dimensions.items())]
        queries = [
            {
                "Id": metric.lower(),
                "MetricStat": {
                    "Metric": {"Namespace": "AWS/DMS", "MetricName": metric, "Dimensions": dims},
                    "Period": 60,
                    "Stat": "Maximum",
                },
                "ReturnData": True,
            }
            for metric in ("CDCLatencySource", "CDCLatencyTarget")
        ]
        result = self._cloudwatch.get_metric_data(
            MetricDataQueries=queries, StartTime=end - self._window, EndTime=end, ScanBy="TimestampDescending"
        )
        latest = [r["Values"][0] for r in result.get("MetricDataResults", []) if r.get("Values")]
        return float(max(latest)) if latest else None


# -- table mappings (pure: the stack builds the tasks' mappings with it) ---------------------

_DMS_UNSUPPORTED = re.compile(r"[?\[\]]")


class TableMappingError(ValueError):
    pass


def table_mappings(include: Iterable[str], exclude: Iterable[str], *, fence_marker: bool = False) -> dict[str, Any]:
    """DMS selection rules for 'schema.table' patterns: one include rule per `include`
    pattern, then one exclude rule per `exclude` pattern. DMS's only wildcard is '%', so '*'
    becomes '%'; '?' and '[...]' have no DMS form and are refused with the pattern named.
    `fence_marker`: the migration task also carries `FENCE_MARKER_TABLE` (the cutover waits for its
    rows on the target, `dms_fence`); an exclude pattern that would drop it is refused."""
    rules: list[dict[str, Any]] = []
    patterns = [("include", p) for p in include] + [("exclude", p) for p in exclude]
    if fence_marker:
        marker = f"{FENCE_MARKER_TABLE.schema}.{FENCE_MARKER_TABLE.name}"
        blocking = [p for action, p in patterns if action == "exclude" and fnmatch.fnmatchcase(marker, p)]
        if blocking:
            raise TableMappingError(
                f"tables.exclude pattern {blocking[0]!r} also excludes {marker}, the table the cutover's fence marker "
                "travels in: narrow the pattern"
            )
        patterns.append(("include", marker))
    for action, pattern in patterns:
        if _DMS_UNSUPPORTED.search(pattern):
            raise TableMappingError(
                f"tables.{action} pattern {pattern!r}: DMS matches only '*' (as '%'); "
                "replace '?' and '[...]' with '*' or list the tables"
            )
        schema, _, table = pattern.partition(".")
        number = str(len(rules) + 1)
        rules.append(
            {
                "rule-type": "selection",
                "rule-id": number,
                "rule-name": f"{action}-{number}",
                "object-locator": {"schema-name": schema.replace("*", "%"), "table-name": table.replace("*", "%")},
                "rule-action": action,
            }
        )
    return {"rules": rules}


def matches(mappings: dict[str, Any], table: str) -> bool:
    """Whether DMS would select 'schema.table' under `mappings` (for tests and preflight)."""
    schema, _, name = table.partition(".")

    def hit(rule: dict[str, Any]) -> bool:
        locator = rule["object-locator"]
        return fnmatch.fnmatchcase(schema, locator["schema-name"].replace("%", "*")) and fnmatch.fnmatchcase(
            name, locator["table-name"].replace("%", "*")
        )

    actions = {rule["rule-action"] for rule in mappings["rules"] if hit(rule)}
    return "include" in actions and "exclude" not in actions
