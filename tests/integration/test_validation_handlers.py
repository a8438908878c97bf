"""The validation handlers run unchanged against local servers: plan, one task per chunk (as the Map
state would run them), summary; JSON in and out, no password in logs or results."""

from __future__ import annotations

import io
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


def on_both(dsns: tuple[str, str], statements: str) -> None:
    for dsn in dsns:
        conn = connect(dsn)
        execute(conn, statements)
        conn.close()


def test_plan_map_and_summary_handlers_find_a_difference_without_leaking_secrets(
    fresh_dbs: tuple[str, str], capsys: pytest.CaptureFixture[str], handler_logs: io.StringIO
) -> None:
    # Given two tables on both sides, one row of one table changed on the target
    src, tgt = fresh_dbs
    on_both(
        fresh_dbs,
        "CREATE TABLE a (id int PRIMARY KEY, v text); INSERT INTO a SELECT g, 'v' || g FROM generate_series(1, 4000) g;"
        " CREATE TABLE b (k uuid PRIMARY KEY, n int); INSERT INTO b SELECT md5(g::text)::uuid, g FROM generate_series(1, 500) g;"
        " ANALYZE",
    )
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
    # And no password reached the logs, the metrics or the results
    out, logs = capsys.readouterr(), handler_logs.getvalue()
    assert '"validation chunk compared"' in logs and "ValidationChunksDone" in out.out
    assert "s3cret" not in logs + out.out + out.err + json.dumps([plan, results, summary])
    # And each chunk logged its steps as it went: 'b' (uuids in no order) its bucket scan, with counts only
    steps = [json.loads(line) for line in logs.splitlines() if '"validation chunk step"' in line]
    assert {(s["table"], s["step"]) for s in steps} >= {("public.a", "key ranges"), ("public.b", "key buckets")}
    assert not any(str(k) in json.dumps(steps) for k in ("3210", "'changed'"))


def test_plan_handler_accepts_an_explicit_table_list(fresh_dbs: tuple[str, str]) -> None:
    src, tgt = fresh_dbs
    on_both(fresh_dbs, "CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY)")
    plan = validate_plan.handler({"migration": migration(src, tgt), "tables": ["public.b"]}, FakeContext())
    assert [t["name"] for t in plan["tables"]] == ["b"] and len(plan["chunks"]) == 1


def test_a_stored_plan_goes_through_the_bucket_as_the_distributed_map_runs_it(
    fresh_dbs: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a table with one missing and one extra row on the target, and the migration's bucket (moto)
    import boto3
    from moto import mock_aws

    from lambdas.handlers.runtime import VALIDATION_BUCKET_ENV

    src, tgt = fresh_dbs
    on_both(
        fresh_dbs,
        "CREATE TABLE a (id int PRIMARY KEY, v text); INSERT INTO a SELECT g, 'v' FROM generate_series(1, 3000) g; ANALYZE",
    )
    conn = connect(tgt)
    execute(conn, "DELETE FROM a WHERE id = 17; INSERT INTO a VALUES (5000, 'extra')")
    conn.close()
    ctx = FakeContext()
    monkeypatch.setenv(VALIDATION_BUCKET_ENV, "zdm-validate-test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    with mock_aws():
        s3 = boto3.client("s3", region_name="eu-west-1")
        s3.create_bucket(Bucket="zdm-validate-test", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
        # When the plan task runs for an execution: its chunks go to the bucket, the plan keeps their place
        plan = validate_plan.handler({"migration": migration(src, tgt), "run": "exec-42"}, ctx)
        assert plan["chunks"] == [] and plan["items"]["chunks"] >= 2
        items = json.loads(s3.get_object(Bucket=plan["items"]["bucket"], Key=plan["items"]["key"])["Body"].read())
        # And each item (as the ItemReader hands it out) runs as a chunk task that stores its result;
        # one runs twice, as a Step Functions retry would
        receipts = [
            validate_chunk.handler(
                json.loads(json.dumps({"migration": migration(src, tgt), "chunk": item, "results": plan["items"]})), ctx
            )
            for item in [*items, items[0]]
        ]
        # And the summary task gets the plan alone
        summary = validate_summary.handler(json.loads(json.dumps({"plan": plan})), ctx)
        stored = s3.list_objects_v2(Bucket="zdm-validate-test", Prefix=plan["items"]["results_prefix"])["KeyCount"]
        # (the per-table part is stored, not returned: it grows with the tables and their keys)
        whole = json.loads(s3.get_object(Bucket="zdm-validate-test", Key=summary["stored"])["Body"].read())
    # Then the receipts are small, one result object exists per chunk, and the summary names both rows
    assert all(set(r) == {"table", "chunk", "differences", "unsettled"} for r in receipts)
    assert stored == len(items)
    assert (summary["ok"], summary["missing"], summary["extra"], summary["rows_compared"]) == (False, 1, 1, 3000)
    assert "per_table" not in summary
    table = whole["per_table"][0]
    assert table["missing"]["first"][0]["key"] == ["17"] and table["extra"]["first"][0]["key"] == ["5000"]
    assert table["chunks"] == table["chunks_planned"] == len(items)
