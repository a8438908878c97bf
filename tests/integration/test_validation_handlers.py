"""The validation handlers run unchanged against local servers: plan, one task per chunk (as the Map
state would run them), summary; JSON in and out, no password in logs or results."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from lambdas.core.db import connect, execute
from lambdas.handlers import validate_chunk, validate_plan, validate_summary


@dataclass
class FakeContext:
    function_name: str = "zdm-validate-test"
    memory_limit_in_mb: int = 512
    invoked_function_arn: str = "arn:aws:lambda:eu-west-1:123456789012:function:zdm-validate-test"
    aws_request_id: str = "req-1"


def migration(src: str, tgt: str) -> dict[str, Any]:
    # trust auth ignores the password, so it can stand in for a real secret in the DSN
    return {
        "name": "validate-test",
        "source": {"dsn": src + " password=s3cret-source"},
        "target": {"dsn": tgt + " password=s3cret-target"},
        "tables": {"include": ["public.*"]},
        "validation": {"chunk_rows": 1000, "slice_rows": 250, "report_first_keys": 5},
    }


def test_plan_map_and_summary_handlers_find_a_difference_without_leaking_secrets(
    fresh_dbs: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    # Given two tables on both sides, one row of one table changed on the target
    src, tgt = fresh_dbs
    for dsn in (src, tgt):
        conn = connect(dsn)
        execute(
            conn,
            "CREATE TABLE a (id int PRIMARY KEY, v text); INSERT INTO a SELECT g, 'v' || g FROM generate_series(1, 4000) g;"
            " CREATE TABLE b (k uuid PRIMARY KEY, n int); INSERT INTO b SELECT md5(g::text)::uuid, g FROM generate_series(1, 500) g;"
            " ANALYZE",
        )
        conn.close()
    conn = connect(tgt)
    execute(conn, "UPDATE a SET v = 'changed' WHERE id = 3210")
    conn.close()
    ctx = FakeContext()
    # When the plan task runs, then one chunk task per item (each event as JSON text, as Step
    # Functions passes it), then the summary task
    plan = validate_plan.handler({"migration": migration(src, tgt)}, ctx)
    results = [
        validate_chunk.handler(json.loads(json.dumps({"migration": migration(src, tgt), "chunk": chunk})), ctx)
        for chunk in plan["chunks"]
    ]
    summary = validate_summary.handler(json.loads(json.dumps({"plan": plan, "results": results})), ctx)
    # Then the plan cut 'a' into several chunks, and the summary names the changed row and its column
    assert [t["name"] for t in plan["tables"]] == ["a", "b"]
    assert len(plan["chunks"]) >= 5
    assert summary["ok"] is False
    assert (summary["rows_compared"], summary["differences"], summary["changed"]) == (4500, 1, 1)
    table_a = next(t for t in summary["per_table"] if t["table"] == "public.a")
    assert table_a["changed"]["first"] == [{"key": ["3210"], "columns": ["v"], "copies": 1}]
    # And no password reached the logs or the results
    out = capsys.readouterr()
    assert "s3cret" not in out.out + out.err + json.dumps([plan, results, summary])


def test_plan_handler_accepts_an_explicit_table_list(fresh_dbs: tuple[str, str]) -> None:
    src, tgt = fresh_dbs
    for dsn in (src, tgt):
        conn = connect(dsn)
        execute(conn, "CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY)")
        conn.close()
    plan = validate_plan.handler({"migration": migration(src, tgt), "tables": ["public.b"]}, FakeContext())
    assert [t["name"] for t in plan["tables"]] == ["b"] and len(plan["chunks"]) == 1
