"""Debezium change events as the connector publishes them (shapes captured from Debezium 3.6.3 with the
connector settings of lambdas/core/changestream/connector.py): parsing, positions, unparseable records."""

from __future__ import annotations

import json
from typing import Any

import pytest

from lambdas.core.changestream.events import (
    SNAPSHOT_POSITION,
    ChangeEvent,
    Op,
    StreamPosition,
    StreamRecord,
    UnparseableEvent,
    parse_record,
)

TOPIC = "zdm_shop.public.orders"


def source(**overrides: Any) -> dict[str, Any]:
    block: dict[str, Any] = {
        "version": "3.6.3.Final",
        "connector": "postgresql",
        "name": "zdm_shop",
        "ts_ms": 1795651739498,
        "snapshot": "false",
        "db": "shop",
        "sequence": '["26814056","26814112"]',
        "ts_us": 1795651739498334,
        "ts_ns": 1795651739498334000,
        "schema": "public",
        "table": "orders",
        "txId": 729,
        "lsn": 26814112,
        "xmin": None,
        "origin": None,
        "origin_lsn": None,
    }
    block.update(overrides)
    return block


def envelope(op: str, *, before: Any = None, after: Any = None, **source_overrides: Any) -> dict[str, Any]:
    return {
        "before": before,
        "after": after,
        "source": source(**source_overrides),
        "transaction": None,
        "op": op,
        "ts_ms": 1795651739856,
        "ts_us": 1795651739856366,
        "ts_ns": 1795651739856366896,
    }


def record(value: Any, key: Any = None, *, offset: int = 7, raw: bytes | None = None) -> StreamRecord:
    encoded_key = None if key is None else json.dumps(key).encode()
    encoded = raw if raw is not None else (None if value is None else json.dumps(value).encode())
    return StreamRecord(TOPIC, 0, offset, encoded_key, encoded)


def parsed(rec: StreamRecord) -> ChangeEvent:
    event = parse_record(rec)
    assert event is not None
    return event


ROW = {"id": 42, "status": "paid", "note": "Zoë – ünïcødé", "total": "12.30"}


def test_create_update_delete_carry_table_key_row_and_position() -> None:
    # Given a create, an update and a delete as the connector streams them (key = primary key)
    create = parsed(record(envelope("c", after=ROW, sequence='["100","120"]', lsn=120), {"id": 42}))
    update = parsed(
        record(envelope("u", after={**ROW, "status": "shipped"}, sequence='["200","216"]', lsn=216), {"id": 42})
    )
    delete = parsed(
        record(envelope("d", before={"id": 42, "status": None}, sequence='["300","304"]', lsn=304), {"id": 42})
    )

    # Then each names its table, key, row and [last commit LSN, LSN] position
    assert (create.op, create.schema, create.table) == (Op.CREATE, "public", "orders")
    # (creates and updates carry the key in `after`: the record's key is parsed for deletes only)
    assert create.key is None and create.after == ROW
    assert create.position == StreamPosition(100, 120) and create.lsn == 120
    assert create.ts_ms == 1795651739498 and create.snapshot_marker is None
    assert update.op is Op.UPDATE and update.after is not None and update.after["status"] == "shipped"
    assert update.position == StreamPosition(200, 216)
    assert delete.op is Op.DELETE and delete.after is None and delete.key == {"id": 42}
    assert create.position < update.position < delete.position


def test_delete_without_a_record_key_takes_its_key_from_before() -> None:
    # Given a delete whose Kafka record has no key (e.g. produced by another tool)
    event = parsed(record(envelope("d", before={"id": 9, "status": "x"}), None))
    # Then the before row stands in for the key
    assert event.key == {"id": 9, "status": "x"}


def test_snapshot_reads_carry_the_lowest_position_and_their_markers() -> None:
    # Given snapshot reads: the first, a middle one, the last of a table, the last of the whole snapshot
    markers = ["first", "true", "last_in_data_collection", "last"]
    events = [
        parsed(record(envelope("r", after=ROW, snapshot=m, sequence='[null,"26813888"]', lsn=26813888), {"id": 42}))
        for m in markers
    ]
    # Then all sit at the snapshot position, before any streamed change, and keep their marker
    assert all(e.op is Op.READ and e.position == SNAPSHOT_POSITION and e.position.is_snapshot for e in events)
    assert [e.snapshot_marker for e in events] == markers
    assert parsed(record(envelope("c", after=ROW, sequence='["1","1"]', lsn=1))).position > SNAPSHOT_POSITION


def test_streamed_change_is_not_a_snapshot_event() -> None:
    event = parsed(record(envelope("u", after=ROW, snapshot="false")))
    assert not event.position.is_snapshot and event.snapshot_marker is None


def test_positions_order_by_commit_then_lsn_not_by_lsn_alone() -> None:
    # Given T1 began first (lower change LSN) but committed after T2: Debezium streams T2, then T1;
    # T1's changes carry T2's commit end as their first element
    t2 = parsed(record(envelope("u", after=ROW, sequence='["1000","1500"]', lsn=1500)))
    t1 = parsed(record(envelope("u", after=ROW, sequence='["1600","1200"]', lsn=1200)))
    # Then T1's change is after T2's, although its LSN is lower
    assert t1.lsn is not None and t2.lsn is not None and t1.lsn < t2.lsn
    assert t2.position < t1.position
    # And within one transaction the change LSN orders the changes
    first = parsed(record(envelope("c", after=ROW, sequence='["1600","1700"]', lsn=1700)))
    second = parsed(record(envelope("u", after=ROW, sequence='["1600","1800"]', lsn=1800)))
    assert first.position < second.position


def test_key_changing_update_is_a_delete_and_a_create_at_one_position() -> None:
    # Given the delete (old key) and create (new key) Debezium emits for UPDATE ... SET id = 4 WHERE id = 1
    delete = parsed(
        record(envelope("d", before={"id": 1}, sequence='["26815632","26815688"]', lsn=26815688), {"id": 1})
    )
    create = parsed(
        record(envelope("c", after={**ROW, "id": 4}, sequence='["26815632","26815688"]', lsn=26815688), {"id": 4})
    )
    # Then both share one position
    assert delete.position == create.position == StreamPosition(26815632, 26815688)


def test_null_first_sequence_element_falls_back_to_the_change_lsn() -> None:
    # Given a streamed change before any commit was seen ([null, LSN])
    event = parsed(record(envelope("c", after=ROW, sequence='[null,"5000"]', lsn=5000)))
    # Then its position is the change LSN on both elements
    assert event.position == StreamPosition(5000, 5000)


def test_missing_sequence_uses_source_lsn() -> None:
    event = parsed(record(envelope("u", after=ROW, sequence=None, lsn=777)))
    assert event.position == StreamPosition(777, 777)


def test_sequence_given_as_a_json_array_instead_of_its_text() -> None:
    # Given a producer that wrote source.sequence as an array, not as its JSON text
    event = parsed(record(envelope("u", after=ROW, sequence=["10", "20"], lsn=20)))
    # Then it reads the same
    assert event.position == StreamPosition(10, 20)


def test_truncate_has_no_key_and_no_row() -> None:
    # Given a truncate as streamed (Kafka key null, before/after null)
    event = parsed(record(envelope("t", sequence='["26816688","26819592"]', lsn=26819592), None))
    # Then it is a truncate of its table at its position
    assert event.op is Op.TRUNCATE and event.key is None and event.after is None
    assert (event.schema, event.table) == ("public", "orders")
    assert event.position == StreamPosition(26816688, 26819592)


def test_logical_decoding_message_parses_without_a_table() -> None:
    # Given the fence marker as Debezium publishes it on <prefix>.message
    value = {
        "op": "m",
        "ts_ms": 1795651739935,
        "source": source(schema="", table="", txId=None, sequence='["26820072","26820072"]', lsn=26820072),
        "transaction": None,
        "message": {"prefix": "zdm-fence", "content": "616263"},
    }
    event = parsed(record(value, {"prefix": "zdm-fence"}))
    assert event.op is Op.MESSAGE and event.table == "" and event.after is None
    assert event.position == StreamPosition(26820072, 26820072)


def test_tombstone_is_none() -> None:
    # Given the null-valued record that follows a delete
    # Then there is no change to apply
    assert parse_record(record(None, {"id": 42})) is None


def test_envelope_with_schemas_enabled_is_unwrapped() -> None:
    # Given a JsonConverter with schemas enabled: {"schema": ..., "payload": <envelope>}
    wrapped = {"schema": {"type": "struct"}, "payload": envelope("c", after=ROW, sequence='["1","2"]', lsn=2)}
    event = parsed(record(wrapped, {"schema": {}, "payload": {"id": 42}}))
    assert event.op is Op.CREATE and event.after == ROW and event.position == StreamPosition(1, 2)
    # And a null payload is a tombstone
    assert parse_record(record({"schema": {"type": "struct"}, "payload": None})) is None


@pytest.mark.parametrize(
    ("rec", "reason"),
    [
        (StreamRecord(TOPIC, 0, 1, b'{"id":1}', b"{not json"), "the record's value is not JSON"),
        (StreamRecord(TOPIC, 0, 1, b'{"id":1}', b"\xff\xfe"), "the record's value is not JSON"),
        (StreamRecord(TOPIC, 0, 1, b'{"id":1}', b"[1, 2]"), "the record's value is JSON but not an object"),
        (StreamRecord(TOPIC, 0, 1, b'{"id":1}', b"[" * 100_000), "nested too deeply"),
        (
            StreamRecord(TOPIC, 0, 1, b"not-json-key", json.dumps(envelope("d", before={"id": 1})).encode()),
            "the record's key is not JSON",
        ),
        (record(envelope("x", after=ROW)), "unknown operation 'x'"),
        (record({**envelope("c", after=ROW), "source": None}), "the event has no source block"),
        (record(envelope("c", after=None)), "a 'c' event without an 'after' row"),
        (record(envelope("u", after="oops")), "a 'u' event without an 'after' row"),
        (record(envelope("d", before=None), None), "a delete without a key or a 'before' row"),
        (record(envelope("c", after=ROW, lsn="0/16B3748", sequence=None)), "is not an LSN number"),
        (record(envelope("c", after=ROW, sequence="[1,")), "is not JSON"),
        (record(envelope("c", after=ROW, sequence='["1","2","3"]')), "is not [last commit LSN, LSN]"),
        (record(envelope("c", after=ROW, sequence='["x","2"]')), "'x' is not an LSN number"),
        (record(envelope("c", after=ROW, sequence={"a": 1})), "is not [last commit LSN, LSN]"),
        (record(envelope("c", after=ROW, sequence=[{"a": 1}, "2"])), "is not an LSN number"),
        (record(envelope("c", after=ROW, sequence=None, lsn=None)), "the event carries no source LSN"),
        (record({"schema": {}, "payload": [1]}), "the record's payload is not an object"),
    ],
)
def test_unparseable_records_name_the_reason(rec: StreamRecord, reason: str) -> None:
    # Given a record that is not a Debezium change event we can apply
    # Then parsing fails with a reason an operator can act on
    with pytest.raises(UnparseableEvent) as caught:
        parse_record(rec)
    assert reason in str(caught.value)


def test_integers_of_any_size_and_special_floats_are_read_exactly() -> None:
    # Given values a float would round: integers beyond 64 bits, a float with 17 significant digits,
    # and the NaN / Infinity tokens a lenient JSON writer may emit
    row = {"id": 1, "big": 123456789012345678901234567890, "neg": -(2**64) - 1, "f": 0.30000000000000004}
    event = parsed(record(envelope("c", after=row, sequence='["1","2"]', lsn=2)))
    nan = parsed(record(None, raw=json.dumps(envelope("c", after={"id": 1, "f": 1.5})).replace("1.5", "NaN").encode()))
    # Then every integer keeps every digit and the float its exact double
    assert event.after == row and type(event.after["big"]) is int
    # And NaN is kept as its text (PostgreSQL reads 'NaN' for float columns; a float NaN would be lost)
    assert nan.after == {"id": 1, "f": "NaN"}


@pytest.mark.parametrize(
    "value",
    [
        envelope("c", after=ROW, sequence='["1","2"]', lsn=2),
        envelope("u", after={**ROW, "tags": ["a", None], "doc": {"k": [1, 2.5]}}, sequence='["3","4"]', lsn=4),
        envelope("r", after=ROW, snapshot="last", sequence='[null,"9"]', lsn=9),
        envelope("d", before={"id": 42}, sequence='["5","6"]', lsn=6),
        envelope("t", sequence='["7","8"]', lsn=8),
        envelope("c", after=ROW, sequence=["10", "20"], lsn=20),  # another shape: the general reader
        envelope("c", after=ROW, sequence=None, lsn=30, snapshot=None, schema=None),
        {"schema": {"type": "struct"}, "payload": envelope("c", after=ROW, sequence='["1","2"]', lsn=2)},
    ],
)
def test_fast_and_general_readers_agree(value: dict[str, Any]) -> None:
    # Given a record the typed (fast) decoder reads, or one it hands to the general reader
    from lambdas.core.changestream.events import _parse_any

    rec = record(value, {"id": 42})
    # Then both readers make the same change of it
    assert parse_record(rec) == _parse_any(rec)
