"""Automatic rollback when the migration's composite alarm enters ALARM.

The EventBridge rule on the composite alarm invokes the rollback function, which calls
`trigger_rollback`: stop the running migration execution(s) of the state machine, then start
one rollback execution of the same state machine (input `{"action": "rollback", ...}`), whose
rollback branch moves traffic back. The execution name comes from the EventBridge event id,
so a redelivered event cannot start a second rollback.

What the rollback branch does is owned by the cutover work (reads back to the source before
cutover; reverse cutover after it); this module only decides *whether* and *how* to start it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

ROLLBACK_PREFIX = "rollback-"
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class StepFunctionsClient(Protocol):
    def list_executions(self, **kwargs: Any) -> dict[str, Any]: ...
    def stop_execution(self, **kwargs: Any) -> dict[str, Any]: ...
    def start_execution(self, **kwargs: Any) -> dict[str, Any]: ...


@dataclass(frozen=True)
class AlarmChange:
    """The parts of a 'CloudWatch Alarm State Change' event the rollback needs."""

    event_id: str
    alarm_name: str
    state: str
    reason: str
    time: str

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> AlarmChange:
        detail = event.get("detail") or {}
        state = detail.get("state") or {}
        return cls(
            event_id=str(event.get("id", "")),
            alarm_name=str(detail.get("alarmName", "")),
            state=str(state.get("value", "")),
            reason=str(state.get("reason", "")),
            time=str(event.get("time", "")),
        )


@dataclass(frozen=True)
class RollbackResult:
    stopped: list[str] = field(default_factory=list)
    started: str | None = None
    skipped: str | None = None


def _executions(client: StepFunctionsClient, state_machine_arn: str, status: str | None) -> Iterator[dict[str, Any]]:
    args: dict[str, Any] = {"stateMachineArn": state_machine_arn, "maxResults": 100}
    if status:
        args["statusFilter"] = status
    while True:
        page = client.list_executions(**args)
        yield from page.get("executions", [])
        token = page.get("nextToken")
        if not token:
            return
        args["nextToken"] = token


def rollback_execution_name(change: AlarmChange) -> str:
    """Unique per alarm event (Step Functions keeps names 90 days): a redelivery reuses it."""
    return (ROLLBACK_PREFIX + _NAME_UNSAFE.sub("-", change.event_id or change.time))[:80]


def trigger_rollback(
    client: StepFunctionsClient, state_machine_arn: str, migration_name: str, change: AlarmChange
) -> RollbackResult:
    if change.state != "ALARM":
        return RollbackResult(skipped=f"alarm {change.alarm_name} is {change.state or 'unknown'}, not ALARM")
    name = rollback_execution_name(change)
    executions = list(_executions(client, state_machine_arn, None))
    if not executions:
        return RollbackResult(skipped="the migration has never run: nothing to roll back")
    running = [e for e in executions if e.get("status") == "RUNNING"]
    if any(e["name"].startswith(ROLLBACK_PREFIX) for e in running):
        return RollbackResult(skipped="a rollback is already running")
    if any(e["name"] == name for e in executions):
        # A redelivered event (EventBridge and Lambda deliver at least once) whose rollback has ended:
        # StartExecution refuses a closed execution's name, and what runs now is not this alarm's business.
        return RollbackResult(skipped=f"this alarm event was handled already: {name}")
    stopped: list[str] = []
    cause = f"{change.alarm_name} entered ALARM at {change.time}: {change.reason}"[:32_000]
    for execution in running:
        client.stop_execution(executionArn=execution["executionArn"], error="Zdm.AlarmRollback", cause=cause)
        stopped.append(execution["executionArn"])
    started = client.start_execution(
        stateMachineArn=state_machine_arn,
        name=name,
        input=json.dumps(
            {
                "action": "rollback",
                "reason": cause,  # the RolledBack state's cause names it
                "migration_name": migration_name,
                "alarm": {"name": change.alarm_name, "reason": change.reason, "time": change.time},
                "stopped_executions": stopped,
            },
            sort_keys=True,
        ),
    )
    return RollbackResult(stopped=stopped, started=str(started["executionArn"]))
