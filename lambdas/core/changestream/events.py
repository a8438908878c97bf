"""Debezium change events: the Kafka record as it arrives, and the parsed change.

The applier orders and de-duplicates on `StreamPosition`: Debezium's `source.sequence` is
[last committed LSN, change LSN]. The first element moves only between transactions and the
second grows within one, so the pair grows in stream (commit) order; the change LSN alone does
not (a transaction that began before another may commit after it). Snapshot reads precede
every streamed change of their table and carry the lowest position.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple

import msgspec


class StreamRecord(NamedTuple):
    """One Kafka record, whatever delivered it (a consumer, a Lambda event source mapping)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class Op(StrEnum):
    CREATE = "c"
    READ = "r"  # snapshot
    UPDATE = "u"
    DELETE = "d"
    TRUNCATE = "t"
    MESSAGE = "m"


class StreamPosition(NamedTuple):
    """Compared as a tuple: commit LSN first, then the change's LSN."""

    commit_lsn: int
    lsn: int

    @property
    def is_snapshot(self) -> bool:
        return self.lsn == 0 and self.commit_lsn == 0  # SNAPSHOT_POSITION (no change has LSN 0)


SNAPSHOT_POSITION = StreamPosition(0, 0)

# source.snapshot values that mark the end of a table's snapshot / of the whole snapshot
TABLE_SNAPSHOT_END = frozenset({"last", "last_in_data_collection"})
SNAPSHOT_END = "last"


@dataclass(slots=True)
class ChangeEvent:
    op: Op
    schema: str
    table: str
    key: dict[str, Any] | None
    after: dict[str, Any] | None
    position: StreamPosition
    lsn: int | None
    ts_ms: int | None
    snapshot_marker: str | None  # source.snapshot: 'true', 'first', 'last', 'last_in_data_collection', ...


class UnparseableEvent(ValueError):
    """A record that is not a Debezium change event we can apply; the reason is the message."""


_OPS = {op.value: op for op in Op}
_DECODE = json.JSONDecoder(parse_constant=str).decode  # NaN/Infinity stay text (no float NaN to re-encode)
_DECODE_ANY = msgspec.json.Decoder().decode  # exact for any integer (a float never stands in for a big one)


class _Source(msgspec.Struct):
    schema: str = ""
    table: str = ""
    lsn: int | None = None
    sequence: str | None = None
    snapshot: str | None = None
    ts_ms: int | None = None


class _Envelope(msgspec.Struct):
    """The fields of Debezium's JSON envelope the applier reads; others are skipped unread."""

    op: str
    source: _Source
    after: dict[str, Any] | None = None
    before: dict[str, Any] | None = None


# The hot path: a typed decode of the envelope as Debezium writes it. Anything else (another shape, a
# wrong type, invalid UTF-8 or JSON) is read again by the general path, which says what is wrong.
_DECODE_ENVELOPE = msgspec.json.Decoder(_Envelope).decode


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = _DECODE_ANY(raw)
    except msgspec.DecodeError:
        value = _json_text(raw, what)
    if not isinstance(value, dict):
        raise UnparseableEvent(f"the record's {what} is JSON but not an object")
    return value


def _json_text(raw: bytes, what: str) -> Any:
    """Python's JSON reader: lenient where Debezium's writer may be (lone surrogates, NaN), and its
    errors say where the text is wrong."""
    try:
        if raw[:1] == b"{":  # UTF-8 as json.loads reads it (no BOM, not UTF-16/32), lone surrogates kept
            return _DECODE(raw.decode("utf-8", "surrogatepass"))
        return json.loads(raw, parse_constant=str)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnparseableEvent(f"the record's {what} is not JSON: {exc}") from None
    except RecursionError:
        raise UnparseableEvent(f"the record's {what} is JSON nested too deeply to read") from None


def _lsn(value: object) -> int | None:
    if value is None:
        return None
    if type(value) is int:
        return value
    try:
        return int(str(value))
    except ValueError:
        raise UnparseableEvent(f"source position {value!r} is not an LSN number") from None


def _position(op: Op, snapshot: str, raw: object, lsn: int | None) -> StreamPosition:
    if op is Op.READ or snapshot not in ("false", "incremental"):
        return SNAPSHOT_POSITION
    if isinstance(raw, str) and raw[:2] == '["' and raw[-2:] == '"]':  # '["<commit LSN>","<LSN>"]', mostly
        first_text, comma, second_text = raw[2:-2].partition('","')
        if comma:
            try:
                return StreamPosition(int(first_text), int(second_text))
            except ValueError:
                pass  # read as JSON below, which names what is wrong
    first = second = None
    if raw:
        try:
            seq = _split_sequence(raw) if isinstance(raw, str) else raw
        except json.JSONDecodeError:
            raise UnparseableEvent(f"source.sequence {raw!r} is not JSON") from None
        if not isinstance(seq, list) or len(seq) != 2:
            raise UnparseableEvent(f"source.sequence {raw!r} is not [last commit LSN, LSN]")
        first, second = _lsn(seq[0]), _lsn(seq[1])
    second = second if second is not None else lsn
    if second is None:
        raise UnparseableEvent("the event carries no source LSN (source.lsn / source.sequence)")
    return StreamPosition(first if first is not None else second, second)


def _split_sequence(raw: str) -> list[object]:
    """'["123","456"]' or '[null,"456"]' without a JSON parse (once per event); anything else via JSON."""
    if raw.startswith("[") and raw.endswith("]") and raw.count(",") == 1 and "\\" not in raw:
        return [None if p == "null" else p.strip('"') for p in (part.strip() for part in raw[1:-1].split(","))]
    parsed: list[object] = json.loads(raw)
    return parsed


def parse_record(record: StreamRecord) -> ChangeEvent | None:
    """The change a record carries; None for a tombstone (a delete's compaction marker)."""
    if record.value is None:
        return None
    try:
        envelope = _DECODE_ENVELOPE(record.value)
    except msgspec.DecodeError:
        return _parse_any(record)
    op = _OPS.get(envelope.op)
    source = envelope.source
    after = envelope.after
    if op is None:
        return _parse_any(record)
    if op is Op.DELETE:
        key = _json_object(record.key, "key") if record.key is not None else envelope.before
        if key is None:
            return _parse_any(record)
    elif after is None and op in _ROW_OPS:
        return _parse_any(record)
    else:
        key = None
    snapshot = source.snapshot or "false"
    lsn = source.lsn
    return ChangeEvent(
        op,
        source.schema,
        source.table,
        key,
        after,
        _position(op, snapshot, source.sequence, lsn),
        lsn,
        source.ts_ms,
        None if snapshot == "false" else snapshot,
    )


_ROW_OPS = frozenset({Op.CREATE, Op.READ, Op.UPDATE})


def _parse_any(record: StreamRecord) -> ChangeEvent | None:
    """Any JSON envelope (also a converter's with schemas enabled), each field checked and named."""
    assert record.value is not None
    envelope = _json_text(record.value, "value")
    if not isinstance(envelope, dict):
        raise UnparseableEvent("the record's value is JSON but not an object")
    if "payload" in envelope and "op" not in envelope:  # a converter with schemas enabled
        payload = envelope["payload"]
        if payload is None:
            return None
        if not isinstance(payload, dict):
            raise UnparseableEvent("the record's payload is not an object")
        envelope = payload
    raw_op = envelope.get("op")
    op = _OPS.get(raw_op) if isinstance(raw_op, str) else None
    if op is None:
        raise UnparseableEvent(f"unknown operation {raw_op!r} (expected c, r, u, d, t or m)")
    source = envelope.get("source")
    if not isinstance(source, dict):
        raise UnparseableEvent("the event has no source block")
    lsn = _lsn(source.get("lsn"))
    # Creates, reads and updates carry the key in `after`: only a delete needs the record's key parsed.
    key = _json_object(record.key, "key") if record.key is not None and op is Op.DELETE else None
    after = envelope.get("after")
    if op in _ROW_OPS and not isinstance(after, dict):
        raise UnparseableEvent(f"a '{op.value}' event without an 'after' row")
    if op is Op.DELETE and key is None:
        before = envelope.get("before")
        if not isinstance(before, dict):
            raise UnparseableEvent("a delete without a key or a 'before' row")
        key = before
    ts = source.get("ts_ms")
    snapshot = source.get("snapshot")
    return ChangeEvent(
        op=op,
        schema=str(source.get("schema") or ""),
        table=str(source.get("table") or ""),
        key=key,
        after=after if isinstance(after, dict) else None,
        position=_position(op, str(snapshot or "false"), source.get("sequence"), lsn),
        lsn=lsn,
        ts_ms=ts if type(ts) is int else None,
        snapshot_marker=None if snapshot in (None, "false") else str(snapshot),
    )
