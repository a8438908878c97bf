"""Monitoring construct: the alarms, the composite, the rollback rule and the dashboard."""

from __future__ import annotations

import json
from typing import Any

from aws_cdk.assertions import Match

from lambdas.core import telemetry
from tests.infrastructure.conftest import Synth


def _alarms(result: Synth) -> dict[str, dict[str, Any]]:
    return {a["Properties"]["AlarmName"]: a["Properties"] for a in result.resources("AWS::CloudWatch::Alarm").values()}


def test_every_alarm_of_the_brief_exists(example: Synth) -> None:
    alarms = _alarms(example)
    assert set(alarms) == {
        "zdm-shop-orders-replication-lag",
        "zdm-shop-orders-replication-failed",
        "zdm-shop-orders-dms-c-d-c-latency-source",
        "zdm-shop-orders-dms-c-d-c-latency-target",
        "zdm-shop-orders-dms-task-failed",
        "zdm-shop-orders-dms-task-errors",
        "zdm-shop-orders-slot-retained-wal",
        "zdm-shop-orders-slot-lost",
        "zdm-shop-orders-target-database-errors",
        "zdm-shop-orders-app-error-rate",
        "zdm-shop-orders-rollback-not-ready",
        "zdm-shop-orders-reverse-slot-retained-wal",
    }
    latency = alarms["zdm-shop-orders-dms-c-d-c-latency-target"]
    assert latency["Namespace"] == "AWS/DMS" and latency["Threshold"] == 60
    assert {d["Name"]: d["Value"] for d in latency["Dimensions"]} == {
        "ReplicationInstanceIdentifier": "zdm-shop-orders",
        "ReplicationTaskIdentifier": "zdm-shop-orders-load-cdc",
    }
    app = alarms["zdm-shop-orders-app-error-rate"]
    assert (app["Namespace"], app["MetricName"], app["Threshold"]) == ("Shop/API", "ErrorRate", 2.5)


def test_custom_metric_alarms_use_the_handler_names_and_dimensions(example: Synth) -> None:
    alarms = _alarms(example)
    for name, metric in (
        ("zdm-shop-orders-replication-lag", telemetry.REPLICATION_LAG_SECONDS),
        ("zdm-shop-orders-slot-retained-wal", telemetry.SLOT_RETAINED_WAL_BYTES),
        ("zdm-shop-orders-slot-lost", telemetry.SLOT_LOST),
    ):
        alarm = alarms[name]
        assert (alarm["Namespace"], alarm["MetricName"]) == ("Zdm", metric)
        assert {d["Name"]: d["Value"] for d in alarm["Dimensions"]} == {"service": "zdm", "migration": "shop-orders"}
    assert alarms["zdm-shop-orders-slot-retained-wal"]["Threshold"] == 10 * 1024**3


def test_serverless_latency_alarms_use_the_replication_config_dimension(serverless: Synth) -> None:
    alarms = _alarms(serverless)
    latency = alarms["zdm-shop-payments-dms-c-d-c-latency-source"]
    assert latency["Dimensions"] == [
        {"Name": "ReplicationConfigId", "Value": "123456789012:zdm-shop-payments-load-cdc"}
    ]
    rds = alarms["zdm-shop-payments-source-slot-lag"]
    assert (rds["Namespace"], rds["MetricName"]) == ("AWS/RDS", "OldestReplicationSlotLag")


def test_target_errors_are_counted_from_the_target_postgresql_log(example: Synth) -> None:
    example.template.has_resource_properties(
        "AWS::Logs::MetricFilter",
        {
            "LogGroupName": "/aws/rds/cluster/shop-orders-pg16/postgresql",
            "MetricTransformations": [
                Match.object_like({"MetricNamespace": "Zdm/shop-orders", "MetricName": "TargetDatabaseErrors"})
            ],
        },
    )


WINDOW_ALARMS = {"zdm-shop-orders-rollback-not-ready", "zdm-shop-orders-reverse-slot-retained-wal"}


def test_composite_covers_every_alarm_but_the_rollback_window_s_and_the_file_alarms(example: Synth) -> None:
    composite = next(iter(example.resources("AWS::CloudWatch::CompositeAlarm").values()))["Properties"]
    rule = json.dumps(composite["AlarmRule"])
    assert composite["AlarmName"] == "zdm-shop-orders-health"
    for logical_id, alarm in example.resources("AWS::CloudWatch::Alarm").items():
        # A broken reverse replication must not roll back: the rollback is what it says would be refused
        assert (logical_id in rule) is (alarm["Properties"]["AlarmName"] not in WINDOW_ALARMS), logical_id
    for name in example.migration.alarms.names:
        assert f"alarm:{name}" in rule


def test_the_rollback_window_alarms_read_what_the_gate_publishes(example: Synth) -> None:
    alarms = _alarms(example)
    ready = alarms["zdm-shop-orders-rollback-not-ready"]
    assert (ready["Namespace"], ready["MetricName"], ready["Statistic"]) == ("Zdm", telemetry.ROLLBACK_READY, "Minimum")
    assert (ready["ComparisonOperator"], ready["Threshold"], ready["EvaluationPeriods"]) == ("LessThanThreshold", 1, 1)
    assert ready["TreatMissingData"] == "notBreaching"
    wal = alarms["zdm-shop-orders-reverse-slot-retained-wal"]
    assert (wal["MetricName"], wal["Threshold"]) == (telemetry.REVERSE_SLOT_RETAINED_WAL_BYTES, 10 * 1024**3)
    for alarm in (ready, wal):
        assert {d["Name"]: d["Value"] for d in alarm["Dimensions"]} == {"service": "zdm", "migration": "shop-orders"}


def test_rule_on_the_composite_entering_alarm_invokes_the_rollback_function(example: Synth) -> None:
    composite_id = next(iter(example.resources("AWS::CloudWatch::CompositeAlarm")))
    rollback_id = next(
        k
        for k, f in example.resources("AWS::Lambda::Function").items()
        if f["Properties"].get("Handler") == "lambdas.handlers.rollback.handler"
    )
    example.template.has_resource_properties(
        "AWS::Events::Rule",
        {
            "EventPattern": {
                "source": ["aws.cloudwatch"],
                "detail-type": ["CloudWatch Alarm State Change"],
                "resources": [{"Fn::GetAtt": [composite_id, "Arn"]}],
                "detail": {"state": {"value": ["ALARM"]}},
            },
            "Targets": [
                Match.object_like(
                    {
                        "Arn": {"Fn::GetAtt": [rollback_id, "Arn"]},
                        "DeadLetterConfig": Match.any_value(),
                        "RetryPolicy": Match.any_value(),
                    }
                )
            ],
        },
    )
    example.template.has_resource_properties(
        "AWS::Lambda::Permission",
        {
            "FunctionName": {"Fn::GetAtt": [rollback_id, "Arn"]},
            "Principal": "events.amazonaws.com",
            "SourceArn": Match.any_value(),
        },
    )


def test_dashboard_shows_lag_weights_validation_and_alarms(example: Synth) -> None:
    dashboard = next(iter(example.resources("AWS::CloudWatch::Dashboard").values()))["Properties"]
    body = json.dumps(dashboard["DashboardBody"])
    for needle in (
        telemetry.REPLICATION_LAG_SECONDS,
        "CDCLatencyTarget",
        telemetry.READ_WEIGHT_TARGET_PERCENT,
        telemetry.VALIDATION_CHUNKS_DONE,
        "alarms",
    ):
        assert needle in body
