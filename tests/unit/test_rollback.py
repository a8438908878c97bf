"""Alarm-triggered rollback over moto's Step Functions: stop the running migration, start one rollback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws

from lambdas.core.rollback import AlarmChange, rollback_execution_name, trigger_rollback

REGION = "eu-west-1"
DEFINITION = json.dumps({"StartAt": "Wait", "States": {"Wait": {"Type": "Wait", "Seconds": 3600, "End": True}}})


def _alarm_event(state: str = "ALARM", event_id: str = "3f4e-event") -> dict[str, Any]:
    return {
        "id": event_id,
        "time": "2026-11-25T12:00:00Z",
        "detail-type": "CloudWatch Alarm State Change",
        "source": "aws.cloudwatch",
        "detail": {"alarmName": "zdm-shop-orders-health", "state": {"value": state, "reason": "Threshold Crossed"}},
    }


@pytest.fixture
def machine() -> Iterator[tuple[Any, str]]:
    with mock_aws():
        iam = boto3.client("iam", region_name=REGION)
        role = iam.create_role(RoleName="sfn", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
        sfn = boto3.client("stepfunctions", region_name=REGION)
        arn = sfn.create_state_machine(name="zdm-shop-orders", definition=DEFINITION, roleArn=role)["stateMachineArn"]
        yield sfn, arn


def test_alarm_stops_the_running_migration_and_starts_one_rollback(machine: tuple[Any, str]) -> None:
    # Given a migration execution running
    sfn, arn = machine
    running = sfn.start_execution(stateMachineArn=arn, name="migrate-1", input="{}")["executionArn"]
    # When the composite alarm enters ALARM
    result = trigger_rollback(sfn, arn, "shop-orders", AlarmChange.from_event(_alarm_event()))
    # Then the migration is stopped with the alarm as cause, and a rollback execution started
    assert result.stopped == [running]
    stopped = sfn.describe_execution(executionArn=running)
    assert stopped["status"] == "ABORTED"
    assert result.started is not None
    started = sfn.describe_execution(executionArn=result.started)
    assert started["name"] == "rollback-3f4e-event"
    payload = json.loads(started["input"])
    assert payload["action"] == "rollback" and payload["alarm"]["name"] == "zdm-shop-orders-health"
    assert payload["reason"].startswith("zdm-shop-orders-health entered ALARM at ")
    assert payload["stopped_executions"] == [running]


def test_a_redelivered_event_does_not_start_a_second_rollback(machine: tuple[Any, str]) -> None:
    sfn, arn = machine
    sfn.start_execution(stateMachineArn=arn, name="migrate-1", input="{}")
    change = AlarmChange.from_event(_alarm_event())
    first = trigger_rollback(sfn, arn, "shop-orders", change)
    second = trigger_rollback(sfn, arn, "shop-orders", change)
    assert first.started and second.skipped == "a rollback is already running"
    names = [e["name"] for e in sfn.list_executions(stateMachineArn=arn)["executions"]]
    assert names.count(rollback_execution_name(change)) == 1


def test_ok_state_changes_are_ignored(machine: tuple[Any, str]) -> None:
    sfn, arn = machine
    result = trigger_rollback(sfn, arn, "shop-orders", AlarmChange.from_event(_alarm_event(state="OK")))
    assert result.skipped == "alarm zdm-shop-orders-health is OK, not ALARM"
    assert sfn.list_executions(stateMachineArn=arn)["executions"] == []


def test_an_alarm_before_any_migration_ran_rolls_nothing_back(machine: tuple[Any, str]) -> None:
    sfn, arn = machine
    result = trigger_rollback(sfn, arn, "shop-orders", AlarmChange.from_event(_alarm_event()))
    assert result.skipped == "the migration has never run: nothing to roll back"


def test_an_alarm_after_the_migration_finished_still_rolls_back(machine: tuple[Any, str]) -> None:
    # Given a migration execution that ended (e.g. after cutover, within the rollback window)
    sfn, arn = machine
    done = sfn.start_execution(stateMachineArn=arn, name="migrate-1", input="{}")["executionArn"]
    sfn.stop_execution(executionArn=done)
    # When the alarm fires / Then nothing is stopped and a rollback starts
    result = trigger_rollback(sfn, arn, "shop-orders", AlarmChange.from_event(_alarm_event()))
    assert result.stopped == [] and result.started


def test_the_handler_reads_its_state_machine_from_the_environment(
    machine: tuple[Any, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from lambdas.handlers import rollback

    sfn, arn = machine
    sfn.start_execution(stateMachineArn=arn, name="migrate-1", input="{}")
    monkeypatch.setenv("ZDM_STATE_MACHINE_ARN", arn)
    monkeypatch.setenv("ZDM_MIGRATION", "shop-orders")
    monkeypatch.setenv("POWERTOOLS_TRACE_DISABLED", "1")
    monkeypatch.setattr(rollback, "_stepfunctions", lambda: sfn)

    class Context:
        function_name = "zdm-shop-orders-rollback"
        memory_limit_in_mb = 256
        invoked_function_arn = "arn:aws:lambda:eu-west-1:123456789012:function:zdm-shop-orders-rollback"
        aws_request_id = "req-1"

    result = rollback.handler(_alarm_event(), Context())  # type: ignore[arg-type]
    assert result["started"] and len(result["stopped"]) == 1


def test_a_redelivered_alarm_event_after_its_rollback_ended_changes_nothing(machine: tuple[Any, str]) -> None:
    sfn, arn = machine
    # Given an alarm event that stopped migrate-1 and started its rollback, which has since ended
    sfn.start_execution(stateMachineArn=arn, name="migrate-1", input="{}")
    change = AlarmChange.from_event(_alarm_event())
    first = trigger_rollback(sfn, arn, "shop", change)
    assert first.started is not None
    sfn.stop_execution(executionArn=first.started)  # the rollback execution ended (moto: stopped)
    # And the operator has started the migration again
    again = sfn.start_execution(stateMachineArn=arn, name="migrate-2", input="{}")["executionArn"]
    # When EventBridge / Lambda deliver the same event once more (at-least-once delivery)
    result = trigger_rollback(sfn, arn, "shop", change)
    # Then the new execution keeps running and the duplicate is recognised as already handled
    assert sfn.describe_execution(executionArn=again)["status"] == "RUNNING"
    assert result.started is None and result.skipped
