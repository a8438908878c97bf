"""Debezium JSON values to their target columns' values, by target column type.

The applier sends a batch's rows to the target as the JSON values Debezium sent and lets PostgreSQL
convert them (`sql_conversion`): `json_to_recordset` reads each value as text (or as an array of
the column's element type) and the value goes through the type's own input function, as if it had
been typed in: exact for numeric (sent as its decimal string), jsonb (sent as its JSON text),
timestamptz (ISO-8601 with offset), interval, uuid, numbers and booleans (their JSON text), arrays
of those. What Debezium encodes differently gets an exact SQL expression in integer arithmetic:
timestamp as micro/milliseconds since the epoch (timestamp(0..3) in milliseconds), date as days,
time as microseconds since midnight, bytea as hex. The rest (hstore as a JSON object, arrays of
timestamps, dates, times or bytea) is converted here, in Python, to the text the input function
takes (`to_text`); so is every value when a change is retried on its own after its batch failed,
which names a refused value by its column's type.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from lambdas.core.changestream.connector import UNAVAILABLE_PLACEHOLDER

_EPOCH = dt.datetime(1970, 1, 1)
_EPOCH_DATE = dt.date(1970, 1, 1)
_PLACEHOLDER_HEX = UNAVAILABLE_PLACEHOLDER.encode().hex()
# How Debezium 3.x writes the placeholder for other column types (UnchangedToastedPlaceholder):
# integer[]/date[]/bigint[] as the placeholder's bytes, uuid[] as [UUID.nameUUIDFromBytes(placeholder)],
# hstore as {placeholder: placeholder}; text-like and bytea arrays as [placeholder].
_PLACEHOLDER_BYTES = list(UNAVAILABLE_PLACEHOLDER.encode())
_PLACEHOLDER_UUID = str(uuid.UUID(bytes=hashlib.md5(UNAVAILABLE_PLACEHOLDER.encode()).digest(), version=3))  # noqa: S324
_PLACEHOLDER_MAP = {UNAVAILABLE_PLACEHOLDER: UNAVAILABLE_PLACEHOLDER}
_TIMESTAMP_PRECISION = re.compile(r"^timestamp\((\d)\) without time zone$")


class Kind(StrEnum):
    TEXT = "text"  # numbers, strings, uuid, numeric, timestamptz, interval, ...: the value's own text
    BOOL = "bool"
    BYTEA = "bytea"
    JSON = "json"
    TIMESTAMP = "timestamp"  # without time zone: microseconds since the epoch
    TIMESTAMP_MS = "timestamp_ms"  # timestamp(0) .. timestamp(3) without time zone: milliseconds since the epoch
    DATE = "date"  # days since the epoch
    TIME = "time"  # without time zone: microseconds since midnight
    HSTORE = "hstore"  # a JSON object (hstore.handling.mode=json)


class ConversionError(ValueError):
    pass


@dataclass(frozen=True)
class ColumnType:
    """How one target column's values are converted: its kind, and its array depth (0: scalar)."""

    sql_type: str  # format_type(), e.g. 'timestamp(3) without time zone[]'
    kind: Kind
    array: bool

    @classmethod
    def of(cls, sql_type: str) -> ColumnType:
        base = sql_type
        array = base.endswith("[]")
        while base.endswith("[]"):
            base = base[:-2]
        return cls(sql_type, _kind(base), array)


def _kind(base: str) -> Kind:
    if base.startswith("timestamp") and "without time zone" in base:
        # time.precision.mode=adaptive_time_microseconds: precision 0-3 arrives in milliseconds
        precision = _TIMESTAMP_PRECISION.match(base)
        return Kind.TIMESTAMP_MS if precision and int(precision.group(1)) <= 3 else Kind.TIMESTAMP
    if base.startswith("time") and "without time zone" in base:
        return Kind.TIME
    if base == "date":
        return Kind.DATE
    if base == "bytea":
        return Kind.BYTEA
    if base in ("json", "jsonb"):
        return Kind.JSON
    if base == "boolean":
        return Kind.BOOL
    if base == "hstore" or base.endswith(".hstore"):
        return Kind.HSTORE
    return Kind.TEXT


@dataclass(frozen=True)
class SqlConversion:
    """How one column's JSON value becomes the column's value in the target's SQL.

    `field_type` is the type `json_to_recordset` reads the JSON value as (its column definition),
    `expression` the SQL that makes the column's value of it (`{0}` stands for the recordset's
    column), and `python` says the value is first converted by `to_text` (what SQL cannot do simply).
    """

    field_type: str
    expression: str
    python: bool = False


# Integer arithmetic only (exact over the whole range): whole days, then the rest of the day.
_FROM_MICROS = (
    "('epoch'::timestamp + ({0} / 86400000000) * interval '1 day' + ({0} % 86400000000) * interval '1 microsecond')"
)
_FROM_MILLIS = (
    "('epoch'::timestamp + ({0} / 86400000) * interval '1 day' + ({0} % 86400000) * interval '1 millisecond')"
)
# make_time, unlike time + interval, keeps 24:00:00 and refuses what is not a time of day
_TIME_FROM_MICROS = "make_time(({0} / 3600000000)::int, ({0} / 60000000 % 60)::int, ({0} % 60000000)::float8 / 1000000)"


def sql_conversion(column: ColumnType, *, python: bool = False) -> SqlConversion:
    """The conversion of `column`'s values in SQL; `python`: every value through `to_text` first."""
    cast = "{0}::" + column.sql_type
    if python:
        return SqlConversion("text", cast, python=True)
    kind = column.kind
    if column.array:
        if kind in (Kind.TEXT, Kind.BOOL):  # a JSON array of the elements' text, numbers or booleans
            return SqlConversion(column.sql_type, "{0}")
        if kind is Kind.JSON:  # each element is a JSON text
            return SqlConversion("text[]", cast)
        return SqlConversion("text", cast, python=True)
    if kind in (Kind.TEXT, Kind.BOOL, Kind.JSON):
        return SqlConversion("text", cast)
    if kind is Kind.TIMESTAMP:
        return SqlConversion("bigint", f"{_FROM_MICROS}::{column.sql_type}")
    if kind is Kind.TIMESTAMP_MS:
        return SqlConversion("bigint", f"{_FROM_MILLIS}::{column.sql_type}")
    if kind is Kind.DATE:
        return SqlConversion("integer", "('epoch'::date + {0})")
    if kind is Kind.TIME:
        return SqlConversion("bigint", f"{_TIME_FROM_MICROS}::{column.sql_type}")
    if kind is Kind.BYTEA:
        return SqlConversion("text", "decode({0}, 'hex')")
    return SqlConversion("text", cast, python=True)


def placeholder_markers(columns: Iterable[ColumnType]) -> tuple[bytes, ...]:
    """Byte strings one of which is in a raw Debezium record whenever a value of these columns is the
    placeholder (`is_unavailable`), in any of its forms: a record without any needs no value checked.

    JSON encoders escape quotes, backslashes and control characters only (and non-ASCII, some), none
    of which is in the placeholder's forms; a byte list is written compact (Jackson) or spaced.
    """
    markers = [UNAVAILABLE_PLACEHOLDER.encode()]  # itself, in a list, as hstore's map, as its JSON text
    columns = list(columns)
    if any(c.kind is Kind.BYTEA for c in columns):
        markers.append(_PLACEHOLDER_HEX.encode())
    if any(c.array for c in columns):
        markers.append(_PLACEHOLDER_UUID.encode())
        markers += [sep.join(str(b).encode() for b in _PLACEHOLDER_BYTES[:8]) for sep in (b",", b", ")]
    return tuple(markers)


def is_unavailable(value: Any) -> bool:
    """Debezium's marker for an unchanged TOASTed value it did not receive (never to be written)."""
    if isinstance(value, str):
        if value in (UNAVAILABLE_PLACEHOLDER, _PLACEHOLDER_HEX):
            return True
        return value.startswith("{") and UNAVAILABLE_PLACEHOLDER in value and _json_or_none(value) == _PLACEHOLDER_MAP
    if isinstance(value, list):
        if len(value) == 1:
            return is_unavailable(value[0]) or value[0] == _PLACEHOLDER_UUID
        return value == _PLACEHOLDER_BYTES
    if isinstance(value, dict):
        return value == _PLACEHOLDER_MAP
    return False


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def to_text(value: Any, column: ColumnType) -> str | None:
    """The text form of `value` for the column's type; None for SQL NULL."""
    if value is None:
        return None
    if column.array:
        if not isinstance(value, list):
            raise ConversionError(f"expected an array for {column.sql_type}, got {type(value).__name__}")
        return _array_literal(value, column.kind)
    return _scalar(value, column.kind, column.sql_type)


def _scalar(value: Any, kind: Kind, sql_type: str) -> str:
    if kind is Kind.TIMESTAMP and isinstance(value, int):
        try:
            return (_EPOCH + dt.timedelta(microseconds=value)).isoformat(sep=" ")
        except OverflowError:
            raise ConversionError(f"timestamp {value} us from the epoch is outside Python's range") from None
    if kind is Kind.TIMESTAMP_MS and isinstance(value, int):
        try:
            return (_EPOCH + dt.timedelta(milliseconds=value)).isoformat(sep=" ")
        except OverflowError:
            raise ConversionError(f"timestamp {value} ms from the epoch is outside Python's range") from None
    if kind is Kind.DATE and isinstance(value, int):
        try:
            return (_EPOCH_DATE + dt.timedelta(days=value)).isoformat()
        except OverflowError:
            raise ConversionError(f"date {value} days from the epoch is outside Python's range") from None
    if kind is Kind.TIME and isinstance(value, int):
        seconds, micros = divmod(value, 1_000_000)
        hours, rest = divmod(seconds, 3600)
        return f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}.{micros:06d}"
    if kind is Kind.BYTEA and isinstance(value, str):
        return "\\x" + value
    if kind is Kind.JSON:
        return value if isinstance(value, str) else json.dumps(value)
    if kind is Kind.HSTORE:
        return _hstore_literal(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, str)):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # shortest text that reads back to the same double
    raise ConversionError(f"cannot convert a JSON {type(value).__name__} to {sql_type}")


def _hstore_literal(value: Any) -> str:
    pairs = _json_or_none(value) if isinstance(value, str) else value
    if not isinstance(pairs, dict):
        raise ConversionError(f"expected a JSON object for hstore, got {str(value)[:80]!r}")

    def quoted(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    return ", ".join(
        f"{quoted(str(k))}=>{'NULL' if v is None else quoted(v if isinstance(v, str) else json.dumps(v))}"
        for k, v in pairs.items()
    )


def _array_literal(items: list[Any], kind: Kind) -> str:
    parts = []
    for item in items:
        if item is None:
            parts.append("NULL")
        elif isinstance(item, list):
            parts.append(_array_literal(item, kind))
        else:
            text = _scalar(item, kind, kind.value)
            parts.append('"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"')
    return "{" + ",".join(parts) + "}"
