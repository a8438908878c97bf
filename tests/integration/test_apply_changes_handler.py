"""The applier Lambda on an MSK event source mapping's event, against a real target (SSM on moto)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws

from lambdas.core.db import connect, fetch_all
from lambdas.handlers import apply_changes
from tests.integration.test_handlers import FakeContext

TOPIC = "zdm_apply.public.items"


def change(offset: int, op: str, row: dict[str, Any] | None, key: dict[str, Any], lsn: int) -> dict[str, Any]:
    source = {
        "schema": "public",
        "table": "items",
        "lsn": lsn,
        "sequence": json.dumps([str(lsn - 1), str(lsn)]),
        "snapshot": "false",
        "ts_ms": 1,
    }
    value = {"op": op, "after": row, "before": None, "source": source}
    return {
        "topic": TOPIC,
        "partition": 0,
        "offset": offset,
        "key": base64.b64encode(json.dumps(key).encode()).decode(),
        "value": base64.b64encode(json.dumps(value).encode()).decode(),
    }


def esm_event(records: list[dict[str, Any]]) -> dict[str, Any]:
    return {"eventSource": "aws:kafka", "records": {f"{TOPIC}-0": records}}


@pytest.fixture
def applier_env(fresh_dbs: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    _, tgt = fresh_dbs
    conn = connect(tgt)
    with conn.cursor() as cur:
        cur.execute("CREATE TABLE items (id int PRIMARY KEY, name text, price numeric(10,2))")
    conn.close()
    with mock_aws():
        monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
        settings = {
            "name": "apply",
            "source": {"dsn": "host=127.0.0.1 dbname=x"},
            "target": {"dsn": tgt},
            "engine": {"type": "debezium"},
        }
        boto3.client("ssm").put_parameter(Name="/zdm/apply/settings", Value=json.dumps(settings), Type="String")
        monkeypatch.setenv(apply_changes.SETTINGS_PARAMETER_ENV, "/zdm/apply/settings")
        monkeypatch.delenv(apply_changes.DEAD_LETTER_QUEUE_URL_ENV, raising=False)
        for cached in (apply_changes._migration, apply_changes._target, apply_changes._routing, apply_changes._sink):
            cached.cache_clear()
        try:
            yield tgt
        finally:
            apply_changes._target().close()
            apply_changes._target.cache_clear()


def test_the_applier_lambda_applies_a_batch_once_even_when_the_mapping_delivers_it_again(applier_env: str) -> None:
    # Given a batch as the MSK event source mapping delivers it: two creates, an update, a delete
    batch = esm_event(
        [
            change(0, "c", {"id": 1, "name": "a", "price": "1.50"}, {"id": 1}, 100),
            change(1, "c", {"id": 2, "name": "b", "price": "2.00"}, {"id": 2}, 101),
            change(2, "u", {"id": 1, "name": "a2", "price": "1.75"}, {"id": 1}, 102),
            change(3, "d", None, {"id": 2}, 103),
        ]
    )
    # When the handler runs it, and the mapping delivers the same batch again (a retry)
    first = apply_changes.handler(batch, FakeContext())
    second = apply_changes.handler(batch, FakeContext())
    # Then the rows are the final state, applied once; the retry only counts replays
    conn = connect(applier_env)
    assert fetch_all(conn, "SELECT id, name, price::text FROM items ORDER BY id") == [(1, "a2", "1.75")]
    conn.close()
    assert first["applied"] == 4 and first["dead_letters"] == 0
    assert second["applied"] == 0 and second["replayed"] == 4
