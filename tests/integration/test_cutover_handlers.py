"""The read-shift, cutover, rollback and health-gate handlers, unchanged, against real servers and pgbouncer."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from cutover_env import Shop, server_port, shop_in
from moto import mock_aws

from lambdas.core.cutover import RollbackError
from lambdas.core.telemetry import composite_alarm_name
from lambdas.handlers import cutover, health_gate, read_shift
from rehearsal.alarms import put_stand_in_alarm
from rehearsal.servers import PostgresServer
from rehearsal.workload import Workload
from tests.integration.db_env import run_sql


@dataclass
class FakeContext:
    function_name: str = "zdm-test"
    memory_limit_in_mb: int = 512
    invoked_function_arn: str = "arn:aws:lambda:eu-west-1:123456789012:function:zdm-test"
    aws_request_id: str = "req-1"


@pytest.fixture
def shop(pg_pair: tuple[PostgresServer, PostgresServer], fresh_dbs: tuple[str, str]) -> Iterator[Shop]:
    with shop_in(pg_pair, fresh_dbs) as s:
        yield s


def create_health_alarm(migration: str) -> None:
    """The migration's composite alarm, in OK, in moto's CloudWatch (the gate reads it by name)."""
    put_stand_in_alarm(boto3.client("cloudwatch"), composite_alarm_name(migration))


def event(shop: Shop, **extra: Any) -> dict[str, Any]:
    # trust authentication ignores passwords, so they stand in for real secrets
    return {
        "migration": {
            "name": "shop",
            "source": {"dsn": shop.src + " password=s3cret-source"},
            "target": {"dsn": shop.tgt + " password=s3cret-target"},
            "router": {
                "type": "pgbouncer",
                "pgbouncer": {
                    "admin_dsn": shop.pgbouncer.admin_dsn() + " password=s3cret-admin",
                    "config_path": str(shop.pgbouncer.config_path),
                    "database_alias": "app",
                    "reader_alias": "app_ro",
                    "source_backend": shop.router.backend_conninfo("source"),
                    "target_backend": shop.router.backend_conninfo("target"),
                },
            },
            "cutover": {"fence_grace_seconds": 0.5},
        },
        **extra,
    }


def test_read_shift_cutover_and_rollback_handlers_without_leaking_secrets(
    shop: Shop, capsys: pytest.CaptureFixture[str], handler_logs: io.StringIO
) -> None:
    ctx = FakeContext()
    workload = Workload(shop.app, clients=4, rate=50).start()
    # When reads shift, the cutover runs (twice), its status is read, and it is rolled back
    shifted = read_shift.handler(event(shop, percent=50), ctx)
    done = cutover.handler(event(shop), ctx)
    again = cutover.handler(event(shop), ctx)
    status = cutover.handler(event(shop, action="status"), ctx)
    on_target = server_port(shop.app)
    back = cutover.handler(event(shop, action="rollback"), ctx)
    stats = workload.stop()
    # Then each did its part and returned JSON-ready data
    assert shifted["state"]["read_weight"] == 50 and shifted["state"]["writer"] == "source"
    assert done["status"] == "done" and done["pause_seconds"] > 0
    assert again["status"] == "already_done"
    assert status["cutover"]["status"] == "done" and status["router"]["writer"] == "target"
    assert status["source_fenced"] is True and status["history"][0]["step"] == "fence"
    assert on_target == shop.target.port
    assert back["kind"] == "after_cutover" and back["status"] == "done"
    assert server_port(shop.app) == shop.source.port
    assert stats.failed == 0, stats.errors
    results = [shifted, done, again, status, back]
    text = json.dumps(results)
    # And no password reached the logs or the results
    out, logs = capsys.readouterr(), handler_logs.getvalue()
    assert logs.strip()  # the check below covers what the handlers logged
    assert "s3cret" not in logs + out.out + out.err + text


def test_retire_reverse_action_retires_once_and_a_later_rollback_fails_with_the_reason(shop: Shop) -> None:
    ctx = FakeContext()
    # Given a cutover done through the handler
    cutover.handler(event(shop), ctx)
    # When the rollback window has passed and the state machine retires the reverse replication (twice)
    retired = cutover.handler(event(shop, action="retire_reverse"), ctx)
    again = cutover.handler(event(shop, action="retire_reverse"), ctx)
    status = cutover.handler(event(shop, action="status"), ctx)
    # Then the first run did it, the second changed nothing, and the status shows it done
    assert retired["operation"] == "retire_reverse" and retired["status"] == "done"
    assert [s["step"] for s in retired["steps"]] == ["catch_up", "retire_replication"]
    assert again["status"] == "already_done"
    assert status["retire_reverse"]["status"] == "done"
    # And a rollback (the state machine's rollback task) fails with the reason, the writer still on the target
    with pytest.raises(RollbackError, match="retired after the rollback window"):
        cutover.handler(event(shop, action="rollback"), ctx)
    assert server_port(shop.app) == shop.target.port


def test_the_rollback_window_gate_reads_the_back_replication_and_says_when_to_check_again(
    shop: Shop, monkeypatch: pytest.MonkeyPatch, handler_logs: io.StringIO
) -> None:
    ctx = FakeContext()
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    window = {"seconds": 3600, "check_seconds": 30}
    with mock_aws():  # the migration's alarms: CloudWatch, its composite alarm in OK
        create_health_alarm("shop")
        # Given a cutover done through the handler
        cutover.handler(event(shop), ctx)
        # When the rollback window's gate runs its first check
        first = health_gate.handler(event(shop, phase="rollback window", check_replication=False, window=window), ctx)
        # Then the alarms are fine, a rollback would run, and the next check comes after the poll
        assert first["healthy"] is True and first["rollback_ready"] is True, first
        assert first["window"]["next"] == "wait" and first["window"]["next_check_seconds"] == 30
        # When a column is added on the new writer only, and written there
        run_sql(shop.app, "ALTER TABLE customers ADD COLUMN gift_note text")
        run_sql(shop.app, "INSERT INTO customers (email, name, gift_note) VALUES ('g@example.com', 'G', 'bow')")
        later = {**window, "started": first["window"]["started"]}
        second = health_gate.handler(event(shop, phase="rollback window", check_replication=False, window=later), ctx)
    # Then the gate stays healthy (the new writer is fine: no rollback for this), but says a rollback would
    # not run and why, dating the problem for the next check
    assert second["healthy"] is True and second["rollback_ready"] is False
    assert any("public.customers.gift_note: missing on the source" in p for p in second["rollback_problems"])
    assert second["window"]["problems_since"] is not None and second["window"]["started"] == first["window"]["started"]
    assert "a rollback would not run now" in handler_logs.getvalue()


@pytest.mark.parametrize("side", ["source", "target"])
def test_a_database_out_of_reach_in_the_window_is_reported_not_rolled_back_for(
    shop: Shop, monkeypatch: pytest.MonkeyPatch, handler_logs: io.StringIO, side: str
) -> None:
    ctx = FakeContext()
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    cutover.handler(event(shop), ctx)
    # Given one database out of reach in the rollback window (a port nothing listens on): the old source (the
    # runner lists its tables) or the target (the rollback's records are read there)
    gone = event(shop, phase="rollback window", check_replication=False, window={"seconds": 3600})
    gone["migration"][side]["dsn"] = f"host=127.0.0.1 port=1 dbname=shop user=app password=s3cret-{side}"
    with mock_aws():
        create_health_alarm("shop")
        # When the window's gate checks
        result = health_gate.handler(gone, ctx)
    # Then it does not fail (a failed gate would roll back, towards a source it cannot reach): the new writer is
    # healthy, and a rollback is reported as impossible for now, without the password
    assert result["healthy"] is True and result["rollback_ready"] is False
    assert result["rollback_problems"][0].startswith("a rollback could not run: cannot connect to")
    assert "s3cret" not in json.dumps(result) + handler_logs.getvalue()


def test_a_bad_read_step_is_refused_by_the_event_model(shop: Shop) -> None:
    with pytest.raises(ValueError, match="percent"):
        read_shift.handler(event(shop, percent=150), FakeContext())
