"""Health gates: alarms and replication status, failing closed."""

from __future__ import annotations

from typing import Any

import boto3
from moto import mock_aws

from lambdas.core.config import LagLimits
from lambdas.core.engines.base import Phase, ReplicationStatus, SlotHealth
from lambdas.core.health import AlarmSignal, HealthSignal, ReplicationSignal, evaluate_health
from rehearsal.alarms import put_stand_in_alarm


def alarm(cw: Any, name: str, state: str) -> None:
    put_stand_in_alarm(cw, name, state, "test")


@mock_aws
def test_alarm_in_alarm_or_missing_is_unhealthy_ok_is_healthy() -> None:
    cw = boto3.client("cloudwatch", region_name="us-east-1")
    alarm(cw, "zdm-x-health", "OK")
    alarm(cw, "app-errors", "OK")
    assert evaluate_health([AlarmSignal(cw, ["zdm-x-health", "app-errors"])]).healthy
    alarm(cw, "app-errors", "ALARM")
    verdict = evaluate_health([AlarmSignal(cw, ["zdm-x-health", "app-errors"])])
    assert not verdict.healthy and verdict.reasons == ["alarm app-errors is in ALARM"]
    missing = evaluate_health([AlarmSignal(cw, ["zdm-x-health", "typo-alarm"])])
    assert not missing.healthy and "typo-alarm does not exist" in missing.reasons[0]


def status(**kw: Any) -> ReplicationStatus:
    base: dict[str, Any] = {
        "engine": "logical",
        "phase": Phase.STREAMING,
        "lag_bytes": 100,
        "lag_seconds": 0.2,
        "slot": SlotHealth("s", True, True, "reserved", 100),
    }
    base.update(kw)
    return ReplicationStatus(**base)


def test_replication_over_limits_slot_lost_or_unknown_lag_is_unhealthy() -> None:
    limits = LagLimits(max_seconds=5, max_bytes=1000)
    assert evaluate_health([ReplicationSignal(status(), limits)]).healthy
    assert "over lag.max_seconds" in evaluate_health([ReplicationSignal(status(lag_seconds=9.0), limits)]).reasons[0]
    assert "over lag.max_bytes" in evaluate_health([ReplicationSignal(status(lag_bytes=5000), limits)]).reasons[0]
    assert "unknown" in evaluate_health([ReplicationSignal(status(lag_seconds=None), limits)]).reasons[0]
    lost = status(slot=SlotHealth("s", True, False, "lost", 0))
    assert "lost its WAL" in evaluate_health([ReplicationSignal(lost, limits)]).reasons[0]


class BrokenSignal(HealthSignal):
    name = "broken"

    def problems(self) -> list[str]:
        raise ConnectionError("cannot reach CloudWatch")


def test_a_signal_that_cannot_be_read_fails_closed() -> None:
    verdict = evaluate_health([BrokenSignal()])
    assert not verdict.healthy and "could not be read" in verdict.reasons[0]
