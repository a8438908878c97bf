"""A stand-in alarm in moto's CloudWatch: the health gate reads alarms by name, as on AWS, and the
rehearsal's faults and the tests set their state."""

from __future__ import annotations

from typing import Any


def put_stand_in_alarm(cloudwatch: Any, name: str, state: str = "OK", reason: str = "stand-in created") -> None:
    """An alarm named `name` over a metric nothing publishes, in `state`."""
    cloudwatch.put_metric_alarm(
        AlarmName=name,
        Namespace="Zdm/Rehearsal",
        MetricName="LocalHealth",
        Statistic="Maximum",
        Period=60,
        EvaluationPeriods=1,
        Threshold=0,
        ComparisonOperator="GreaterThanThreshold",
    )
    cloudwatch.set_alarm_state(AlarmName=name, StateValue=state, StateReason=reason)
