"""The dms engine over moto's DMS and CloudWatch, with botocore's Stubber for the calls moto
lacks (DescribeTableStatistics, the DMS Serverless replication calls)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from moto import mock_aws
from moto.dms.models import dms_backends

from lambdas.core.engines.base import Phase, TableSyncState
from lambdas.core.engines.dms import (
    DmsBehind,
    DmsEngine,
    DmsTarget,
    DmsTaskBusy,
    TableMappingError,
    matches,
    table_mappings,
)

REGION = "eu-west-1"
ACCOUNT = "123456789012"
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


class Recorder:
    """A DMS client that routes DescribeTableStatistics to a stubbed client and records starts."""

    def __init__(self, moto_client: Any, stubbed: Any) -> None:
        self._moto = moto_client
        self._stubbed = stubbed
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        target = self._stubbed if name in ("describe_table_statistics",) else self._moto

        def call(**kwargs: Any) -> Any:
            self.calls.append((name, kwargs))
            return getattr(target, name)(**kwargs)

        return call


@pytest.fixture
def aws() -> Iterator[None]:
    with mock_aws():
        yield


def _task(dms: Any, *, migration_type: str = "full-load-and-cdc") -> str:
    mappings = table_mappings(["public.*"], ["public.tmp_*"])
    arn: str = dms.create_replication_task(
        ReplicationTaskIdentifier="zdm-shop-orders-load-cdc",
        SourceEndpointArn=f"arn:aws:dms:{REGION}:{ACCOUNT}:endpoint:SRC",
        TargetEndpointArn=f"arn:aws:dms:{REGION}:{ACCOUNT}:endpoint:TGT",
        ReplicationInstanceArn=f"arn:aws:dms:{REGION}:{ACCOUNT}:rep:zdm-shop-orders",
        MigrationType=migration_type,
        TableMappings=json.dumps(mappings),
    )["ReplicationTask"]["ReplicationTaskArn"]
    return arn


def _set_status(arn: str, status: str) -> None:
    dms_backends[ACCOUNT][REGION].replication_tasks[arn].status = status


DIMENSIONS = {
    "ReplicationInstanceIdentifier": "zdm-shop-orders",
    "ReplicationTaskIdentifier": "zdm-shop-orders-load-cdc",
}


def _engine(arn: str, stubbed: Any, migration_type: str = "full-load-and-cdc") -> tuple[DmsEngine, Recorder]:
    client = Recorder(boto3.client("dms", region_name=REGION), stubbed)
    cloudwatch = boto3.client("cloudwatch", region_name=REGION)
    target = DmsTarget("task", arn, DIMENSIONS, migration_type)  # type: ignore[arg-type]
    return DmsEngine(client, cloudwatch, target, now=lambda: NOW), client


def _stats(rows: list[dict[str, Any]], arn: str) -> tuple[Any, Stubber]:
    client = boto3.client("dms", region_name=REGION)
    stubber = Stubber(client)
    stubber.add_response(
        "describe_table_statistics", {"TableStatistics": rows}, {"ReplicationTaskArn": arn, "MaxRecords": 500}
    )
    stubber.activate()
    return client, stubber


def _table(name: str, state: str, rows: int, **extra: Any) -> dict[str, Any]:
    schema, _, table = name.partition(".")
    return {"SchemaName": schema, "TableName": table, "TableState": state, "FullLoadRows": rows, **extra}


def test_start_begins_a_ready_task_fresh_and_a_stopped_task_resumes(aws: None) -> None:
    # Given a task DMS has created and not run
    dms = boto3.client("dms", region_name=REGION)
    arn = _task(dms)
    _set_status(arn, "ready")
    engine, calls = _engine(arn, None)
    # When started / Then it starts with 'start-replication'
    first = engine.start()
    assert not first.already_running
    assert (
        "start_replication_task",
        {"ReplicationTaskArn": arn, "StartReplicationTaskType": "start-replication"},
    ) in calls.calls
    # And a second start while it runs does nothing (idempotent), reporting the tables it copies
    stubbed, stubber = _stats([_table("public.orders", "Table completed", 10)], arn)
    engine._dms = Recorder(boto3.client("dms", region_name=REGION), stubbed)  # type: ignore[attr-defined]
    again = engine.start()
    assert again.already_running and again.tables == ["public.orders"]
    stubber.assert_no_pending_responses()
    # And after a stop, start resumes where it stopped
    engine.stop()
    assert dms.describe_replication_tasks()["ReplicationTasks"][0]["Status"] == "stopped"
    engine._dms = calls  # type: ignore[attr-defined]
    engine.start()
    assert calls.calls[-1] == (
        "start_replication_task",
        {"ReplicationTaskArn": arn, "StartReplicationTaskType": "resume-processing"},
    )
    # And, stopped again, a start asked to reload loads every table again (a migration started anew)
    engine.stop()
    engine.start(reload=True)
    assert calls.calls[-1] == (
        "start_replication_task",
        {"ReplicationTaskArn": arn, "StartReplicationTaskType": "reload-target"},
    )


def test_a_task_that_never_ran_starts_fresh_even_when_asked_to_reload(aws: None) -> None:
    # Given a task DMS has created and not run (DMS refuses any other type for a first run)
    dms = boto3.client("dms", region_name=REGION)
    arn = _task(dms)
    _set_status(arn, "ready")
    engine, calls = _engine(arn, None)
    # When started with reload / Then it starts with 'start-replication', and has loaded no table before
    assert engine.loaded_tables() == []
    engine.start(reload=True)
    assert calls.calls[-1] == (
        "start_replication_task",
        {"ReplicationTaskArn": arn, "StartReplicationTaskType": "start-replication"},
    )


def test_start_of_a_task_being_created_asks_for_a_retry(aws: None) -> None:
    dms = boto3.client("dms", region_name=REGION)
    arn = _task(dms)  # moto leaves it 'creating'
    engine, _ = _engine(arn, None)
    with pytest.raises(DmsTaskBusy, match="is creating"):
        engine.start()


def test_status_reports_each_table_and_the_cdc_latency(aws: None) -> None:
    # Given a running task mid-way through the full load, and latency metrics in CloudWatch
    dms = boto3.client("dms", region_name=REGION)
    arn = _task(dms)
    _set_status(arn, "running")
    cloudwatch = boto3.client("cloudwatch", region_name=REGION)
    dims = [{"Name": k, "Value": v} for k, v in DIMENSIONS.items()]
    for name, value in (("CDCLatencySource", 1.5), ("CDCLatencyTarget", 4.0)):
        cloudwatch.put_metric_data(
            Namespace="AWS/DMS",
            MetricData=[
                {"MetricName": name, "Dimensions": dims, "Value": value, "Timestamp": NOW - timedelta(minutes=1)}
            ],
        )
    rows = [
        _table("public.orders", "Table completed", 1000),
        _table("public.items", "Full load", 500),
        _table("public.events", "Before load", 0),
    ]
    stubbed, stubber = _stats(rows, arn)
    engine, _ = _engine(arn, stubbed)
    # moto reports FullLoadProgressPercent 100; the tables say the load is not done
    status = engine.status()
    stubber.assert_no_pending_responses()
    assert status.phase is Phase.COPYING
    assert [(t.table, t.state, t.rows_copied) for t in status.tables] == [
        ("public.events", TableSyncState.PENDING, 0),
        ("public.items", TableSyncState.COPYING, 500),
        ("public.orders", TableSyncState.COPIED, 1000),
    ]
    assert status.lag_seconds == 4.0
    assert status.problems == []


def test_once_every_table_is_loaded_the_task_is_streaming_and_tables_ready(aws: None) -> None:
    dms = boto3.client("dms", region_name=REGION)
    arn = _task(dms)
    _set_status(arn, "running")
    stubbed, _ = _stats([_table("public.orders", "Table completed", 1000, ValidationState="Validated")], arn)
    engine, _ = _engine(arn, stubbed)
    status = engine.status()
    assert status.phase is Phase.STREAMING
    assert status.tables[0].state is TableSyncState.READY
    assert status.copy_done
    assert status.lag_seconds is None  # no latency metrics published yet


def test_table_errors_and_validation_failures_are_problems(aws: None) -> None:
    dms = boto3.client("dms", region_name=REGION)
    arn = _task(dms)
    _set_status(arn, "running")
    rows = [
        _table("public.orders", "Table error", 10, FullLoadErrorRows=3),
        _table("public.items", "Table completed", 10, ValidationState="Mismatched records", ValidationFailedRecords=7),
    ]
    stubbed, _ = _stats(rows, arn)
    engine, _ = _engine(arn, stubbed)
    problems = engine.status().problems
    assert "public.orders: Table error (3 error rows)" in problems
    assert "public.items: DMS validation Mismatched records (7 failed, 0 suspended records)" in problems


def test_a_failed_task_reports_phase_failed_with_the_reason(aws: None) -> None:
    dms = boto3.client("dms", region_name=REGION)
    arn = _task(dms)
    _set_status(arn, "failed")
    stubbed, _ = _stats([], arn)
    engine, _ = _engine(arn, stubbed)
    assert engine.status().phase is Phase.FAILED


def test_stop_leaves_a_stopped_task_alone_and_teardown_stops(aws: None) -> None:
    dms = boto3.client("dms", region_name=REGION)
    arn = _task(dms)
    _set_status(arn, "stopped")
    engine, calls = _engine(arn, None)
    engine.stop()
    assert not [c for c in calls.calls if c[0] == "stop_replication_task"]
    _set_status(arn, "running")
    result = engine.teardown()
    assert dms.describe_replication_tasks()["ReplicationTasks"][0]["Status"] == "stopped"
    assert result.removed == ["task zdm-shop-orders-load-cdc stopped (deleted with the stack)"]


def test_serverless_replication_is_started_and_read_through_the_replication_calls() -> None:
    # moto has no DMS Serverless: every call is stubbed
    arn = f"arn:aws:dms:{REGION}:{ACCOUNT}:replication-config:zdm-shop-payments-load-cdc"
    client = boto3.client("dms", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    stubber = Stubber(client)
    where = {"Filters": [{"Name": "replication-config-arn", "Values": [arn]}]}
    stubber.add_response("describe_replications", {"Replications": []}, where)
    stubber.add_response(
        "start_replication",
        {"Replication": {"ReplicationConfigArn": arn, "Status": "starting"}},
        {"ReplicationConfigArn": arn, "StartReplicationType": "start-replication"},
    )
    running = {"ReplicationConfigArn": arn, "Status": "running", "ReplicationStats": {"FullLoadProgressPercent": 100}}
    stubber.add_response("describe_replications", {"Replications": [running]}, where)
    stubber.add_response(
        "describe_replication_table_statistics",
        {"ReplicationTableStatistics": [_table("ledger.entries", "Table completed", 42)]},
        {"ReplicationConfigArn": arn, "MaxRecords": 500},
    )
    cloudwatch = boto3.client("cloudwatch", region_name=REGION, aws_access_key_id="x", aws_secret_access_key="x")
    cw_stub = Stubber(cloudwatch)
    cw_stub.add_response(
        "get_metric_data",
        {
            "MetricDataResults": [
                {"Id": "cdclatencysource", "Values": [2.0]},
                {"Id": "cdclatencytarget", "Values": [3.0]},
            ]
        },
    )
    with stubber, cw_stub:
        target = DmsTarget("serverless", arn, {"ReplicationConfigId": f"{ACCOUNT}:zdm-shop-payments-load-cdc"})
        engine = DmsEngine(client, cloudwatch, target, now=lambda: NOW)
        assert engine.start().already_running is False
        status = engine.status()
    assert status.phase is Phase.STREAMING
    assert [(t.table, t.state) for t in status.tables] == [("ledger.entries", TableSyncState.READY)]
    assert status.lag_seconds == 3.0
    stubber.assert_no_pending_responses()


def test_target_round_trips_through_the_environment_json() -> None:
    target = DmsTarget("task", "arn:aws:dms:eu-west-1:123456789012:task:T", {"A": "b"}, "cdc")
    assert DmsTarget.from_json(target.to_json()) == target


def test_table_mappings_follow_include_then_exclude() -> None:
    mappings = table_mappings(["public.*", "sales.order*"], ["public.tmp_*"])
    assert [r["rule-action"] for r in mappings["rules"]] == ["include", "include", "exclude"]
    assert mappings["rules"][1]["object-locator"] == {"schema-name": "sales", "table-name": "order%"}
    assert (
        matches(mappings, "sales.orders")
        and not matches(mappings, "public.tmp_x")
        and not matches(mappings, "hr.people")
    )


def test_table_mappings_refuse_patterns_dms_cannot_express() -> None:
    with pytest.raises(TableMappingError, match=r"tables\.exclude pattern 'public\.t\[12\]'"):
        table_mappings(["public.*"], ["public.t[12]"])


def test_the_migration_task_includes_the_fence_marker_and_refuses_an_exclude_that_drops_it() -> None:
    # Given the file's patterns with the fence marker asked for
    mappings = table_mappings(["public.*"], ["public.tmp_*"], fence_marker=True)
    # Then the marker table is selected after the file's rules, and nothing else changes
    assert matches(mappings, "_zdm.dms_fence_markers") and matches(mappings, "public.orders")
    assert not matches(mappings, "public.tmp_x")
    # And an exclude pattern that also matches the marker is refused, naming it
    with pytest.raises(
        TableMappingError, match=r"tables\.exclude pattern '\*\.\*' also excludes _zdm\.dms_fence_markers"
    ):
        table_mappings(["public.*"], ["*.*"], fence_marker=True)


class MinuteClock:
    """The engine's clock, moved a minute on by each of the engine's sleeps; each minute may bring a
    CDCLatencyTarget datapoint (as DMS publishes one a minute)."""

    def __init__(self, cloudwatch: Any, latencies: list[float | None]) -> None:
        self.now = NOW
        self._cloudwatch = cloudwatch
        self._latencies = list(latencies)
        self.sleeps = 0

    def __call__(self) -> datetime:
        return self.now

    def sleep(self, _: float) -> None:
        self.sleeps += 1
        self.now += timedelta(minutes=1)
        latency = self._latencies.pop(0) if self._latencies else None
        if latency is not None:
            publish_latency(self._cloudwatch, self.now - timedelta(seconds=30), latency)


def publish_latency(cloudwatch: Any, at: datetime, seconds: float) -> None:
    cloudwatch.put_metric_data(
        Namespace="AWS/DMS",
        MetricData=[
            {
                "MetricName": "CDCLatencyTarget",
                "Dimensions": [{"Name": k, "Value": v} for k, v in sorted(DIMENSIONS.items())],
                "Timestamp": at,
                "Value": seconds,
                "Unit": "Seconds",
            }
        ],
    )


def _catch_up_engine(latencies: list[float | None], before: float | None = None) -> tuple[DmsEngine, MinuteClock]:
    """`before`: the latency of the minute before the call, if DMS published one."""
    cloudwatch = boto3.client("cloudwatch", region_name=REGION)
    clock = MinuteClock(cloudwatch, latencies)
    if before is not None:
        publish_latency(cloudwatch, NOW - timedelta(seconds=30), before)
    target = DmsTarget("task", f"arn:aws:dms:{REGION}:{ACCOUNT}:task:T", DIMENSIONS, "full-load-and-cdc")
    return DmsEngine(boto3.client("dms", region_name=REGION), cloudwatch, target, now=clock), clock


def test_catch_up_waits_until_the_target_latency_places_the_apply_past_the_call(aws: None) -> None:
    # Given DMS 90 s behind in the minute before the call, then 70 s, then 10 s behind
    engine, clock = _catch_up_engine([70.0, 10.0], before=90.0)
    # When validation asks DMS to catch up with everything committed before now
    applied = engine.catch_up(timeout=600, sleep=clock.sleep)
    # Then it waited two minutes: only the datapoint 10 s behind places the apply past the call (+5 s margin)
    assert clock.sleeps == 2
    assert applied >= NOW + timedelta(seconds=5)


def test_catch_up_gives_up_with_a_reason_when_dms_stays_behind(aws: None) -> None:
    # Given DMS 10 minutes behind, and no time to wait
    engine, clock = _catch_up_engine([], before=600.0)
    # Then the wait fails as a timeout (validation reports the rows as not settled), naming how far DMS is
    with pytest.raises(DmsBehind, match=r"had not applied the changes up to 12:00:05 UTC within 0 s \(applied through"):
        engine.catch_up(timeout=0, sleep=clock.sleep)
    assert issubclass(DmsBehind, TimeoutError)


def test_catch_up_without_any_datapoint_does_not_pass(aws: None) -> None:
    engine, clock = _catch_up_engine([])
    with pytest.raises(DmsBehind, match="no CDCLatencyTarget datapoint"):
        engine.catch_up(timeout=0, sleep=clock.sleep)


def test_a_table_still_loading_keeps_the_phase_copying(aws: None) -> None:
    # Given the task at 100% with one table loaded and one being reloaded
    dms = boto3.client("dms", region_name=REGION)
    arn = _task(dms)
    _set_status(arn, "running")
    rows = [_table("public.orders", "Table completed", 1000), _table("public.items", "Table is being reloaded", 500)]
    stubbed, _ = _stats(rows, arn)
    engine, _ = _engine(arn, stubbed)
    # When its status is read / Then it is still copying (once: streaming, and the machine moved on)
    status = engine.status()
    assert any(t.state is TableSyncState.COPYING for t in status.tables)
    assert status.phase is Phase.COPYING
