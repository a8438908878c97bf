"""The local Step Functions runner: a real ASL interpreter (moto's) with in-process Lambda handlers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from rehearsal.stepfunctions import LocalStateMachine, StateMachineError

ASL = {
    "StartAt": "Settings",
    "States": {
        "Settings": {
            "Type": "Task",
            "Resource": "arn:aws:states:::aws-sdk:ssm:getParameter",
            "Parameters": {"Name": "${ParamName}"},
            "ResultSelector": {"value.$": "States.StringToJson($.Parameter.Value)"},
            "ResultPath": "$.settings",
            "Next": "Flaky",
        },
        "Flaky": {
            "Type": "Task",
            "Resource": "arn:aws:states:::lambda:invoke",
            "Parameters": {"FunctionName": "${FlakyFunctionArn}", "Payload.$": "$"},
            "ResultSelector": {"attempts.$": "$.Payload.attempts"},
            "ResultPath": "$.flaky",
            "Retry": [{"ErrorEquals": ["TransientError"], "IntervalSeconds": 1, "MaxAttempts": 3, "BackoffRate": 1.0}],
            "Next": "Pause",
        },
        "Pause": {"Type": "Wait", "SecondsPath": "$.wait_seconds", "Next": "Chunks"},
        "Chunks": {
            "Type": "Map",
            "ItemsPath": "$.settings.value.chunks",
            "ItemProcessor": {
                "ProcessorConfig": {"Mode": "DISTRIBUTED", "ExecutionType": "STANDARD"},
                "StartAt": "Square",
                "States": {
                    "Square": {
                        "Type": "Task",
                        "Resource": "arn:aws:states:::lambda:invoke",
                        "Parameters": {"FunctionName": "${SquareFunctionArn}", "Payload.$": "$"},
                        "OutputPath": "$.Payload",
                        "End": True,
                    }
                },
            },
            "ResultPath": "$.squares",
            "Next": "Broken",
        },
        "Broken": {
            "Type": "Task",
            "Resource": "arn:aws:states:::lambda:invoke",
            "Parameters": {"FunctionName": "${BrokenFunctionArn}", "Payload": {}},
            "Catch": [{"ErrorEquals": ["DataError"], "ResultPath": "$.caught", "Next": "Done"}],
            "Next": "Done",
        },
        "Done": {"Type": "Succeed"},
    },
}


class TransientError(Exception):
    pass


class DataError(Exception):
    pass


def test_definition_runs_with_retry_map_wait_catch_and_sdk_integration(tmp_path: Path) -> None:
    # Given a definition using an SDK integration, Retry, Wait, a distributed Map and Catch
    path = tmp_path / "m.asl.json"
    path.write_text(json.dumps(ASL))
    calls = {"flaky": 0}

    def flaky(event: dict[str, Any], context: Any) -> dict[str, Any]:
        calls["flaky"] += 1
        if calls["flaky"] < 3:
            raise TransientError("try again")
        return {"attempts": calls["flaky"]}

    def square(event: dict[str, Any], context: Any) -> dict[str, Any]:
        return {"n": event["n"], "square": event["n"] ** 2}

    def broken(event: dict[str, Any], context: Any) -> None:
        raise DataError("row 42 differs")

    machine = LocalStateMachine(
        path,
        {"FlakyFunctionArn": flaky, "SquareFunctionArn": square, "BrokenFunctionArn": broken},
        values={"ParamName": "/zdm/test/settings"},
        parameters={"/zdm/test/settings": json.dumps({"chunks": [{"n": i} for i in range(12)]})},
    )
    seen: list[str] = []
    # When it executes with a zero wait given in the input
    result = machine.run({"wait_seconds": 0}, timeout=60, on_event=lambda e: seen.append(e["type"]))
    # Then the retried task succeeded on its third attempt, every chunk ran, the data error was caught
    assert result.status == "SUCCEEDED", (result.error, result.cause)
    assert result.output is not None
    assert result.output["flaky"] == {"attempts": 3}
    assert [s["square"] for s in result.output["squares"]] == [i * i for i in range(12)]
    assert result.output["caught"]["Error"] == "DataError"
    assert "row 42 differs" in result.output["caught"]["Cause"]
    # And the history was streamed as it happened
    assert seen[0] == "ExecutionStarted" and seen[-1] == "ExecutionSucceeded"
    assert "MapRunStarted" in seen and seen.count("TaskFailed") >= 3


def test_missing_substitution_is_named(tmp_path: Path) -> None:
    path = tmp_path / "m.asl.json"
    path.write_text(json.dumps(ASL))
    with pytest.raises(StateMachineError, match="BrokenFunctionArn, FlakyFunctionArn, ParamName, SquareFunctionArn"):
        LocalStateMachine(path, {})


LIMITED = {
    "StartAt": "Slow",
    "States": {
        "Slow": {
            "Type": "Task",
            "Resource": "arn:aws:states:::lambda:invoke",
            "Parameters": {"FunctionName": "${SlowFunctionArn}", "Payload": {}},
            "ResultSelector": {"remaining.$": "$.Payload.remaining"},
            "ResultPath": "$.slow",
            "Catch": [{"ErrorEquals": ["States.ALL"], "ResultPath": "$.caught", "Next": "Big"}],
            "Next": "Big",
        },
        "Big": {
            "Type": "Task",
            "Resource": "arn:aws:states:::lambda:invoke",
            "Parameters": {"FunctionName": "${BigFunctionArn}", "Payload": {}},
            "ResultSelector": {"size.$": "$.Payload.size"},
            "ResultPath": "$.big",
            "Catch": [{"ErrorEquals": ["States.ALL"], "ResultPath": "$.too_big", "Next": "Done"}],
            "Next": "Done",
        },
        "Done": {"Type": "Succeed"},
    },
}


def _limited_machine(tmp_path: Path, slow_seconds: float, big_bytes: int) -> LocalStateMachine:
    import time

    path = tmp_path / "limited.asl.json"
    path.write_text(json.dumps(LIMITED))

    def slow(event: dict[str, Any], context: Any) -> dict[str, Any]:
        time.sleep(slow_seconds)
        return {"remaining": context.get_remaining_time_in_millis()}

    def big(event: dict[str, Any], context: Any) -> dict[str, Any]:
        return {"size": big_bytes, "padding": "x" * big_bytes}

    return LocalStateMachine(
        path, {"SlowFunctionArn": slow, "BigFunctionArn": big}, timeouts={"SlowFunctionArn": 1.0, "BigFunctionArn": 5.0}
    )


def test_a_handler_within_lambdas_limits_returns_its_result(tmp_path: Path) -> None:
    # Given functions that end within their timeouts and return results well under 256 KiB
    machine = _limited_machine(tmp_path, slow_seconds=0.2, big_bytes=1000)
    # When the definition runs
    result = machine.run({}, timeout=60)
    # Then both results reach the state machine, and the context told the handler the time it had left
    assert result.status == "SUCCEEDED", (result.error, result.cause)
    assert result.output is not None
    assert "caught" not in result.output and "too_big" not in result.output
    assert 0 < result.output["slow"]["remaining"] <= 800
    assert result.limits_broken == []
    assert [(i.function, i.error) for i in result.invocations] == [("Slow", None), ("Big", None)]


def test_a_handler_that_outruns_its_timeout_fails_as_on_aws_and_is_named(tmp_path: Path) -> None:
    # Given a function with a 1 s timeout whose handler takes 1.3 s
    machine = _limited_machine(tmp_path, slow_seconds=1.3, big_bytes=1000)
    # When the definition runs
    result = machine.run({}, timeout=60)
    # Then the state saw a timed-out function, not the handler's result
    assert result.status == "SUCCEEDED", (result.error, result.cause)
    assert result.output is not None
    assert "slow" not in result.output
    assert result.output["caught"]["Error"] == "Sandbox.Timedout"
    assert "Task timed out after 1.00 seconds" in result.output["caught"]["Cause"]
    # And the run names the broken limit
    assert len(result.limits_broken) == 1
    assert result.limits_broken[0].startswith("Slow ran 1.")
    assert "longer than its timeout of 1s" in result.limits_broken[0]


def test_a_result_larger_than_a_state_may_hold_fails_the_execution_past_its_catch(tmp_path: Path) -> None:
    # Given a function returning 300,000 bytes (a state holds at most 256 KiB) from a task with a States.ALL Catch
    machine = _limited_machine(tmp_path, slow_seconds=0.0, big_bytes=300_000)
    # When the definition runs
    result = machine.run({}, timeout=60)
    # Then the execution failed, uncaught, as States.DataLimitExceeded fails it on AWS (States.ALL does not match it;
    # moto names it States.Runtime, its cause names the data limit)
    assert result.status == "FAILED"
    assert result.error == "States.Runtime"
    assert "States.DataLimitExceeded" in (result.cause or "")
    # And the run names it
    assert len(result.limits_broken) == 1
    assert "more than a state's 262,144" in result.limits_broken[0]


def test_a_result_lambdas_runtime_cannot_serialize_fails_as_it_would_on_aws(tmp_path: Path) -> None:
    # Given a function whose result holds a datetime (Lambda's Python runtime serializes Decimal, nothing else)
    import datetime
    import decimal

    path = tmp_path / "limited.asl.json"
    path.write_text(json.dumps(LIMITED))

    def slow(event: dict[str, Any], context: Any) -> dict[str, Any]:
        return {"remaining": decimal.Decimal("1.5")}

    def big(event: dict[str, Any], context: Any) -> dict[str, Any]:
        return {"size": 1, "at": datetime.datetime(2026, 11, 26, tzinfo=datetime.UTC)}

    machine = LocalStateMachine(path, {"SlowFunctionArn": slow, "BigFunctionArn": big})
    # When the definition runs
    result = machine.run({}, timeout=60)
    # Then the Decimal went through as a number, and the datetime failed the task as Runtime.MarshalError
    assert result.status == "SUCCEEDED", (result.error, result.cause)
    assert result.output is not None
    assert result.output["slow"] == {"remaining": 1.5}
    assert result.output["too_big"]["Error"] == "Runtime.MarshalError"
    assert "datetime is not JSON serializable" in result.output["too_big"]["Cause"]


STOPPABLE = {
    "StartAt": "Choose",
    "States": {
        "Choose": {
            "Type": "Choice",
            "Choices": [{"Variable": "$.action", "StringEquals": "rollback", "Next": "Undo"}],
            "Default": "Work",
        },
        "Work": {
            "Type": "Task",
            "Resource": "arn:aws:states:::lambda:invoke",
            "Parameters": {"FunctionName": "${WorkFunctionArn}", "Payload": {}},
            "Next": "Done",
        },
        "Undo": {
            "Type": "Task",
            "Resource": "arn:aws:states:::lambda:invoke",
            "Parameters": {"FunctionName": "${UndoFunctionArn}", "Payload": {}},
            "ResultSelector": {"undone.$": "$.Payload.undone"},
            "Next": "Done",
        },
        "Done": {"Type": "Succeed"},
    },
}


def test_an_execution_started_by_something_else_while_one_runs_is_followed_to_its_end(tmp_path: Path) -> None:
    # Given a function that, while it runs, has the running execution stopped and another one started (as the
    # alarm rule does), and then goes on to its end (a stop does not end a Lambda that runs)
    import threading

    import boto3

    path = tmp_path / "stoppable.asl.json"
    path.write_text(json.dumps(STOPPABLE))
    finished: list[str] = []
    machine: LocalStateMachine

    def work(event: dict[str, Any], context: Any) -> dict[str, Any]:
        def rule() -> None:
            sfn = boto3.client("stepfunctions", region_name="us-east-1")
            running = sfn.list_executions(stateMachineArn=machine.arn, statusFilter="RUNNING")["executions"]
            sfn.stop_execution(executionArn=running[0]["executionArn"], error="Zdm.AlarmRollback")
            sfn.start_execution(stateMachineArn=machine.arn, name="rollback-1", input='{"action": "rollback"}')

        thread = threading.Thread(target=rule)
        thread.start()
        thread.join()
        finished.append("work")
        return {}

    machine = LocalStateMachine(path, {"WorkFunctionArn": work, "UndoFunctionArn": lambda e, c: {"undone": True}})
    seen: list[str] = []
    # When it runs
    result = machine.run({"action": "migrate"}, timeout=60, on_event=lambda e: seen.append(e["type"]))
    # Then the first execution was stopped, its function still ran to its end, and the one started meanwhile
    # was followed to its end, its events handed on too
    assert result.status == "ABORTED" and finished == ["work"]
    assert [r.status for r in result.followed] == ["SUCCEEDED"]
    assert result.last is result.followed[0] and result.last.output == {"undone": True}
    assert seen.count("ExecutionStarted") == 2 and "ExecutionAborted" in seen and "ExecutionSucceeded" in seen
    assert sorted(i.function for i in result.invocations) == ["Undo", "Work"]  # the two ran side by side
