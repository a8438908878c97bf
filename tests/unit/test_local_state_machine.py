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
