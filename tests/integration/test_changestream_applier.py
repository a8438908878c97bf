"""The change applier on a real target with hand-built Debezium records (no broker): replays,
republished stretches, deletes, key changes, truncates, unchanged TOAST values and dead letters."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import closing
from typing import Any

import psycopg2
import psycopg2.errors
import pytest

from lambdas.core.changestream import state
from lambdas.core.changestream.applier import ApplyResult, ChangeApplier
from lambdas.core.changestream.connector import UNAVAILABLE_PLACEHOLDER, heartbeat_topic
from lambdas.core.changestream.deadletters import DeadLetter, DeadLetterSink
from lambdas.core.changestream.events import StreamRecord
from lambdas.core.changestream.target import StreamRouting
from lambdas.core.db import Connection, connect, execute, fetch_all, fetch_value
from lambdas.core.tables import TableName

PREFIX = "zdm_apply"
ITEMS = TableName("public", "items")
TOPIC = f"{PREFIX}.public.items"
P = UNAVAILABLE_PLACEHOLDER

TARGET_DDL = """
CREATE TABLE items (
    id      int PRIMARY KEY,
    sku     text UNIQUE,
    qty     int,
    note    text,
    body    text,
    doc     jsonb,
    tags    text[],
    at      timestamp
);
"""


class CollectingSink(DeadLetterSink):
    """Keeps what it was sent, as an operator's queue would."""

    def __init__(self) -> None:
        self.sent: list[DeadLetter] = []

    def send(self, letters: Sequence[DeadLetter]) -> None:
        self.sent.extend(letters)


class Stream:
    """Hand-built records of one topic, offsets in publication order, like Debezium publishes them."""

    def __init__(self, topic: str = TOPIC) -> None:
        self.topic = topic
        self.offset = 0

    def _record(self, key: Any, value: Any) -> StreamRecord:
        rec = StreamRecord(
            self.topic,
            0,
            self.offset,
            None if key is None else json.dumps(key).encode(),
            None if value is None else (value if isinstance(value, bytes) else json.dumps(value).encode()),
        )
        self.offset += 1
        return rec

    def change(self, op: str, row: dict[str, Any] | None, pos: tuple[int, int], *, key: Any = "row") -> StreamRecord:
        commit, lsn = pos
        source = {
            "version": "3.6.3.Final",
            "connector": "postgresql",
            "name": PREFIX,
            "ts_ms": 1_700_000_000_000 + lsn,
            "snapshot": "true" if op == "r" else "false",
            "db": "shop",
            "sequence": json.dumps([None if op == "r" else str(commit), str(lsn)]),
            "schema": "public",
            "table": self.topic.rsplit(".", 1)[1],
            "txId": 700 + lsn,
            "lsn": lsn,
        }
        envelope = {
            "before": row if op == "d" else None,
            "after": None if op in ("d", "t") else row,
            "source": source,
            "op": op,
            "ts_ms": 1_700_000_000_000 + lsn,
        }
        if key == "row":
            key = None if row is None else {"id": row["id"]}
        return self._record(key, envelope)

    def create(self, row: dict[str, Any], pos: tuple[int, int]) -> StreamRecord:
        return self.change("c", row, pos)

    def read(self, row: dict[str, Any]) -> StreamRecord:
        return self.change("r", row, (0, 100))

    def update(self, row: dict[str, Any], pos: tuple[int, int]) -> StreamRecord:
        return self.change("u", row, pos)

    def delete(self, key: int, pos: tuple[int, int]) -> list[StreamRecord]:
        """The delete and the tombstone that follows it."""
        return [self.change("d", {"id": key}, pos), self._record({"id": key}, None)]

    def truncate(self, pos: tuple[int, int]) -> StreamRecord:
        return self.change("t", None, pos, key=None)

    def raw(self, key: bytes | None, value: bytes | None) -> StreamRecord:
        rec = StreamRecord(self.topic, 0, self.offset, key, value)
        self.offset += 1
        return rec


def item(id: int, **values: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": id,
        "sku": f"sku-{id}",
        "qty": 1,
        "note": None,
        "body": None,
        "doc": None,
        "tags": None,
        "at": None,
    }
    row.update(values)
    return row


def republish(records: Sequence[StreamRecord], stream: Stream) -> list[StreamRecord]:
    """The same events published again under new offsets (a restarted connector)."""
    out = []
    for rec in records:
        out.append(StreamRecord(rec.topic, rec.partition, stream.offset, rec.key, rec.value))
        stream.offset += 1
    return out


def open_target(dsn: str, application_name: str = "zdm-applier-test") -> Connection:
    """The target database of these tests: the items table and the applier's state tables."""
    setup = connect(dsn)
    execute(setup, TARGET_DDL)
    setup.close()
    conn = connect(dsn, autocommit=False, application_name=application_name)
    state.ensure_state_tables(conn)
    return conn


@pytest.fixture
def target(fresh_dbs: tuple[str, str]) -> Iterator[Connection]:
    with closing(open_target(fresh_dbs[1])) as conn:
        yield conn


@pytest.fixture
def sink() -> CollectingSink:
    return CollectingSink()


@pytest.fixture
def applier(target: Connection, sink: CollectingSink) -> ChangeApplier:
    routing = StreamRouting.load(target, PREFIX, [ITEMS])
    return ChangeApplier(target, routing, sink)


def rows(conn: Connection, columns: str = "id, sku, qty, note") -> list[tuple[Any, ...]]:
    result = fetch_all(conn, f"SELECT {columns} FROM items ORDER BY id")
    conn.rollback()
    return result


def letters_on_target(conn: Connection) -> list[tuple[Any, ...]]:
    result = fetch_all(
        conn,
        "SELECT topic, kafka_partition, kafka_offset, source_lsn, reason FROM _zdm.dbz_dead_letters ORDER BY kafka_offset",
    )
    conn.rollback()
    return result


def apply(applier: ChangeApplier, records: Sequence[StreamRecord]) -> ApplyResult:
    return applier.apply(list(records))


def test_the_same_batch_applied_twice_changes_nothing_the_second_time(
    target: Connection, applier: ChangeApplier
) -> None:
    # Given a batch of snapshot reads, creates, updates and a delete, applied once
    s = Stream()
    batch = [
        s.read(item(1)),
        s.read(item(2)),
        s.create(item(3, qty=3), (1000, 1010)),
        s.update(item(1, qty=5, note="Zoë"), (1100, 1110)),
        *s.delete(2, (1200, 1210)),
    ]
    first = apply(applier, batch)
    after_first = rows(target)

    # When Kafka delivers the very same records again (a crash before the consumer committed)
    second = apply(applier, batch)

    # Then the second delivery is counted as a replay and the target is unchanged
    assert first.applied == 5 and first.tombstones == 1 and first.replayed == 0
    assert second.replayed == len(batch) and second.applied == 0 and second.dead_letters == []
    assert rows(target) == after_first == [(1, "sku-1", 5, "Zoë"), (3, "sku-3", 3, None)]
    stored = state.stored_offsets(target, [TOPIC])
    assert stored == {(TOPIC, 0): len(batch)}


def test_a_republished_stretch_never_regresses_a_row(target: Connection, applier: ChangeApplier) -> None:
    # Given v1 then v2 of a row applied
    s = Stream()
    v1 = s.create(item(1, qty=1), (1000, 1010))
    v2 = s.update(item(1, qty=2), (1100, 1110))
    apply(applier, [v1])
    apply(applier, [v2])

    # When the connector publishes v1 (and v2) again under new offsets, in separate batches
    again = republish([v1, v2], s)
    first = apply(applier, again[:1])
    second = apply(applier, again[1:])

    # Then both are recognised as republished and the row stays at v2
    assert (first.republished, first.applied, second.republished) == (1, 0, 0)
    assert second.applied == 1  # the same position as the stored one is re-applied: same state
    assert rows(target) == [(1, "sku-1", 2, None)]


def test_a_replayed_older_insert_does_not_resurrect_a_deleted_row(target: Connection, applier: ChangeApplier) -> None:
    # Given a row created, then deleted
    s = Stream()
    create = s.create(item(7), (1000, 1010))
    apply(applier, [create, *s.delete(7, (1100, 1110))])
    assert rows(target) == []

    # When the create is published again under a new offset
    result = apply(applier, republish([create], s))

    # Then it is skipped and the row stays deleted
    assert result.republished == 1 and result.applied == 0
    assert rows(target) == []


def test_snapshot_reads_after_streaming_started_are_republished(target: Connection, applier: ChangeApplier) -> None:
    # Given a row streamed to v2 after its snapshot read
    s = Stream()
    apply(applier, [s.read(item(1, qty=1)), s.update(item(1, qty=2), (1000, 1010))])
    # When a snapshot read of the row arrives again (a connector that snapshotted again)
    result = apply(applier, [s.read(item(1, qty=1))])
    # Then it is skipped
    assert result.republished == 1
    assert rows(target) == [(1, "sku-1", 2, None)]


def test_a_key_changing_update_moves_the_row(target: Connection, applier: ChangeApplier) -> None:
    # Given row 1 on the target
    s = Stream()
    apply(applier, [s.create(item(1, qty=3, note="keep"), (1000, 1010))])

    # When UPDATE ... SET id = 4 WHERE id = 1 arrives: a delete (+ tombstone) and a create at one position
    moved = [*s.delete(1, (1100, 1110)), s.create(item(4, sku="sku-1", qty=3, note="keep"), (1100, 1110))]
    result = apply(applier, moved)

    # Then the row has its new key only
    assert result.applied == 2 and result.dead_letters == []
    assert rows(target) == [(4, "sku-1", 3, "keep")]

    # And the pair split over two batches gives the same result
    moved_back = [*s.delete(4, (1200, 1210)), s.create(item(1, sku="sku-1", qty=3, note="back"), (1200, 1210))]
    apply(applier, moved_back[:1])
    apply(applier, moved_back[1:])
    assert rows(target) == [(1, "sku-1", 3, "back")]


def test_truncate_empties_the_table_and_later_changes_apply(target: Connection, applier: ChangeApplier) -> None:
    # Given two rows
    s = Stream()
    apply(applier, [s.create(item(1), (1000, 1010)), s.create(item(2), (1000, 1020))])
    # When a truncate and then an insert arrive in one batch, after another insert
    result = apply(
        applier, [s.create(item(3), (1100, 1110)), s.truncate((1200, 1210)), s.create(item(5), (1300, 1310))]
    )
    # Then only what came after the truncate is left
    assert result.dead_letters == []
    assert rows(target) == [(5, "sku-5", 1, None)]


def test_tombstones_are_no_ops(target: Connection, applier: ChangeApplier) -> None:
    # Given a row
    s = Stream()
    apply(applier, [s.create(item(1), (1000, 1010))])
    # When only tombstones arrive (for this row and another key)
    result = apply(applier, [s.raw(b'{"id":1}', None), s.raw(b'{"id":99}', None)])
    # Then nothing changes, and the offsets still move on
    assert result.tombstones == 2 and result.applied == 0
    assert rows(target) == [(1, "sku-1", 1, None)]
    assert state.stored_offsets(target, [TOPIC]) == {(TOPIC, 0): 3}


def test_unchanged_toast_placeholder_keeps_the_targets_value(target: Connection, applier: ChangeApplier) -> None:
    # Given a row with large text, jsonb and text[] values
    s = Stream()
    big = "x" * 10_000
    apply(applier, [s.create(item(1, body=big, doc='{"k": [1, 2]}', tags=["a", "b"]), (1000, 1010))])

    # When an update of another column arrives with the placeholder in the unchanged TOASTed columns
    result = apply(applier, [s.update(item(1, qty=9, body=P, doc=P, tags=[P]), (1100, 1110))])

    # Then the other column changes and the TOASTed ones keep their value (never the placeholder)
    assert result.dead_letters == [] and result.applied == 1
    assert rows(target, "id, qty, body = repeat('x', 10000), doc::text, tags") == [
        (1, 9, True, '{"k": [1, 2]}', ["a", "b"])
    ]
    assert fetch_value(target, "SELECT count(*) FROM items WHERE body LIKE %s", (f"%{P}%",)) == 0
    target.rollback()


def test_placeholder_is_filled_from_an_earlier_change_in_the_same_batch(
    target: Connection, applier: ChangeApplier
) -> None:
    # Given an insert and, in the same batch, updates that leave its TOASTed columns unchanged
    s = Stream()
    batch = [
        s.create(item(2, body="first body", doc='{"v": 1}'), (1000, 1010)),
        s.update(item(2, qty=5, body=P, doc=P), (1100, 1110)),
        s.update(item(2, note="n", body=P, doc='{"v": 2}'), (1200, 1210)),
    ]
    # When the batch is applied
    result = apply(applier, batch)
    # Then the row has the insert's body, the last doc and the last other values
    assert result.dead_letters == []
    assert rows(target, "id, qty, note, body, doc::text") == [(2, 1, "n", "first body", '{"v": 2}')]


BIG = {"body": "b" * 9_000, "doc": '{"k": [1, 2]}', "tags": ["t1", "t2"]}
UNSENT = {"body": P, "doc": P, "tags": [P]}  # how Debezium sends them when they did not change


def big_rows(conn: Connection) -> list[tuple[Any, ...]]:
    return rows(conn, "id, sku, qty, left(body, 12), length(body), doc::text, tags")


def moved(s: Stream, old: int, new: int, pos: tuple[int, int], **values: Any) -> list[StreamRecord]:
    """UPDATE ... SET id = new WHERE id = old leaving the TOASTed columns as they are: a delete (and its
    tombstone) and a create at one position, the create without the unchanged TOASTed values."""
    return [*s.delete(old, pos), s.create(item(new, **{**UNSENT, **values}), pos)]


def test_a_key_change_keeps_the_old_rows_unchanged_toast_values(target: Connection, applier: ChangeApplier) -> None:
    # Given row 1 with TOASTed values on the target
    s = Stream()
    apply(applier, [s.create(item(1, qty=3, **BIG), (1000, 1010))])
    # When UPDATE ... SET id = 4 WHERE id = 1 arrives, the create lacking the unchanged TOASTed values
    result = apply(applier, moved(s, 1, 4, (1100, 1110), sku="sku-1", qty=3))
    # Then row 4 has row 1's values, TOASTed ones included, and row 1 is gone
    assert result.dead_letters == [] and result.applied == 2
    assert big_rows(target) == [(4, "sku-1", 3, "bbbbbbbbbbbb", 9_000, '{"k": [1, 2]}', ["t1", "t2"])]


def test_key_moves_within_one_batch_take_each_rows_own_values(target: Connection, applier: ChangeApplier) -> None:
    # Given rows 1 and 2 with different TOASTed values
    s = Stream()
    apply(
        applier,
        [
            s.create(item(1, body="one" * 3000, doc='{"r": 1}', tags=["1"]), (1000, 1010)),
            s.create(item(2, body="two" * 3000, doc='{"r": 2}', tags=["2"]), (1000, 1020)),
        ],
    )
    # When one batch shifts both keys up (2 -> 3, then 1 -> 2), inserts row 5 and moves it (5 -> 6),
    # updates row 3 leaving its TOASTed values unchanged, then moves it again (3 -> 7)
    batch = [
        *moved(s, 2, 3, (1100, 1110), sku="sku-2"),
        *moved(s, 1, 2, (1100, 1120), sku="sku-1"),
        s.create(item(5, body="five" * 3000, doc='{"r": 5}', tags=["5"]), (1200, 1210)),
        *moved(s, 5, 6, (1300, 1310), sku="sku-5"),
        s.update(item(3, sku="sku-2", qty=8, **UNSENT), (1400, 1410)),
        *moved(s, 3, 7, (1500, 1510), sku="sku-2", qty=8),
    ]
    result = apply(applier, batch)
    # Then every row carries the TOASTed values it had, under its new key
    assert result.dead_letters == []
    assert rows(target, "id, sku, qty, left(body, 6), doc::text, tags") == [
        (2, "sku-1", 1, "oneone", '{"r": 1}', ["1"]),
        (6, "sku-5", 1, "fivefi", '{"r": 5}', ["5"]),
        (7, "sku-2", 8, "twotwo", '{"r": 2}', ["2"]),
    ]


def test_a_key_move_applied_again_or_alone_after_a_poison_change_gives_the_same_row(
    target: Connection, applier: ChangeApplier
) -> None:
    # Given row 1 with TOASTed values, and a batch holding its move and a change the target refuses
    s = Stream()
    apply(applier, [s.create(item(1, **BIG), (1000, 1010))])
    batch = [*moved(s, 1, 4, (1100, 1110), sku="sku-1"), s.create(item(9, qty="not a number"), (1200, 1210))]
    # When applied (the batch statement fails, so changes are applied one by one: the move as one)
    result = apply(applier, batch)
    # Then only the refused change is a dead letter and the moved row is whole
    assert [d.offset for d in result.dead_letters] == [4]
    expected = [(4, "sku-1", 1, "bbbbbbbbbbbb", 9_000, '{"k": [1, 2]}', ["t1", "t2"])]
    assert big_rows(target) == expected
    # And when Debezium publishes the move again after a restart (same position, new offsets), nothing changes
    again = apply(applier, republish(batch[:3], s))
    assert again.dead_letters == []
    assert big_rows(target) == expected


def test_a_key_move_split_between_two_batches_keeps_the_old_rows_values(
    target: Connection, applier: ChangeApplier
) -> None:
    # Given row 1 with TOASTed values, and its move 1 -> 4 whose delete ends one batch
    s = Stream()
    apply(applier, [s.create(item(1, **BIG), (1000, 1010))])
    insert = s.create(item(2), (1050, 1060))
    move = moved(s, 1, 4, (1100, 1110), sku="sku-1")
    first = apply(applier, [insert, *move[:2]])
    # When the create starts the next batch
    second = apply(applier, [move[2], s.create(item(3), (1200, 1210))])
    # Then row 4 is whole: the first batch kept the row its last delete removed
    assert first.dead_letters == [] and second.dead_letters == []
    assert big_rows(target) == [
        (2, "sku-2", 1, None, None, None, None),
        (3, "sku-3", 1, None, None, None, None),
        (4, "sku-1", 1, "bbbbbbbbbbbb", 9_000, '{"k": [1, 2]}', ["t1", "t2"]),
    ]


def test_a_split_move_of_a_row_changed_in_the_same_batch_takes_the_changed_values(
    target: Connection, applier: ChangeApplier
) -> None:
    # Given row 1, updated in the batch that ends with the delete of its move (body changed, doc and tags not)
    s = Stream()
    apply(applier, [s.create(item(1, **BIG), (1000, 1010))])
    update = s.update(item(1, qty=5, body="new body", doc=P, tags=[P]), (1050, 1060))
    move = moved(s, 1, 4, (1100, 1110), sku="sku-1", qty=5)
    first = apply(applier, [update, *move[:2]])
    # When the create starts the next batch
    second = apply(applier, [move[2]])
    # Then row 4 has the updated body and the untouched doc and tags: the row as it was when deleted
    assert first.dead_letters == [] and second.dead_letters == []
    assert big_rows(target) == [(4, "sku-1", 5, "new body", 8, '{"k": [1, 2]}', ["t1", "t2"])]


def test_a_key_move_whose_old_row_is_not_on_the_target_is_a_dead_letter(
    target: Connection, applier: ChangeApplier
) -> None:
    # Given an empty target (the old row never arrived)
    s = Stream()
    # When a move with unchanged TOASTed values arrives
    result = apply(applier, moved(s, 1, 4, (1100, 1110)))
    # Then the create cannot be rebuilt: a dead letter naming why; the delete applied (nothing to delete)
    assert [d.offset for d in result.dead_letters] == [2]
    assert "whose old row is not" in result.dead_letters[0].reason
    assert rows(target) == []


def test_update_with_placeholder_for_a_missing_row_is_a_dead_letter(
    target: Connection, applier: ChangeApplier, sink: CollectingSink
) -> None:
    # Given an empty target
    s = Stream()
    # When an update with an unchanged TOAST value arrives for a row that is not there, beside a good change
    batch = [s.update(item(8, qty=2, body=P), (1000, 1010)), s.create(item(9), (1100, 1110))]
    result = apply(applier, batch)
    # Then the update is a dead letter (its full value cannot be rebuilt) and the create is applied
    assert [(d.offset, d.source_lsn) for d in result.dead_letters] == [(0, 1010)]
    assert "unchanged TOAST values for a row that is not on the target" in result.dead_letters[0].reason
    assert rows(target) == [(9, "sku-9", 1, None)]
    assert sink.sent == result.dead_letters
    assert fetch_value(target, "SELECT count(*) FROM items WHERE body = %s", (P,)) == 0
    target.rollback()


def test_poison_events_become_dead_letters_and_the_rest_of_the_batch_is_applied(
    target: Connection, applier: ChangeApplier, sink: CollectingSink
) -> None:
    # Given a row holding sku 'taken'
    s = Stream()
    apply(applier, [s.create(item(1, sku="taken"), (1000, 1010))])

    # When one batch mixes good changes with poison ones
    batch = [
        s.create(item(2), (1100, 1110)),  # good
        s.raw(b'{"id":3}', b"{this is not json"),  # unparseable
        s.create({**item(4), "colour": "red"}, (1200, 1210)),  # a column the target lacks
        s.create(item(5, sku="taken"), (1300, 1310)),  # unique violation on a non-key column
        s.create(item(6, qty="many"), (1400, 1410)),  # fails the cast to int
        s.create(item(7, at="not a number of micros"), (1500, 1510)),  # fails the cast to timestamp
        s.update(item(1, sku="taken", qty=10), (1600, 1610)),  # good
        s.create(item(8), (1700, 1710)),  # good
    ]
    result = apply(applier, batch)

    # Then each poison event is a dead letter with a clear reason and its position
    letters = {d.offset: d for d in result.dead_letters}
    assert sorted(letters) == [2, 3, 4, 5, 6]
    assert letters[2].reason.startswith("unparseable event: the record's value is not JSON")
    assert letters[2].source_lsn is None and letters[2].value == "{this is not json"
    assert "schema mismatch: column(s) colour" in letters[3].reason and letters[3].source_lsn == 1210
    assert "duplicate key value violates unique constraint" in letters[4].reason and letters[4].source_lsn == 1310
    assert "invalid input syntax for type integer" in letters[5].reason and letters[5].source_lsn == 1410
    assert "invalid input syntax for type timestamp" in letters[6].reason and letters[6].source_lsn == 1510
    assert all(d.topic == TOPIC and d.partition == 0 for d in result.dead_letters)
    # And the rest of the batch is applied
    assert rows(target) == [(1, "taken", 10, None), (2, "sku-2", 1, None), (8, "sku-8", 1, None)]

    # And the dead letters are recorded once on the target and sent to the sink
    recorded = letters_on_target(target)
    assert [(r[2], r[3]) for r in recorded] == [(d.offset, d.source_lsn) for d in result.dead_letters]
    assert [r[4] for r in recorded] == [d.reason for d in result.dead_letters]
    assert sink.sent == result.dead_letters

    # When the same batch is delivered again
    again = apply(applier, batch)
    # Then it is a replay: no new dead letter, nothing sent again
    assert again.replayed == len(batch) and again.dead_letters == []
    assert len(letters_on_target(target)) == 5 and len(sink.sent) == 5


def test_a_unique_value_moving_between_rows_is_not_a_dead_letter(target: Connection, applier: ChangeApplier) -> None:
    # Given rows A (sku 'a') and B (sku 'b')
    s = Stream()
    apply(applier, [s.create(item(1, sku="a"), (1000, 1010)), s.create(item(2, sku="b"), (1000, 1020))])
    # When, within one batch, the skus swap through a temporary value (legal on the source, in this order)
    batch = [
        s.update(item(2, sku="tmp"), (1100, 1110)),
        s.update(item(1, sku="b"), (1100, 1120)),
        s.update(item(2, sku="a"), (1100, 1130)),
    ]
    result = apply(applier, batch)
    # Then the swap is applied (change by change) without a dead letter
    assert result.dead_letters == []
    assert rows(target) == [(1, "b", 1, None), (2, "a", 1, None)]


def test_records_of_an_unmapped_topic_are_dead_letters(target: Connection, applier: ChangeApplier) -> None:
    # Given a record on a topic that feeds no target table
    stray = Stream(f"{PREFIX}.public.unknown")
    result = apply(applier, [stray.create(item(1), (1000, 1010))])
    # Then it is a dead letter naming the topic
    assert [d.reason for d in result.dead_letters] == [f"no target table is mapped to topic '{PREFIX}.public.unknown'"]


def test_heartbeats_only_mark_the_stream_as_streaming(target: Connection, applier: ChangeApplier) -> None:
    # Given a heartbeat record
    beat = Stream(heartbeat_topic(PREFIX))
    result = apply(applier, [beat.raw(b'{"serverName":"zdm_apply"}', b'{"ts_ms":1}')])
    # Then nothing is applied, no dead letter, and the snapshot is known to be over
    assert result.applied == 0 and result.dead_letters == [] and result.snapshot_completed
    assert fetch_value(target, "SELECT snapshot_completed FROM _zdm.dbz_stream") is True
    target.rollback()


def test_a_transient_target_error_is_not_a_dead_letter_the_batch_is_delivered_again(
    fresh_dbs: tuple[str, str], target: Connection, applier: ChangeApplier, sink: CollectingSink
) -> None:
    # Given a row that another session holds locked, and an applier session that waits 100 ms for locks
    s = Stream()
    apply(applier, [s.create(item(1), (1000, 1010))])
    execute(target, "SET lock_timeout = '100ms'")
    target.commit()
    other = connect(fresh_dbs[1], autocommit=False)
    execute(other, "SELECT * FROM items WHERE id = 1 FOR UPDATE")

    # When a batch updating that row times out on the lock
    batch = [s.create(item(2), (1100, 1110)), s.update(item(1, qty=7), (1100, 1120))]
    with pytest.raises(psycopg2.errors.LockNotAvailable):
        apply(applier, batch)

    # Then nothing of the batch was committed and no change was dropped as a dead letter
    assert rows(target) == [(1, "sku-1", 1, None)]
    assert letters_on_target(target) == [] and sink.sent == []
    assert state.stored_offsets(target, [TOPIC]) == {(TOPIC, 0): 1}

    # And delivered again once the lock is gone, the batch applies
    other.rollback()
    other.close()
    result = apply(applier, batch)
    assert result.applied == 2 and result.dead_letters == []
    assert rows(target) == [(1, "sku-1", 7, None), (2, "sku-2", 1, None)]


def test_an_event_without_a_column_the_source_has_is_a_dead_letter_not_a_null(
    target: Connection, sink: CollectingSink
) -> None:
    # Given the source's columns as the engine recorded them at its start: all of the target's but `at`
    # (a column only the target has)
    state.record_source_columns(target, {str(ITEMS): ["id", "sku", "qty", "note", "body", "doc", "tags"]})
    applier = ChangeApplier(target, StreamRouting.load(target, PREFIX, [ITEMS]), sink)
    s = Stream()
    without_doc = {k: v for k, v in item(1, doc='{"a": 1}').items() if k not in ("doc", "at")}
    without_at = {k: v for k, v in item(2).items() if k != "at"}
    # When an insert comes without `doc` (as Debezium sends a column of a type it does not know: not at all)
    # and another without `at`
    result = apply(applier, [s.create(without_doc, (1000, 1010)), s.create(without_at, (1100, 1110))])
    # Then the first is a dead letter naming the column, not a row whose doc is NULL; the second applies
    assert [d.offset for d in result.dead_letters] == [0]
    assert "no value for column(s) doc of public.items" in result.dead_letters[0].reason
    assert "engine 'logical'" in result.dead_letters[0].reason
    assert rows(target) == [(2, "sku-2", 1, None)]


# -- schema changes, gaps and keys that are equal but not the same ---------------------------------


def add_column_on_target(target: Connection, ddl: str = "ALTER TABLE items ADD COLUMN extra int") -> None:
    execute(target, ddl)
    target.commit()


def test_a_delete_ending_a_batch_still_applies_after_a_column_is_added_on_the_target(
    target: Connection, applier: ChangeApplier
) -> None:
    # Given a batch that ended with a delete (its row is kept aside for a key move split across batches)
    s = Stream()
    apply(applier, [s.create(item(1), (1000, 1010)), s.create(item(2), (1000, 1020)), s.create(item(3), (1000, 1030))])
    assert apply(applier, s.delete(1, (1100, 1110))).dead_letters == []
    # When a column is added on the target (as a schema change must start) and a batch ends with a delete again
    add_column_on_target(target)
    result = apply(applier, [s.update(item(3, qty=7), (1200, 1210)), *s.delete(2, (1300, 1310))])
    # Then it applies (the kept-row table once had the old shape: "INSERT has more expressions than target columns")
    assert [d.reason for d in result.dead_letters] == []
    assert rows(target, "id, sku, qty, extra") == [(3, "sku-3", 7, None)]


def test_a_key_move_still_applies_after_a_column_is_added_on_the_target(
    target: Connection, applier: ChangeApplier
) -> None:
    # Given a key move with unchanged TOAST values applied (the session's copy aside exists)
    s = Stream()
    apply(applier, [s.create(item(1, **BIG), (1000, 1010)), s.create(item(2, **BIG), (1000, 1020))])
    assert apply(applier, moved(s, 1, 4, (1100, 1110), sku="sku-1")).dead_letters == []
    # When a column is added on the target and another key moves in the same session
    add_column_on_target(target)
    result = apply(applier, moved(s, 2, 5, (1200, 1210), sku="sku-2"))
    # Then it moves with its values
    assert [d.reason for d in result.dead_letters] == []
    assert [r[0] for r in big_rows(target)] == [4, 5]


def test_a_column_added_on_the_target_then_on_the_source_is_applied_while_the_applier_runs(
    target: Connection, applier: ChangeApplier
) -> None:
    # Given a running applier (its routing read before the change)
    s = Stream()
    apply(applier, [s.create(item(1), (1000, 1010))])
    # When a column is added on the target first, then on the source, whose events now carry it
    add_column_on_target(target, "ALTER TABLE items ADD COLUMN colour text")
    result = apply(applier, [s.create({**item(2), "colour": "red"}, (1100, 1110))])
    # Then the change is applied with it, not a "schema mismatch" dead letter
    assert [d.reason for d in result.dead_letters] == []
    assert rows(target, "id, colour") == [(1, None), (2, "red")]
    # And a column the target still lacks is a dead letter naming it
    unknown = apply(applier, [s.create({**item(3), "size": 9}, (1200, 1210))])
    assert [d.reason.split(";")[0] for d in unknown.dead_letters] == [
        "schema mismatch: column(s) size of the event are not on target table public.items"
    ]


def test_a_gap_in_a_partitions_offsets_is_a_dead_letter_not_passed_over(
    target: Connection, applier: ChangeApplier
) -> None:
    # Given records at offsets 2 and 3 that never reach the applier (a batch the event source mapping gave
    # up on, or records removed by retention before they were applied)
    s = Stream()
    apply(applier, [s.create(item(1), (1000, 1010)), s.create(item(2), (1000, 1020))])
    lost = [s.update(item(1, qty=5), (1100, 1110)), s.create(item(3), (1100, 1120))]
    assert [r.offset for r in lost] == [2, 3]
    # When the next record (offset 4) is applied
    result = apply(applier, [s.create(item(4), (1200, 1210))])
    # Then the gap is a dead letter naming the offsets (it trips the health gate), and offset 4 is applied
    assert [d.reason for d in result.dead_letters] == [
        f"offsets 2..3 of {TOPIC}[0] were never delivered to the applier: their changes are missing on the target"
    ]
    assert [r[0] for r in rows(target)] == [1, 2, 4]


def test_a_float_key_moving_from_zero_to_minus_zero_in_one_batch_keeps_the_sign(fresh_dbs: tuple[str, str]) -> None:
    # Given a float8 key 0 on the target
    setup = connect(fresh_dbs[1])
    execute(setup, "CREATE TABLE f (k float8 PRIMARY KEY, v int)")
    setup.close()
    s = Stream(f"{PREFIX}.public.f")

    def keyed(op: str, row: dict[str, Any], pos: tuple[int, int]) -> StreamRecord:
        return s.change(op, row, pos, key={"k": row["k"]})

    with closing(open_target(fresh_dbs[1])) as conn:
        applier = ChangeApplier(conn, StreamRouting.load(conn, PREFIX, [TableName("public", "f")]), CollectingSink())
        apply(applier, [keyed("c", {"k": 0.0, "v": 1}, (1000, 1010))])
        # When UPDATE f SET k = '-0' arrives (Debezium: a delete of 0 and a create of -0) in one batch
        apply(applier, [keyed("d", {"k": 0.0}, (1100, 1110)), keyed("c", {"k": -0.0, "v": 1}, (1100, 1110))])
        # Then the target holds -0 (0 == -0, but they are different values: once folded into one upsert)
        assert fetch_all(conn, "SELECT k::text, v FROM f") == [("-0", 1)]


# -- a key move cut by a connector crash after its delete, published again after the restart ----------------

WHOLE = [(4, "sku-1", 1, "bbbbbbbbbbbb", 9_000, '{"k": [1, 2]}', ["t1", "t2"])]


def test_a_move_cut_after_its_delete_by_a_connector_crash_and_published_again_in_one_batch(
    target: Connection, applier: ChangeApplier
) -> None:
    # Given row 1 with TOASTed values, and its move 1 -> 4 (unchanged TOAST) of which the connector published
    # only the delete (and its tombstone) before it was killed: the applier applied them as a batch
    s = Stream()
    apply(applier, [s.create(item(1, **BIG), (1000, 1010))])
    cut = apply(applier, s.delete(1, (1100, 1110)))  # the move's delete and tombstone, its create never sent
    # When the restarted connector publishes the move again, whole, under new offsets (one batch)
    again = moved(s, 1, 4, (1100, 1110), sku="sku-1")
    result = apply(applier, again)
    # Then row 4 is whole and nothing is a dead letter (the first batch kept the row its delete removed)
    assert cut.dead_letters == []
    assert [d.reason[:60] for d in result.dead_letters] == []
    assert big_rows(target) == WHOLE


def test_a_move_cut_after_its_delete_by_a_connector_crash_and_published_again_across_batches(
    target: Connection, applier: ChangeApplier
) -> None:
    # Given the same cut move: only its delete applied
    s = Stream()
    apply(applier, [s.create(item(1, **BIG), (1000, 1010))])
    cut = apply(applier, s.delete(1, (1100, 1110)))
    # When the move is published again and a batch boundary falls between its delete and its create
    again = moved(s, 1, 4, (1100, 1110), sku="sku-1")
    first = apply(applier, again[:2])
    second = apply(applier, again[2:])
    # Then row 4 is whole and nothing is a dead letter
    assert cut.dead_letters == [] and first.dead_letters == []
    assert [d.reason[:60] for d in second.dead_letters] == []
    assert big_rows(target) == WHOLE


def items_and_others_appliers(
    target: Connection, sink: CollectingSink, *, one_applier: bool
) -> tuple[ChangeApplier, ChangeApplier]:
    """A second table, `others`, like items; the appliers of items and of others: one applier for both, or
    one each (as one event source mapping per topic runs)."""
    execute(target, "CREATE TABLE others (LIKE items INCLUDING ALL)")
    target.commit()
    others = TableName("public", "others")
    if one_applier:
        both = ChangeApplier(target, StreamRouting.load(target, PREFIX, [ITEMS, others]), sink)
        return both, both
    return (
        ChangeApplier(target, StreamRouting.load(target, PREFIX, [ITEMS]), sink),
        ChangeApplier(target, StreamRouting.load(target, PREFIX, [others]), sink),
    )


@pytest.mark.parametrize("lagging_read", [False, True], ids=["fed-by-another-applier", "older-read-in-same-batch"])
def test_a_snapshot_taken_again_empties_a_table_the_source_emptied_meanwhile(
    target: Connection, sink: CollectingSink, lagging_read: bool
) -> None:
    # Given a second table, and a first snapshot (at LSN 100) of which both tables' reads were applied, each
    # table by its own applier (as one event source mapping per topic does), or both by one
    items_only, others_only = items_and_others_appliers(target, sink, one_applier=lagging_read)
    s, o = Stream(), Stream(f"{PREFIX}.public.others")
    apply(items_only, [s.change("r", item(1), (0, 100)), s.change("r", item(2), (0, 100))])
    apply(others_only, [o.change("r", item(7), (0, 100))])
    # When the connector, stopped before its offsets said the snapshot was done, takes it again at LSN 200,
    # after the source deleted items 2 and emptied `others`: only items gets reads (an empty table gets none)
    batch = [s.change("r", item(1, qty=9), (0, 200))]
    if lagging_read:  # and a read of the first snapshot, delivered late, shares the batch
        batch = [o.change("r", item(8), (0, 100)), *batch]
    result = apply(items_only, batch)
    # Then both tables hold the second snapshot only: `others` is empty
    assert result.dead_letters == []
    assert rows(target) == [(1, "sku-1", 9, None)]
    assert fetch_all(target, "SELECT id FROM others") == []
    target.rollback()
    # And a read of the first snapshot delivered later to its own applier is skipped, not applied
    late = apply(others_only, [o.change("r", item(9), (0, 100))])
    assert late.republished == 1 and fetch_all(target, "SELECT id FROM others") == []
    target.rollback()
    # And the same batch delivered again changes nothing
    again = apply(items_only, batch)
    assert again.applied == 0 and rows(target) == [(1, "sku-1", 9, None)]


def test_a_snapshot_taken_again_after_streaming_began_reloads_the_table(
    target: Connection, applier: ChangeApplier
) -> None:
    # Given rows 1 and 2 read by a snapshot at LSN 100, then row 1 updated and row 3 inserted by the stream
    s = Stream()
    apply(applier, [s.change("r", item(1), (0, 100)), s.change("r", item(2), (0, 100))])
    apply(applier, [s.update(item(1, qty=5), (1000, 1010)), s.create(item(3), (1100, 1110))])
    # When the connector restarts without a stored offset (a Kafka Connect worker that died before its first
    # flush) and snapshots again at LSN 2000, after the source deleted row 2 and updated row 3 meanwhile
    result = apply(applier, [s.change("r", item(1, qty=5), (0, 2000)), s.change("r", item(3, qty=7), (0, 2000))])
    # Then the table is the new snapshot's: row 2 is gone and row 3 has the change no event carried
    assert result.dead_letters == [] and result.republished == 0
    assert rows(target) == [(1, "sku-1", 5, None), (3, "sku-3", 7, None)]
    # And the stream goes on from after that snapshot
    apply(applier, [s.update(item(3, qty=8), (2100, 2110))])
    assert rows(target) == [(1, "sku-1", 5, None), (3, "sku-3", 8, None)]
    # And reads of either snapshot delivered again after that are skipped
    again = apply(applier, [s.change("r", item(2), (0, 100)), s.change("r", item(3, qty=7), (0, 2000))])
    assert again.republished == 2 and again.applied == 0
    assert rows(target) == [(1, "sku-1", 5, None), (3, "sku-3", 8, None)]


def test_a_state_without_snapshot_lsns_treats_old_reads_after_streaming_as_replays(
    target: Connection, applier: ChangeApplier
) -> None:
    # Given a streaming partition whose state an earlier version wrote (no snapshot LSN recorded)
    s = Stream()
    apply(applier, [s.change("r", item(1), (0, 100)), s.change("r", item(2), (0, 100))])
    apply(applier, [s.update(item(1, qty=5), (1000, 1010))])
    execute(target, "UPDATE _zdm.dbz_partitions SET snapshot_lsn = NULL")
    target.commit()
    # When a read of that first snapshot is delivered again
    result = apply(applier, [s.change("r", item(2, qty=9), (0, 100))])
    # Then it is a replay: the table is not emptied nor changed
    assert result.republished == 1
    assert rows(target) == [(1, "sku-1", 5, None), (2, "sku-2", 1, None)]


@pytest.mark.parametrize("same_batch", [False, True], ids=["fed-by-another-applier", "late-event-in-same-batch"])
def test_a_snapshot_taken_again_empties_a_streamed_table_the_source_emptied_meanwhile(
    target: Connection, sink: CollectingSink, same_batch: bool
) -> None:
    # Given two tables read by a snapshot at LSN 100, `others` then changed by the stream (LSN 1010)
    items_only, others_only = items_and_others_appliers(target, sink, one_applier=same_batch)
    s, o = Stream(), Stream(f"{PREFIX}.public.others")
    apply(items_only, [s.change("r", item(1), (0, 100))])
    apply(others_only, [o.change("r", item(7), (0, 100)), o.create(item(8), (1000, 1010))])
    # When the connector snapshots again at LSN 2000, after the source emptied `others`: only items gets
    # reads, and a change `others` streamed before (LSN 1020) is still on its way
    late = o.update(item(8, qty=4), (1000, 1020))
    batch = (
        [late, s.change("r", item(1, qty=9), (0, 2000))] if same_batch else [s.change("r", item(1, qty=9), (0, 2000))]
    )
    result = apply(items_only, batch)
    if not same_batch:
        skipped = apply(others_only, [late])
        assert skipped.republished == 1
    # Then `others` is empty, the late older change is not applied, and items holds the new snapshot
    assert result.dead_letters == []
    assert fetch_all(target, "SELECT id FROM others") == []
    target.rollback()
    assert rows(target) == [(1, "sku-1", 9, None)]
    # And a change after the new snapshot applies to `others` again
    apply(others_only, [o.create(item(9), (2100, 2110))])
    assert fetch_all(target, "SELECT id FROM others") == [(9,)]
    target.rollback()
