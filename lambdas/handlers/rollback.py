"""Rollback task: invoked by the EventBridge rule when the composite alarm enters ALARM.

Stops the running migration execution and starts a rollback execution of the same state
machine (lambdas.core.rollback). The rollback branch itself is completed by the cutover work.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

from aws_lambda_powertools.utilities.typing import LambdaContext

from lambdas.core.rollback import AlarmChange, StepFunctionsClient, trigger_rollback
from lambdas.handlers.runtime import aws_client, logger, tracer

STATE_MACHINE_ENV = "ZDM_STATE_MACHINE_ARN"
MIGRATION_ENV = "ZDM_MIGRATION"


def _stepfunctions() -> StepFunctionsClient:
    client: StepFunctionsClient = aws_client("stepfunctions")
    return client


@logger.inject_lambda_context
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    change = AlarmChange.from_event(event)
    result = trigger_rollback(_stepfunctions(), os.environ[STATE_MACHINE_ENV], os.environ[MIGRATION_ENV], change)
    logger.warning("alarm rollback", extra={"alarm": change.alarm_name, **asdict(result)})
    return asdict(result)
