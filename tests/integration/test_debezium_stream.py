"""The debezium engine end to end: real PostgreSQL, a real broker, the real Debezium engine."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from lambdas.core.catalog import describe_tables
from lambdas.core.changestream.connector import dead_letter_topic, table_topic
from lambdas.core.changestream.convert import is_unavailable
from lambdas.core.changestream.kafka import KafkaStream
from lambdas.core.config import LagLimits
from lambdas.core.db import Connection, connect, execute, fetch_all, fetch_value
from lambdas.core.engines.base import Phase
from lambdas.core.engines.debezium import DebeziumEngine
from lambdas.core.engines.table_locks import TableLocksBusy
from lambdas.core.health import ReplicationSignal, evaluate_health
from lambdas.core.preflight.facts import SentWrongly, values_sent_wrongly
from lambdas.core.tables import TableName
from rehearsal import sample
from rehearsal.broker import Broker
from rehearsal.changestream import LocalChangeStream
from rehearsal.compare import compare_databases
from rehearsal.servers import PostgresServer
from rehearsal.workload import Workload
from tests.integration.stream_env import fence, make_engine, running, wait_until

TABLES = tuple(TableName.parse(t) for t in sample.SAMPLE_TABLES)


def given_sample(src: str, tgt: str, rows: int) -> None:
    source, target = connect(src), connect(tgt)
    sample.create_schema(source)
    sample.create_schema(target)
    sample.load_data(source, rows)
    source.close()
    target.close()


@contextmanager
def sample_streaming(
    src: str, tgt: str, broker: Broker, workdir: Path, *, rows: int, name: str
) -> Iterator[DebeziumEngine]:
    """The sample shop (`rows` orders) on the source and its schema on the target; the stream started over its
    tables and its snapshot applied. Stops the stream at the end."""
    given_sample(src, tgt, rows)
    engine = make_engine(src, tgt, broker, workdir, TABLES, name=name)
    with running(engine):
        engine.start()
        wait_until(lambda: engine.status().copy_done, 120, "the snapshot to be applied", engine)
        yield engine


def local(engine: DebeziumEngine) -> LocalChangeStream:
    runtime = engine.runtime
    assert isinstance(runtime, LocalChangeStream)
    return runtime


def read_topic(
    bootstrap: str, topic: str, start: int = 0, idle: float = 1.0
) -> list[tuple[int, bytes | None, bytes | None]]:
    """Every record of partition 0 from `start` until nothing new arrives for `idle` seconds."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "zdm-test-reader", "enable.auto.commit": False})
    try:
        consumer.assign([TopicPartition(topic, 0, start)])
        out: list[tuple[int, bytes | None, bytes | None]] = []
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < idle:
            messages = [m for m in consumer.consume(num_messages=1000, timeout=0.2) if m.error() is None]
            if messages:
                quiet_since = time.monotonic()
            out += [(m.offset(), m.key(), m.value()) for m in messages]
        return out
    finally:
        consumer.close()


def stored_a_streamed_offset(runtime: LocalChangeStream) -> bool:
    """Whether the local connector's stored offset is a streamed change's (its offsets file: a streamed change's
    offset has an LSN and no snapshot mark)."""
    stored = [f.read_bytes() for f in runtime.workdir.rglob("offsets.dat")]
    return any(b'"lsn"' in data and b'"snapshot"' not in data for data in stored)


def snapshot_rows(tgt: str) -> dict[str, int]:
    target = connect(tgt)
    try:
        return {name: int(n) for name, n in fetch_all(target, "SELECT table_name, snapshot_rows FROM _zdm.dbz_tables")}
    finally:
        target.close()


def assert_converged(src: str, tgt: str, tables: Sequence[TableName] = TABLES) -> None:
    diffs = [d for d in compare_databases(src, tgt, tables) if not d.equal]
    assert diffs == [], diffs


def test_snapshot_then_stream_converges_under_writes(
    fresh_dbs: tuple[str, str], broker: Broker, tmp_path: Path
) -> None:
    # Given a source with the sample schema and rows, an empty target, and the stream started
    src, tgt = fresh_dbs
    with sample_streaming(src, tgt, broker, tmp_path / "stream", rows=20_000, name="dbz-test") as engine:
        # When writers insert, update and delete for a while
        workload = Workload(src, clients=3).start()
        wait_until(lambda: (engine.status().pending_events or 0) > 0 or True, 5, "changes")
        time.sleep(4)
        workload.stop()
        source = connect(src)
        try:
            reached = engine.wait_for_fence(source, timeout=60)
        finally:
            source.close()
        # Then the target equals the source row for row
        diffs = [d for d in compare_databases(src, tgt, TABLES) if not d.equal]
        assert diffs == [], diffs
        status = engine.status()
        assert status.dead_letters == 0
        assert status.pending_events == 0
        assert reached.waited_seconds < 60


# --- every type, exactly -------------------------------------------------------------------------

KINDS_SQL = """
CREATE EXTENSION IF NOT EXISTS hstore;
CREATE TABLE kinds (
    id          bigserial PRIMARY KEY,
    ext_id      uuid NOT NULL DEFAULT gen_random_uuid(),
    n_small     smallint,
    n_int       integer,
    n_big       bigint,
    price       numeric(12,2),
    exact       numeric,
    weight      double precision,
    ratio       real,
    flag        boolean,
    name        text,
    code        varchar(12),
    fixed       char(4),
    created_at  timestamptz,
    created_ms  timestamptz(3),
    local_at    timestamp,
    local_ms    timestamp(3),
    local_s     timestamp(0),
    day         date,
    at_time     time,
    at_time_ms  time(3),
    span        interval,
    doc         json,
    attrs       jsonb,
    thumb       bytea,
    tags        text[],
    amounts     numeric[],
    counts      integer[],
    bigs        bigint[],
    days        date[],
    ids         uuid[],
    docs        jsonb[],
    stamps      timestamp(3)[],
    props       hstore,
    big_text    text,
    big_doc     jsonb,
    big_blob    bytea,
    big_tags    text[],
    big_counts  integer[],
    big_bigs    bigint[],
    big_days    date[],
    big_ids     uuid[],
    big_props   hstore
);
CREATE TABLE kinds_keys (
    k_id    uuid,
    k_line  integer,
    k_at    timestamp(3),
    label   text,
    body    text,  -- TOASTed: the key changes below leave it unchanged
    PRIMARY KEY (k_id, k_line, k_at)
);
"""

# Random, so that TOAST cannot compress them below its threshold: stored out of line (> 8 kB each).
RANDOM_TEXT = (
    "(SELECT string_agg(encode(decode(md5(random()::text) || md5(random()::text), 'hex'), 'base64'), '')"
    " FROM generate_series(1, 300))"
)
RANDOM_JSON = (
    "(SELECT jsonb_agg(jsonb_build_object(md5(random()::text), encode(decode(md5(random()::text), 'hex'), 'base64')))"
    " FROM generate_series(1, 200))"
)
RANDOM_BYTES = "(SELECT string_agg(decode(md5(random()::text), 'hex'), ''::bytea) FROM generate_series(1, 800))"

KINDS_FULL_ROW = (
    """
INSERT INTO kinds (n_small, n_int, n_big, price, exact, weight, ratio, flag, name, code, fixed,
    created_at, created_ms, local_at, local_ms, local_s, day, at_time, at_time_ms, span, doc, attrs, thumb,
    tags, amounts, counts, bigs, days, ids, docs, stamps, props,
    big_text, big_doc, big_blob, big_tags, big_counts, big_bigs, big_days, big_ids, big_props)
SELECT -32768, 2147483647, -9223372036854775808, 12345678.90, '-123456789012345678901234567890.000000000001',
    1.0000000000000002, 1.1, true, 'Zoë "quoted" \\ back – 李小龍 🎉', 'ünïcødé', 'ab',
    '1969-07-20 20:17:40.123456+00', '2024-02-29 23:59:59.999+05:30',
    '1900-01-01 00:00:00.000001', '1969-12-31 23:59:59.999', '2038-01-19 03:14:08',
    '1960-02-29', '24:00:00', '12:34:56.789', '-1 days +02:03:04.5',
    '{"b": 1,  "a": [1, 2.50, null]}', '{"nested": {"ü": [true, null, 1e3]}}', '\\x00ff10ab',
    ARRAY['a', NULL, 'x"y', 'b\\c', '', 'NULL', '{brace}', 'comma,here'], ARRAY[1.5, NULL, 2, -0.001]::numeric[],
    ARRAY[1, NULL, -3], ARRAY[9007199254740993, NULL]::bigint[], ARRAY['2020-01-01'::date, NULL, '1950-06-15'],
    ARRAY[gen_random_uuid(), NULL], ARRAY['{"a": 1}'::jsonb, NULL], ARRAY['2020-01-01 00:00:00.123'::timestamp(3), NULL],
    'a=>1, "b c"=>NULL, "q\\"x"=>"v\\\\", ü=>李',
    RANDOM_TEXT, RANDOM_JSON, RANDOM_BYTES,
    (SELECT array_agg(md5(random()::text)) FROM generate_series(1, 400)),
    (SELECT array_agg((random() * 2e9 - 1e9)::int) FROM generate_series(1, 4000)),
    (SELECT array_agg((random() * 9e18 - 4.5e18)::bigint) FROM generate_series(1, 2000)),
    (SELECT array_agg('2000-01-01'::date + (random() * 20000)::int) FROM generate_series(1, 4000)),
    (SELECT array_agg(gen_random_uuid()) FROM generate_series(1, 700)),
    (SELECT hstore(array_agg(md5(random()::text)), array_agg(md5(random()::text))) FROM generate_series(1, 300))
""".replace("RANDOM_TEXT", RANDOM_TEXT)
    .replace("RANDOM_JSON", RANDOM_JSON)
    .replace("RANDOM_BYTES", RANDOM_BYTES)
)

KINDS_EDGE_ROW = """
INSERT INTO kinds (n_small, n_int, n_big, price, exact, weight, ratio, flag, name, code, fixed, created_at, local_at,
    local_s, day, at_time, span, doc, attrs, thumb, tags, amounts, counts, props)
VALUES (0, 0, 0, 0.00, '0.000000', -0.0, 3.4e38, false, '', '', '', '2000-01-01 00:00:00+00', '1970-01-01 00:00:00',
    '1970-01-01 00:00:00', '1970-01-01', '00:00:00', '1 year 2 mons 3 days 04:05:06.789',
    '[]', '"just a string"', '\\x', '{}', '{}', '{}', '')
"""

BIG_COLUMNS = (
    "big_text",
    "big_doc",
    "big_blob",
    "big_tags",
    "big_counts",
    "big_bigs",
    "big_days",
    "big_ids",
    "big_props",
)
KINDS_TABLES = (TableName("public", "kinds"), TableName("public", "kinds_keys"))


def test_every_type_arrives_exactly_and_unchanged_toast_values_are_kept(
    fresh_dbs: tuple[str, str], broker: Broker, tmp_path: Path
) -> None:
    # Given a table with every type of the sample schema and more (NULLs, non-ASCII, arrays, hstore,
    # large random TOASTed values), rows on the source and the stream started
    src, tgt = fresh_dbs
    source, target = connect(src), connect(tgt)
    execute(source, KINDS_SQL)
    execute(target, KINDS_SQL)
    execute(source, KINDS_FULL_ROW)
    execute(source, KINDS_EDGE_ROW)
    execute(source, "INSERT INTO kinds (ext_id) VALUES (gen_random_uuid())")  # all NULL but the key
    execute(
        source,
        "INSERT INTO kinds_keys SELECT gen_random_uuid(), g, timestamp '2020-01-01 00:00:00.123' + g * interval '1 ms',"
        f" 'k' || g, {RANDOM_TEXT} FROM generate_series(1, 5) g",
    )
    assert fetch_value(
        source, "SELECT pg_column_size(big_text) > 8192 AND pg_column_size(big_doc) > 8192 FROM kinds WHERE id = 1"
    )
    engine = make_engine(src, tgt, broker, tmp_path / "stream", KINDS_TABLES, name="dbz-kinds")
    with running(engine):
        engine.start()
        wait_until(lambda: engine.status().copy_done, 120, "the snapshot to be applied", engine)

        # When rows stream in, an UPDATE of another column leaves the TOASTed values unchanged, an UPDATE
        # changes one of them, keys change and rows are deleted
        execute(source, KINDS_FULL_ROW)
        execute(source, KINDS_EDGE_ROW)
        execute(source, "UPDATE kinds SET name = 'renamed', n_int = n_int - 1 WHERE id IN (1, 4)")
        execute(source, f"UPDATE kinds SET big_text = {RANDOM_TEXT}, flag = NULL WHERE id = 4")
        execute(source, "UPDATE kinds SET code = 'twice' WHERE id = 1")
        execute(source, "DELETE FROM kinds WHERE id = 2")
        # (key changes of a row whose TOASTed values stay unchanged: 1 -> 40, then 40 -> 41 with another column)
        execute(source, "UPDATE kinds SET id = 40 WHERE id = 1")
        execute(source, "UPDATE kinds SET id = 41, code = 'moved' WHERE id = 40")
        execute(source, "UPDATE kinds_keys SET k_line = k_line + 100, label = 'moved' WHERE k_line <= 2")
        execute(source, "DELETE FROM kinds_keys WHERE k_line = 3")
        reached = engine.wait_for_fence(source, timeout=60)

        # Then the target equals the source exactly, in every column's text form
        diffs = [d for d in compare_databases(src, tgt, KINDS_TABLES) if not d.equal]
        assert diffs == [], diffs
        assert engine.status().dead_letters == 0
        assert fetch_value(target, "SELECT count(*) FROM kinds") == 4
        assert fetch_value(target, "SELECT count(*) FROM kinds WHERE kinds::text LIKE '%__zdm_unchanged_toast__%'") == 0
        assert reached.waited_seconds < 60
        # And the connector did send the placeholder, in each of its forms, for the unchanged TOASTed columns
        big = [c for c in BIG_COLUMNS if c != "big_text"]
        topic = table_topic(engine.plan.prefix, KINDS_TABLES[0])
        updates = [
            json.loads(v)["after"]
            for _, _, v in read_topic(broker.bootstrap, topic, idle=0.3)
            if v and json.loads(v)["op"] == "u" and json.loads(v)["after"]["id"] == 4
        ]
        assert updates and all(is_unavailable(updates[0][c]) for c in BIG_COLUMNS), updates[0]
        assert all(is_unavailable(u[c]) for u in updates[1:] for c in big)
        # And the key changes came as a delete and a create without the unchanged TOASTed values
        moves = [
            (event["op"], (event["after"] or event["before"])["id"], event["source"]["lsn"], event["after"])
            for event in (json.loads(v) for _, _, v in read_topic(broker.bootstrap, topic, idle=0.3) if v)
            if (event["after"] or event["before"] or {}).get("id") in (1, 40, 41) and event["op"] in ("c", "d")
        ]
        assert [(op, key) for op, key, _, _ in moves[-4:]] == [("d", 1), ("c", 40), ("d", 40), ("c", 41)], moves
        assert moves[-4][2] == moves[-3][2] and moves[-2][2] == moves[-1][2]
        assert all(is_unavailable(moves[-1][3][c]) for c in BIG_COLUMNS)
        # (and so did the composite-key moves of kinds_keys: uuid, integer and timestamp(3) key columns)
        keyed = [
            json.loads(v)["after"]
            for _, _, v in read_topic(broker.bootstrap, table_topic(engine.plan.prefix, KINDS_TABLES[1]), idle=0.3)
            if v and json.loads(v)["op"] == "c"
        ]
        assert len(keyed) == 2 and all(is_unavailable(row["body"]) for row in keyed), keyed
    source.close()
    target.close()


SPECIALS_SQL = """
CREATE TABLE specials (
    id    integer PRIMARY KEY,
    ts    timestamp,
    ts3   timestamp(3),
    tstz  timestamptz,
    d     date,
    n     numeric,
    n2    numeric(10,2),
    f8    double precision,
    f4    real,
    iv    interval,
    m     money,
    ds    date[],
    tss   timestamptz[],
    ts3s  timestamp(3)[],
    tss6  timestamp[],
    f8s   double precision[]
);
"""
SPECIALS_ROWS = {
    1: "'infinity', 'infinity', 'infinity', 'infinity', 'NaN', 'NaN', 'Infinity', 'Infinity', '178000000 years',"
    " 12.34, ARRAY['infinity'::date], ARRAY['infinity'::timestamptz], ARRAY['infinity'::timestamp(3)],"
    " ARRAY['-infinity'::timestamp], ARRAY['NaN'::float8]",
    2: "'-infinity', '-infinity', '-infinity', '-infinity', 'Infinity', 12.5, '-Infinity', '-Infinity',"
    " '-178000000 years', -0.01, ARRAY['-infinity'::date], ARRAY['-infinity'::timestamptz, '1900-01-01 00:00:00+01'],"
    " ARRAY['-infinity'::timestamp(3), '10000-01-01'], ARRAY['1582-10-15 00:00:00'::timestamp, '12000-05-05 01:02:03'],"
    " ARRAY['Infinity'::float8, '-Infinity', -0.0]",
    3: "'4713-01-01 00:00:00 BC', '294276-12-31 23:59:59.999', '4713-01-01 00:00:00+00 BC', '5874897-12-31',"
    " '-Infinity', -0.00, 'NaN', 'NaN', '1 mon -1 days 00:00:00.000001', '-92233720368547758.08',"
    " ARRAY['10000-01-01'::date, '1582-10-15'], ARRAY['10000-01-01 00:00:00+00'::timestamptz], NULL, NULL, NULL",
    4: "'0001-01-01 00:00:00 BC', '12000-01-01', '10000-01-01 00:00:00+00', '0001-01-01 BC', 1, 1, 1, 1, '1 day', 1,"
    " NULL, NULL, NULL, NULL, NULL",
    # an array element before the Gregorian calendar: Debezium drops its era, so the change must not apply
    5: "NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, ARRAY['0044-03-15 BC'::date], NULL, NULL, NULL, NULL",
}


@contextmanager
def streaming_after_snapshot(
    dbs: tuple[str, str], broker: Broker, workdir: Path, ddl: str, first_row: str, tables: Sequence[TableName]
) -> Iterator[tuple[DebeziumEngine, Connection, Connection]]:
    """Both databases given `ddl` and the source `first_row` (an INSERT); the stream started on `tables`
    and its snapshot applied. Yields the engine and connections to the source and the target."""
    with closing(connect(dbs[0])) as source, closing(connect(dbs[1])) as target:
        execute(source, ddl)
        execute(target, ddl)
        execute(source, first_row)
        engine = make_engine(dbs[0], dbs[1], broker, workdir, tables, name=f"dbz-{tables[0].name}")
        with running(engine):
            engine.start()
            wait_until(lambda: engine.status().copy_done, 120, "the snapshot to be applied", engine)
            yield engine, source, target


def test_special_values_arrive_exactly_and_an_unknowable_one_is_a_dead_letter(
    fresh_dbs: tuple[str, str], broker: Broker, tmp_path: Path
) -> None:
    # Given PostgreSQL's special values (infinite timestamps and dates, numeric NaN and infinities, BC and
    # years past 9999, in scalars and arrays), one row on the source before the snapshot
    src, tgt = fresh_dbs
    tables = (TableName("public", "specials"),)
    first = f"INSERT INTO specials VALUES (1, {SPECIALS_ROWS[1]})"
    with streaming_after_snapshot(fresh_dbs, broker, tmp_path, SPECIALS_SQL, first, tables) as (engine, source, target):
        # When the others stream in, one of them holding 0044-03-15 BC in a date[]
        for key in (2, 3, 4, 5):
            execute(source, f"INSERT INTO specials VALUES ({key}, {SPECIALS_ROWS[key]})")
        engine.wait_for_fence(source, timeout=60)

        # Then every row but that one is on the target exactly, in every column's text form
        diffs = [d for d in compare_databases(src, tgt, tables) if not d.equal]
        assert [(d.missing_on_target, d.extra_on_target, d.changed) for d in diffs] == [(["5"], [], [])], diffs
        # And that one is a dead letter saying why, not a row holding 0044-03-15 (AD)
        reasons = fetch_all(target, "SELECT reason FROM _zdm.dbz_dead_letters")
        assert len(reasons) == 1 and "before 1582-10-15" in reasons[0][0], reasons
        # And Debezium did send the encodings the applier turns back (pinned: another version may change them)
        sent = {
            event["id"]: event
            for event in (
                json.loads(v)["after"]
                for _, _, v in read_topic(broker.bootstrap, table_topic(engine.plan.prefix, tables[0]), idle=0.3)
                if v
            )
        }
        assert (sent[1]["ts"], sent[1]["ts3"], sent[1]["d"], sent[1]["n"]) == (
            9223372036825200000,
            9223372036825200,
            -622191234,
            "NAN",
        )
        assert (sent[2]["ts"], sent[2]["d"], sent[2]["n"], sent[2]["ds"], sent[2]["tss"][0]) == (
            -9223372036832400000,
            -2147472691,
            "POSITIVE_INFINITY",
            [-625821272],
            "+292269055-12-02T23:00:00.000000Z",
        )
        assert (sent[3]["n"], sent[3]["tstz"], sent[4]["tstz"]) == (
            "NEGATIVE_INFINITY",
            "-4712-01-01T00:00:00.000000Z",
            "+10000-01-01T00:00:00.000000Z",
        )
        assert sent[5]["ds"] == [-703383]  # 0044-03-15, era dropped


def test_arrays_of_two_dimensions_or_another_first_index_arrive_wrong_without_an_error_as_preflight_says(
    fresh_dbs: tuple[str, str], broker: Broker, tmp_path: Path
) -> None:
    # Given arrays Debezium cannot send (two dimensions, a first index of 0) in the snapshot and in the stream
    tables = (TableName("public", "shapes"),)
    ddl = "CREATE TABLE shapes (id int PRIMARY KEY, a integer[], t text[]); ALTER TABLE shapes REPLICA IDENTITY FULL"
    first = "INSERT INTO shapes VALUES (1, '{{1,2},{3,4}}', '[0:1]={x,y}')"
    with streaming_after_snapshot(fresh_dbs, broker, tmp_path, ddl, first, tables) as (engine, source, target):
        execute(source, "INSERT INTO shapes VALUES (2, '[0:1]={5,6}', '{{a,b},{c,d}}'), (3, '{7}', '{z}')")
        engine.wait_for_fence(source, timeout=60)
        # Then they arrive wrong, with no dead letter (pinned: the connector of another version may change it);
        # preflight's change_stream_types check refuses engine debezium while the source holds such values
        rows = fetch_all(target, "SELECT id, a::text, t::text FROM shapes ORDER BY id")
        assert [r[:2] for r in rows] == [(1, "{NULL,NULL}"), (2, "{5,6}"), (3, "{7}")]
        assert rows[0][2] == "{x,y}" and rows[1][2].startswith("{[Ljava.lang.String;@") and rows[2][2] == "{z}"
        assert fetch_all(target, "SELECT count(*) FROM _zdm.dbz_dead_letters") == [(0,)]
        infos = describe_tables(source, list(tables))
        assert values_sent_wrongly(source, infos.values()) == SentWrongly(
            ["public.shapes.a (integer[]): 2 value(s)", "public.shapes.t (text[]): 2 value(s)"], [], []
        )


INFINITIES_COLUMNS = (
    "ts timestamp, ts3 timestamp(3), ts0 timestamp(0), tstz timestamptz, tstz3 timestamptz(3), d date, ds date[],"
    " tss timestamptz[], ts3s timestamp(3)[], tsa timestamp[]"
)


def infinities_row(key: int, value: str) -> str:
    columns = ", ".join(
        [f"'{value}'"] * 6 + [f"ARRAY['{value}'::{t}]" for t in ("date", "timestamptz", "timestamp(3)", "timestamp")]
    )
    return f"INSERT INTO infinities VALUES ({key}, {columns})"


def test_infinite_dates_and_timestamps_arrive_exactly_from_the_snapshot_and_from_the_stream(
    fresh_dbs: tuple[str, str], broker: Broker, tmp_path: Path
) -> None:
    # Given infinity and -infinity in every date and timestamp column, scalars and arrays, before the snapshot
    # (Debezium encodes a date's infinities with other day numbers in its snapshot than in its stream)
    tables = (TableName("public", "infinities"),)
    ddl = f"CREATE TABLE infinities (id int PRIMARY KEY, {INFINITIES_COLUMNS})"
    first = f"{infinities_row(1, 'infinity')}; {infinities_row(2, '-infinity')}"
    with streaming_after_snapshot(fresh_dbs, broker, tmp_path, ddl, first, tables) as (engine, source, target):
        # When the same rows stream in again under other keys
        execute(source, f"{infinities_row(3, 'infinity')}; {infinities_row(4, '-infinity')}")
        engine.wait_for_fence(source, timeout=60)
        # Then all four are on the target exactly, with no dead letter
        diffs = [d for d in compare_databases(fresh_dbs[0], fresh_dbs[1], tables) if not d.equal]
        assert diffs == [], diffs
        assert fetch_all(target, "SELECT count(*) FROM infinities") == [(4,)]
        assert fetch_all(target, "SELECT reason FROM _zdm.dbz_dead_letters") == []
        # And the stream did send the date's other encodings (pinned: another version may change them)
        sent = {
            event["id"]: event["d"]
            for event in (
                json.loads(v)["after"]
                for _, _, v in read_topic(broker.bootstrap, table_topic(engine.plan.prefix, tables[0]), idle=0.3)
                if v
            )
        }
        assert sent == {1: -622191234, 2: -625821272, 3: -2147472692, 4: -2147472691}


def test_a_timestamp_past_what_debezium_can_encode_is_a_dead_letter_not_a_wrong_row(
    fresh_dbs: tuple[str, str], broker: Broker, tmp_path: Path
) -> None:
    # Given a timestamp after 294247-01-10 04:00:54.775807 (valid in PostgreSQL) in a row before the snapshot
    tables = (TableName("public", "late"),)
    ddl = "CREATE TABLE late (id int PRIMARY KEY, at timestamp, ats timestamp[])"
    first = "INSERT INTO late VALUES (1, '294276-12-31 12:00:00', NULL), (2, '2024-01-01', NULL)"
    with streaming_after_snapshot(fresh_dbs, broker, tmp_path, ddl, first, tables) as (engine, source, target):
        # When another streams in, and one holds such a timestamp in an array
        execute(
            source, "INSERT INTO late VALUES (3, '294270-01-01', NULL), (4, NULL, ARRAY['294270-01-01'::timestamp])"
        )
        execute(source, "INSERT INTO late VALUES (5, '294247-01-10 04:00:54.775806', NULL)")
        engine.wait_for_fence(source, timeout=60)
        # Then those rows are dead letters saying why, not rows holding 294247-01-10 04:00:54.775807; the rest
        # (the last timestamp Debezium can encode included) arrive exactly
        assert fetch_all(target, "SELECT id, at::text FROM late ORDER BY id") == [
            (2, "2024-01-01 00:00:00"),
            (5, "294247-01-10 04:00:54.775806"),
        ]
        reasons = [r[0] for r in fetch_all(target, "SELECT reason FROM _zdm.dbz_dead_letters ORDER BY id")]
        assert len(reasons) == 3 and all("after 294247-01-10 04:00:54.775807" in r for r in reasons), reasons


MORE_TYPES_SQL = """
CREATE EXTENSION IF NOT EXISTS citext;
CREATE EXTENSION IF NOT EXISTS ltree;
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TYPE pair AS (a integer, b text);
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE TABLE carried (
    id integer PRIMARY KEY, b1 bit(1), b16 bit(16), b3 bit(3), ip inet, net cidr, mac macaddr, mac8 macaddr8,
    r_int int4range, r_ts tsrange, r_tstz tstzrange, r_num numrange, r_date daterange, pt point, ci citext,
    lt ltree, x xml, tv tsvector, m mood, dom posint, ch char(5), o oid, tm6 time(6), js json,
    i2s smallint[], moods mood[], ips inet[], f4s real[], bools boolean[], cis citext[], vcs varchar(10)[],
    ranges int4range[]
);
CREATE TABLE left_out (id integer PRIMARY KEY, note text, bx box, pr pair);
"""
CARRIED_ROWS = [
    "(1, B'1', B'1000000000000011', B'011', '192.168.1.5/24', '10.0.0.0/8', '08:00:2b:01:02:03',"
    " '08:00:2b:01:02:03:04:05', '[1,10)', '[2020-01-01 00:00,2020-02-01 00:00)', '[2020-01-01 00:00+02,infinity)',"
    " '(1.5,2.25]', '[2020-01-01,2020-02-01)', '(1e-300,-0)', 'MixedCase', 'a.b.c', '<a x=\"1\">t</a>',"
    " 'fat:1A cat:2B', 'happy', 5, 'ab', 4294967295, '12:34:56.789123', '{\"a\": [1, 2.50]}',"
    " ARRAY[1,-2]::smallint[], ARRAY['sad','ok']::mood[], ARRAY['::1'::inet, '10.1.2.3'], ARRAY[1.5, 'NaN']::real[],"
    " ARRAY[true, NULL, false], ARRAY['A','b']::citext[], ARRAY['x', NULL]::varchar(10)[],"
    " ARRAY['[1,2)'::int4range, 'empty'])",
    "(2, B'0', B'0000000000000000', B'000', '::ffff:1.2.3.4', '2001:db8::/32', 'ff:ff:ff:ff:ff:ff', NULL, 'empty',"
    " '(,)', NULL, '[-1e-10,)', NULL, '(0,0)', 'ß', '', '<?xml version=\"1.0\"?><r/>', '', 'sad', 1, 'a    ', 0,"
    " '24:00:00', 'null', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}')",
]


def test_more_types_arrive_exactly_and_columns_debezium_leaves_out_are_dead_letters_not_nulls(
    fresh_dbs: tuple[str, str], broker: Broker, tmp_path: Path
) -> None:
    # Given bit strings, points, network addresses, ranges, text search, xml, enums, domains and their
    # arrays (one row before the snapshot), and a table with columns of types Debezium does not know
    src, tgt = fresh_dbs
    tables = (TableName("public", "carried"), TableName("public", "left_out"))
    first = f"INSERT INTO carried VALUES {CARRIED_ROWS[0]}"
    with streaming_after_snapshot(fresh_dbs, broker, tmp_path, MORE_TYPES_SQL, first, tables) as (
        engine,
        source,
        target,
    ):
        # When more rows stream in and change, and rows with a box and a composite value are inserted
        execute(source, f"INSERT INTO carried VALUES {CARRIED_ROWS[1]}")
        execute(source, "UPDATE carried SET ch = 'zz', b16 = B'0000000011110000', pt = '(2,3)' WHERE id = 1")
        execute(source, "INSERT INTO left_out VALUES (1, 'boxed', '((0,0),(1,1))', ROW(1, 'x'))")
        engine.wait_for_fence(source, timeout=60)

        # Then every carried row is on the target exactly, in every column's text form
        diffs = {d.table: d for d in compare_databases(src, tgt, tables) if not d.equal}
        assert list(diffs) == ["public.left_out"], diffs
        # And the row whose box and composite Debezium left out is a dead letter naming them, not a row of NULLs
        assert diffs["public.left_out"].missing_on_target == ["1"]
        reasons = fetch_all(target, "SELECT reason FROM _zdm.dbz_dead_letters")
        assert len(reasons) == 1 and "no value for column(s) bx, pr of public.left_out" in reasons[0][0], reasons


# --- crashes, poison, restarts, idempotence -----------------------------------------------------------


def test_applier_killed_again_and_again_loses_duplicates_and_regresses_nothing(
    fresh_dbs: tuple[str, str], broker: Broker, tmp_path: Path
) -> None:
    # Given the sample shop streaming to an empty target
    src, tgt = fresh_dbs
    given_sample(src, tgt, 20_000)
    engine = make_engine(src, tgt, broker, tmp_path / "stream", TABLES, name="dbz-crash")
    runtime = local(engine)
    pids: list[int] = []
    with running(engine):
        engine.start()

        def kill_applier() -> None:
            proc = runtime.process("applier")
            log = runtime.workdir / "applier" / "process.log"
            assert proc is not None, "the applier is not running:\n" + log.read_text(errors="replace")[-3000:]
            pids.append(proc.pid)
            proc.kill()  # SIGKILL: no chance to finish its batch or commit anything
            assert runtime.process("applier") is None
            engine.start()  # starts it again; the connector runs on

        # When the applier is killed while it applies the snapshot
        wait_until(lambda: sum(snapshot_rows(tgt).values()) > 0, 60, "the first snapshot batch", engine)
        kill_applier()
        wait_until(lambda: engine.status().copy_done, 120, "the snapshot to be applied", engine)

        # And killed three more times while writers insert, update and delete
        workload = Workload(src, clients=3).start()
        for _ in range(3):
            time.sleep(1.2)
            kill_applier()
        time.sleep(1.0)
        stats = workload.stop()
        fence(engine, src)

        # Then the target equals the source row for row: nothing lost, duplicated or regressed
        assert len(set(pids)) == 4
        assert stats.committed > 100 and stats.order_ids
        assert_converged(src, tgt)
        target = connect(tgt)
        try:
            found = fetch_value(target, "SELECT count(*) FROM orders WHERE id = ANY(%s)", (stats.order_ids,))
        finally:
            target.close()
        assert found == len(stats.order_ids)
        status = engine.status()
        assert status.dead_letters == 0 and status.pending_events == 0


def test_the_applier_rides_through_a_target_crash_and_restart_and_loses_nothing(
    pg_pair: tuple[PostgresServer, PostgresServer], fresh_dbs: tuple[str, str], broker: Broker, tmp_path: Path
) -> None:
    # Given the sample shop streaming to the target while writers insert, update and delete on the source
    src, tgt = fresh_dbs
    target_server = pg_pair[1]
    with sample_streaming(src, tgt, broker, tmp_path / "stream", rows=5_000, name="dbz-target-crash") as engine:
        runtime = local(engine)
        workload = Workload(src, clients=3).start()
        time.sleep(1.0)
        applier = runtime.process("applier")
        assert applier is not None
        # When the target crashes (immediate shutdown) under the applier, and starts again 2 s later
        try:
            target_server.kill()
            time.sleep(2.0)
        finally:
            target_server.restart()
        time.sleep(1.5)
        stats = workload.stop()
        fence(engine, src)
        # Then the same applier process connected again and applied the rest (as the event source mapping's
        # retry would, with a new invocation): the target equals the source row for row
        again = runtime.process("applier")
        assert again is not None and again.pid == applier.pid
        log = (runtime.workdir / "applier" / "process.log").read_text(errors="replace")
        assert "target connection lost, connecting again" in log
        assert stats.committed > 50 and stats.order_ids
        assert_converged(src, tgt)
        status = engine.status()
        assert status.dead_letters == 0 and status.pending_events == 0


def test_poison_event_goes_to_the_dead_letter_queue_the_rest_flows_and_the_gate_trips(
    fresh_dbs: tuple[str, str], broker: Broker, tmp_path: Path
) -> None:
    # Given the stream running, and a CHECK constraint that exists only on the target
    src, tgt = fresh_dbs
    given_sample(src, tgt, 2_000)
    target = connect(tgt)
    execute(target, "ALTER TABLE orders ADD CONSTRAINT only_on_target CHECK (note IS DISTINCT FROM 'poison')")
    engine = make_engine(src, tgt, broker, tmp_path / "stream", TABLES, name="dbz-poison")
    prefix = engine.plan.prefix
    with running(engine):
        engine.start()
        wait_until(lambda: engine.status().copy_done, 120, "the snapshot to be applied", engine)
        dlq_start = read_topic(broker.bootstrap, dead_letter_topic(prefix), idle=0.2)
        assert dlq_start == []
        healthy = evaluate_health([ReplicationSignal(engine.status(), LagLimits(max_seconds=60))])
        assert healthy.healthy, healthy.reasons

        # When the source writes a row the target refuses, a record that is no change event lands on a
        # table topic, and other changes go on around them
        source = connect(src)
        execute(source, "INSERT INTO orders (customer_id, note) VALUES (1, 'before')")
        poisoned = fetch_value(source, "INSERT INTO orders (customer_id, note) VALUES (2, 'poison') RETURNING id")
        producer = Producer({"bootstrap.servers": broker.bootstrap})
        customers_topic = table_topic(prefix, TableName("public", "customers"))
        producer.produce(customers_topic, key=b'{"id":1}', value=b"\x00 definitely not an event")
        assert producer.flush(10) == 0
        execute(source, "INSERT INTO orders (customer_id, note) VALUES (3, 'after')")
        execute(source, "UPDATE customers SET name = 'after the poison' WHERE id <= 5")
        execute(source, "DELETE FROM events WHERE id IN (SELECT id FROM events ORDER BY id LIMIT 10)")
        wait_until(lambda: engine.status().dead_letters == 2, 60, "two dead letters", engine)
        fence(engine, src)

        # Then both are on the DLQ topic with their reason and position
        letters = [json.loads(v or b"") for _, _, v in read_topic(broker.bootstrap, dead_letter_topic(prefix))]
        by_topic = {letter["topic"]: letter for letter in letters}
        assert len(letters) == 2
        refused = by_topic[table_topic(prefix, TableName("public", "orders"))]
        assert "only_on_target" in refused["reason"] and refused["reason"].startswith("the target refused the change")
        assert refused["source_lsn"] is not None and refused["offset"] >= 0
        assert '"note": "poison"' in refused["value"] or '"note":"poison"' in refused["value"]
        garbage = by_topic[customers_topic]
        assert garbage["reason"].startswith("unparseable event") and garbage["source_lsn"] is None
        # And on the target's table, once each
        recorded = fetch_all(
            target, "SELECT topic, kafka_offset, source_lsn, reason FROM _zdm.dbz_dead_letters ORDER BY id"
        )
        assert sorted((r[0], r[1], r[3]) for r in recorded) == sorted(
            (letter["topic"], letter["offset"], letter["reason"]) for letter in letters
        )
        # And everything else was applied: only the refused row differs
        diffs = {d.table: d for d in compare_databases(src, tgt, TABLES) if not d.equal}
        assert list(diffs) == ["public.orders"], diffs
        assert diffs["public.orders"].missing_on_target == [str(poisoned)]
        assert not diffs["public.orders"].changed and not diffs["public.orders"].extra_on_target
        # And the engine's status, and so the health gate, report them
        status = engine.status()
        assert status.dead_letters == 2
        verdict = evaluate_health([ReplicationSignal(status, LagLimits(max_seconds=60))])
        assert not verdict.healthy
        assert "2 change event(s) could not be applied and are in the dead-letter queue" in verdict.reasons
        source.close()
        # And a teardown drops the stream's state but keeps the dead letters (evidence, until someone looked)
        removed = engine.teardown().removed
        assert "_zdm.dbz_partitions" in removed and "_zdm.dbz_dead_letters" not in removed
        assert fetch_value(target, "SELECT count(*) FROM _zdm.dbz_dead_letters") == 2
        assert fetch_value(target, "SELECT to_regclass('_zdm.dbz_partitions')") is None
    target.close()


def test_connector_restart_resumes_from_its_offset_without_a_new_snapshot(
    fresh_dbs: tuple[str, str], broker: Broker, tmp_path: Path
) -> None:
    # Given the stream past its snapshot
    src, tgt = fresh_dbs
    with sample_streaming(src, tgt, broker, tmp_path / "stream", rows=5_000, name="dbz-restart") as engine:
        runtime = local(engine)
        snapshotted = snapshot_rows(tgt)
        after_snapshot = engine.kafka.end_offsets(engine.plan.table_topics)
        workload = Workload(src, clients=2, rate=100).start()
        # (once it has stored an offset of a streamed change: killed before, it takes the snapshot again, as
        # Debezium documents; seen under load, the offsets being stored once a second)
        wait_until(lambda: stored_a_streamed_offset(runtime), 30, "an offset past the snapshot", engine)

        # When the connector crashes (SIGKILL) while writers go on, and is started again
        connector = runtime.process("connector")
        assert connector is not None
        connector.kill()
        time.sleep(1.0)  # changes made while it is down
        engine.start()
        wait_until(
            lambda: (p := runtime.process("connector")) is not None and p.pid != connector.pid, 10, "a new connector"
        )
        time.sleep(2.0)
        # And it is stopped cleanly, changes are made, and it is started again
        engine.stop()
        assert engine.status().phase is Phase.STOPPED
        time.sleep(1.0)
        engine.start()
        time.sleep(2.0)
        stats = workload.stop()
        fence(engine, src)

        # Then every change arrived, nothing was snapshotted again, and the target equals the source
        assert stats.committed > 100
        assert_converged(src, tgt)
        assert snapshot_rows(tgt) == snapshotted
        for topic in engine.plan.table_topics:
            ops = [
                json.loads(v)["op"]
                for _, _, v in read_topic(broker.bootstrap, topic, after_snapshot.get((topic, 0), 0), idle=0.3)
                if v
            ]
            assert "r" not in ops, f"{topic} was snapshotted again"
        assert engine.status().dead_letters == 0


def test_start_and_teardown_twice_are_safe_and_a_new_run_after_teardown_starts_clean(
    fresh_dbs: tuple[str, str], broker: Broker, tmp_path: Path
) -> None:
    # Given the stream started twice
    src, tgt = fresh_dbs
    given_sample(src, tgt, 2_000)
    engine = make_engine(src, tgt, broker, tmp_path / "first", TABLES, name="dbz-twice")
    runtime = local(engine)
    first = engine.start()
    processes = {part: runtime.process(part) for part in ("connector", "applier")}
    second = engine.start()

    # Then the second start changed nothing
    assert not first.already_running and second.already_running
    assert all(p is not None for p in processes.values())
    assert {part: getattr(runtime.process(part), "pid", None) for part in processes} == {
        part: p.pid for part, p in processes.items() if p is not None
    }
    wait_until(lambda: engine.status().copy_done, 120, "the snapshot to be applied", engine)
    with closing(connect(src)) as source:
        execute(source, "DELETE FROM events WHERE id IN (SELECT id FROM events LIMIT 1)")  # a batch ends with a delete
    fence(engine, src)
    assert_converged(src, tgt)
    kept_rows = "SELECT count(*) FROM pg_tables WHERE schemaname = '_zdm' AND tablename LIKE 'dbz\\_moved\\_%'"
    with closing(connect(tgt)) as target:
        assert fetch_value(target, kept_rows) == 1  # the applier kept the deleted row, for a key move

    # When it is torn down twice
    removed = engine.teardown().removed
    again = engine.teardown().removed

    # Then the first removed the processes, the slot, the publication and the target's state; the second nothing
    assert f"slot {engine.plan.slot}" in removed and f"publication {engine.plan.publication}" in removed
    assert "_zdm.dbz_partitions" in removed
    assert again == []
    source, target = connect(src), connect(tgt)
    assert (
        fetch_value(source, "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (engine.plan.slot,)) == 0
    )
    assert (
        fetch_value(source, "SELECT count(*) FROM pg_publication WHERE pubname = %s", (engine.plan.publication,)) == 0
    )
    assert fetch_value(target, "SELECT to_regclass('_zdm.dbz_partitions')") is None
    assert fetch_value(target, kept_rows) == 0  # nor a copy of a deleted row
    assert runtime.process("connector") is None and runtime.process("applier") is None

    # When the migration runs again under the same name, onto an emptied target, after the source changed
    # (the topics still hold the first run's events)
    for table in reversed(TABLES):
        execute(target, f"TRUNCATE {table} CASCADE")
    execute(source, "DELETE FROM events WHERE id IN (SELECT id FROM events ORDER BY id LIMIT 50)")
    execute(source, "UPDATE customers SET name = 'second run' WHERE id <= 20")
    execute(source, "INSERT INTO orders (customer_id, note) SELECT g, 'second run' FROM generate_series(1, 20) g")
    rerun = make_engine(src, tgt, broker, tmp_path / "second", TABLES, name="dbz-twice")
    with running(rerun):
        rerun.start()
        wait_until(lambda: rerun.status().copy_done, 120, "the second snapshot to be applied", rerun)
        fence(rerun, src)
        # Then the target holds this run's snapshot, nothing of the first run's stream
        assert_converged(src, tgt)
        assert rerun.status().dead_letters == 0
    source.close()
    target.close()


def test_end_offsets_count_every_record_whatever_the_brokers_watermark_says(broker: Broker) -> None:
    # Given records produced in several batches (Tansu reports the last batch's base offset + 1 as its
    # high watermark)
    stream = KafkaStream({"bootstrap.servers": broker.bootstrap})
    stream.ensure_topics(["zdm-test-ends", "zdm-test-empty"])
    producer = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 5})
    for i in range(250):
        producer.produce("zdm-test-ends", value=b"x")
        if i % 100 == 99:
            producer.flush()
    producer.produce("zdm-test-ends", value=None)  # a tombstone counts too
    assert producer.flush(10) == 0
    # When the engine reads the topics' ends
    ends = stream.end_offsets(["zdm-test-ends", "zdm-test-empty", "zdm-test-missing"])
    # Then each is the offset the next record will get
    assert ends == {("zdm-test-ends", 0): 251, ("zdm-test-empty", 0): 0}


KEYS_DDL = """
CREATE EXTENSION IF NOT EXISTS citext;
CREATE TABLE f (k float8 PRIMARY KEY, v int);
CREATE TABLE n (k numeric PRIMARY KEY, v int);
CREATE TABLE c (k citext PRIMARY KEY, v int);
CREATE TABLE ch (k char(5) PRIMARY KEY, v int);
CREATE TABLE g (id int PRIMARY KEY, v int);
"""


def test_keys_equal_but_not_the_same_move_exactly_and_a_column_added_target_first_streams(
    fresh_dbs: tuple[str, str], broker: Broker, tmp_path: Path
) -> None:
    # Given tables keyed by values that compare equal without being the same (0 and -0, 1.0 and 1.00,
    # 'abc' and 'ABC' in citext, 'a' and 'a  ' in char(5)), streaming
    src = fresh_dbs[0]
    tables = tuple(TableName("public", t) for t in ("f", "n", "c", "ch", "g"))
    first = "INSERT INTO f VALUES (0, 1); INSERT INTO n VALUES (1.0, 1); INSERT INTO c VALUES ('abc', 1);"
    first += " INSERT INTO ch VALUES ('a', 1); INSERT INTO g VALUES (1, 1)"
    with streaming_after_snapshot(fresh_dbs, broker, tmp_path, KEYS_DDL, first, tables) as (engine, source, target):
        # When each key moves to its equal twin in one transaction (one batch)
        execute(source, "UPDATE f SET k = '-0'; UPDATE n SET k = 1.00; UPDATE c SET k = 'ABC'; UPDATE ch SET k = 'a  '")
        # And a column is added on the target, then on the source, and a row uses it
        execute(target, "ALTER TABLE g ADD COLUMN extra int")
        execute(source, "ALTER TABLE g ADD COLUMN extra int")
        execute(source, "INSERT INTO g VALUES (2, 2, 2)")
        fence(engine, src)
        # Then the target holds exactly the source's keys and rows, with no dead letter
        assert engine.status().dead_letters == 0
        for name in ("f", "n", "c", "ch"):
            query = f"SELECT k::text, v FROM {name} ORDER BY 1"
            assert fetch_all(target, query) == fetch_all(source, query), name
        assert fetch_all(target, "SELECT * FROM g ORDER BY 1") == [(1, 1, None), (2, 2, 2)]


def test_a_table_rebuilt_or_altered_on_the_source_is_a_problem_of_the_stream(
    fresh_dbs: tuple[str, str], broker: Broker, tmp_path: Path
) -> None:
    # Given two tables streaming through the connector's publication
    src, tgt = fresh_dbs
    for dsn in (src, tgt):
        with closing(connect(dsn)) as conn:
            execute(
                conn, "CREATE TABLE daily_stats (id int PRIMARY KEY, n int); CREATE TABLE kept (id int PRIMARY KEY)"
            )
    tables = [TableName("public", "daily_stats"), TableName("public", "kept")]
    engine = make_engine(src, tgt, broker, tmp_path / "stream", tables, name="dbz-rebuild")
    with running(engine):
        engine.start()
        wait_until(lambda: engine.status().copy_done, 120, "the snapshot to be applied", engine)
        assert engine.status().problems == []

        # When a nightly job rebuilds daily_stats on the source (DROP, CREATE, fill), and a release adds a
        # column to kept on the source only
        with closing(connect(src)) as conn:
            execute(conn, "DROP TABLE daily_stats; CREATE TABLE daily_stats (id int PRIMARY KEY, n int)")
            execute(conn, "ALTER TABLE kept ADD COLUMN note text")

        # Then the stream reports both: the publication no longer carries the table's changes, and the
        # target lacks the column (the applier would dead-letter every change that sets it)
        unpublished, drift = engine.status().problems
        assert unpublished.startswith("public.daily_stats no longer in publication")
        assert drift.startswith("the schemas no longer match: public.kept.note: missing on the target")

        # When the target follows, the column is no longer a problem
        with closing(connect(tgt)) as conn:
            execute(conn, "ALTER TABLE kept ADD COLUMN note text")
        assert engine.status().problems == [unpublished]


def test_a_long_lock_on_a_table_fails_the_start_naming_its_session_before_the_connector_runs(
    fresh_dbs: tuple[str, str], broker: Broker, tmp_path: Path
) -> None:
    # Given the sample, and a session holding a SHARE UPDATE EXCLUSIVE lock on a selected table, as a long
    # CREATE INDEX CONCURRENTLY, VACUUM or ANALYZE does
    src, tgt = fresh_dbs
    given_sample(src, tgt, 500)
    engine = make_engine(src, tgt, broker, tmp_path, TABLES, name="dbz-locks")
    engine.plan = replace(engine.plan, lock_wait_seconds=3)
    holder = connect(src, application_name="nightly-reindex", autocommit=False)
    execute(holder, "LOCK TABLE orders IN SHARE UPDATE EXCLUSIVE MODE")
    published = "SELECT count(*) FROM pg_publication WHERE pubname = %s"
    with running(engine):
        try:
            # When the engine starts / Then it gives up after the wait, naming the session, before any
            # connector runs (which would have waited for the lock with no bound)
            with pytest.raises(TableLocksBusy, match=r"creating publication .* application nightly-reindex"):
                engine.start()
            assert local(engine).process("connector") is None
            with closing(connect(src)) as source:
                assert fetch_value(source, published, (engine.plan.publication,)) == 0
            # When the lock is released / Then the start makes the publication of exactly the selected
            # tables, and the stream converges
            holder.rollback()
            engine.start()
            with closing(connect(src)) as source:
                tables = fetch_all(
                    source,
                    "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = %s ORDER BY 1",
                    (engine.plan.publication,),
                )
            assert [t for (t,) in tables] == sorted(str(t) for t in TABLES)
            wait_until(lambda: engine.status().copy_done, 120, "the snapshot to be applied", engine)
            fence(engine, src)
            assert_converged(src, tgt)
        finally:
            holder.close()


def test_a_table_created_on_the_source_after_the_start_is_named_as_not_captured(
    fresh_dbs: tuple[str, str], broker: Broker, tmp_path: Path
) -> None:
    # Given the stream started over the sample's tables and its snapshot applied
    src, tgt = fresh_dbs
    with sample_streaming(src, tgt, broker, tmp_path, rows=500, name="dbz-added"):
        # When the application's release creates a table on both sides and writes it on the source, and the
        # next invocation's engine selects it (the file's patterns match it)
        for dsn in (src, tgt):
            with closing(connect(dsn)) as conn:
                execute(conn, "CREATE TABLE coupons (code text PRIMARY KEY)")
        with closing(connect(src)) as conn:
            execute(conn, "INSERT INTO coupons VALUES ('spring')")
        later = make_engine(src, tgt, broker, tmp_path, [*TABLES, TableName("public", "coupons")], name="dbz-added")
        # Then its status names the table as not captured and says what to do, and nothing else goes wrong
        problems = later.status().problems
        text = " ".join(problems)
        assert "public.coupons: created on the source after the start, not captured" in text, problems
        assert "tables.exclude" in text
        assert "no longer in publication" not in text and "cannot read the broker" not in text, problems
