"""The Lambda handlers run unchanged against local servers (the same code the rehearsal uses)."""

from __future__ import annotations

import io
import json
import time
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import pytest

from lambdas.core.db import connect, execute, fetch_all
from lambdas.handlers import preflight, refresh_views, replication, sequences
from rehearsal import sample


@dataclass
class FakeContext:
    function_name: str = "zdm-test"
    memory_limit_in_mb: int = 512
    invoked_function_arn: str = "arn:aws:lambda:eu-west-1:123456789012:function:zdm-test"
    aws_request_id: str = "req-1"


def event(src: str, tgt: str, **extra: Any) -> dict[str, Any]:
    # trust auth ignores the password, so it can stand in for a real secret in the DSN
    return {
        "migration": {
            "name": "handler-test",
            "source": {"dsn": src + " password=s3cret-source"},
            "target": {"dsn": tgt + " password=s3cret-target"},
            "engine": {"logical": {"copy_workers": 2, "copy_chunk_rows": 5000}},
        },
        **extra,
    }


def test_handlers_run_preflight_replication_sequences_and_view_refresh_without_leaking_secrets(
    fresh_dbs: tuple[str, str], capsys: pytest.CaptureFixture[str], handler_logs: io.StringIO
) -> None:
    # Given a source with data and an empty target with the same schema
    src, tgt = fresh_dbs
    for dsn in (src, tgt):
        conn = connect(dsn)
        sample.create_schema(conn)
        conn.close()
    conn = connect(src)
    sample.load_data(conn, 10_000)
    conn.close()
    ctx = FakeContext()
    # When the preflight, start (twice), status, sequence sync, view refresh and teardown tasks run
    pre = preflight.handler(event(src, tgt), ctx)
    started = replication.handler(event(src, tgt, action="start"), ctx)
    again = replication.handler(event(src, tgt, action="start"), ctx)
    status = replication.handler(event(src, tgt, action="status"), ctx)
    synced = sequences.handler(event(src, tgt), ctx)
    views = refresh_views.handler(event(src, tgt), ctx)
    removed = replication.handler(event(src, tgt, action="teardown"), ctx)
    # Then each returns its typed result as JSON-ready data
    assert pre["ok"] is True, pre["failed"]
    assert started["rows_copied"] >= 10_000 and not started["already_running"]
    assert again["already_running"] and again["rows_copied"] == 0
    assert status["phase"] in ("streaming", "copying") and status["slot"]["exists"]
    assert len(synced["sequences"]) == 4
    assert [(v["view"], v["refreshed"]) for v in views["views"]] == [("public.sales_by_country", True)]
    report = "SELECT * FROM sales_by_country ORDER BY 1"
    with closing(connect(src)) as source, closing(connect(tgt)) as target:  # the copied rows: the same report
        assert fetch_all(target, report) == fetch_all(source, report) != []
    assert "slot zdm_handler_test" in removed["removed"]
    for result in (pre, started, status, synced, views, removed):
        json.dumps(result)
    # And no password reached the logs or the results
    out, logs = capsys.readouterr(), handler_logs.getvalue()
    assert logs.strip()  # the check below covers what the handlers logged
    everything = logs + out.out + out.err + json.dumps([pre, started, status, synced, views, removed])
    assert "s3cret" not in everything


def test_the_replication_task_adds_a_table_the_file_s_patterns_select_after_the_start(
    fresh_dbs: tuple[str, str], handler_logs: io.StringIO
) -> None:
    # Given a replication started by the task over public.* (one table then)
    src, tgt = fresh_dbs
    for dsn in (src, tgt):
        with closing(connect(dsn)) as conn:
            execute(conn, "CREATE TABLE orders (id int PRIMARY KEY)")
    ctx = FakeContext()
    replication.handler(event(src, tgt, action="start"), ctx)
    try:
        # When a table is created on both sides after the start, and written on the source
        for dsn in (src, tgt):
            with closing(connect(dsn)) as conn:
                execute(conn, "CREATE TABLE coupons (code text PRIMARY KEY)")
        with closing(connect(src)) as conn:
            execute(conn, "INSERT INTO coupons VALUES ('spring'), ('summer')")
        # Then the next status (its engine selects the tables anew) says to add it, and the task adds it
        status = replication.handler(event(src, tgt, action="status"), ctx)
        assert status["add_tables"] is True and status["tables_to_add"] == ["public.coupons"]
        added = replication.handler(event(src, tgt, action="add_tables"), ctx)
        assert added == {"added": ["public.coupons"], "waiting": []}
        deadline = time.monotonic() + 30
        while replication.handler(event(src, tgt, action="status"), ctx)["tables"] and time.monotonic() < deadline:
            time.sleep(0.2)  # its table sync copies it
        with closing(connect(tgt)) as conn:
            assert fetch_all(conn, "SELECT code FROM coupons ORDER BY 1") == [("spring",), ("summer",)]
        assert "tables added" in handler_logs.getvalue()
    finally:
        replication.handler(event(src, tgt, action="teardown"), ctx)


def test_bad_migration_in_event_fails_with_field_path(fresh_dbs: tuple[str, str]) -> None:
    src, tgt = fresh_dbs
    bad = event(src, tgt, action="status")
    bad["migration"]["read_shift"] = {"steps": [10, 50]}
    with pytest.raises(ValueError, match=r"read_shift\.steps: the last step must be 100"):
        replication.handler(bad, FakeContext())
