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
which names a refused value by its column's type. Dates and timestamps are computed in integers
over PostgreSQL's whole range (BC and years past 9999 included, which Python's datetime lacks).

PostgreSQL's special values arrive in Debezium's own encodings (`SPECIAL_VALUES`), each turned
back into the value itself: infinite timestamps and dates, numeric NaN and infinities.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from lambdas.core.changestream.connector import UNAVAILABLE_PLACEHOLDER

_PLACEHOLDER_HEX = UNAVAILABLE_PLACEHOLDER.encode().hex()
# How Debezium 3.x writes the placeholder for other column types (UnchangedToastedPlaceholder):
# integer[]/date[]/bigint[] as the placeholder's bytes, uuid[] as [UUID.nameUUIDFromBytes(placeholder)],
# hstore as {placeholder: placeholder}; text-like and bytea arrays as [placeholder].
_PLACEHOLDER_BYTES = list(UNAVAILABLE_PLACEHOLDER.encode())
_PLACEHOLDER_UUID = str(uuid.UUID(bytes=hashlib.md5(UNAVAILABLE_PLACEHOLDER.encode()).digest(), version=3))  # noqa: S324
_PLACEHOLDER_MAP = {UNAVAILABLE_PLACEHOLDER: UNAVAILABLE_PLACEHOLDER}
_TIMESTAMP_PRECISION = re.compile(r"^timestamp\((\d)\) without time zone$")

# PostgreSQL's date and timestamp range: 4714-11-24 BC to 5874897-12-31, and to 294276-12-31 23:59:59.999999.
_FIRST_DAY, _LAST_DAY, _LAST_TIMESTAMP_DAY = -2440588, 2145042905, 106762939
_MICROS_PER_DAY = 86_400_000_000

# Debezium 3.6.3's encodings of PostgreSQL's special values, read from the real connector (pinned by
# tests/integration/test_debezium_stream.py), by the kind of column they arrive for:
# - timestamp +-infinity: the PostgreSQL JDBC driver's DATE_POSITIVE/NEGATIVE_INFINITY, in micro- or
#   milliseconds. The negative one lies outside PostgreSQL's range; the positive one is also a real
#   instant (294247-01-10 04:00:25.2), read as infinity: only that exact microsecond is ambiguous,
#   and validation names such a row.
# - date +-infinity: days outside PostgreSQL's range.
# - numeric NaN and +-Infinity (decimal.handling.mode=string): SpecialValueDecimal's names.
# - a timestamptz[] element -infinity: an instant outside PostgreSQL's range (a scalar arrives as text).
# Array elements of dates and timestamps go through java.sql types: one before 1582-10-15 arrives
# shifted by the Julian calendar and without its era (0044-03-15 BC as 0044-03-15), so such elements
# are refused (`JULIAN_ELEMENT`); a BC element of a later year arrives as AD, unnoticed (preflight
# warns, validation finds it).
_GREGORIAN_START = (1582, 10, 15)
_GREGORIAN_START_DAY = -141427
JULIAN_ELEMENT = (
    "an array element before 1582-10-15: Debezium sends it shifted by the Julian calendar and without "
    "its era, so its value is not known; use engine 'logical' for this table"
)
_ISO_DATE = re.compile(r"^(\d{4,})-(\d\d)-(\d\d)")
SPECIAL_VALUES: dict[str, dict[Any, str]] = {
    "timestamp": {9223372036825200000: "infinity", -9223372036832400000: "-infinity"},
    "timestamp_ms": {9223372036825200: "infinity", -9223372036832400: "-infinity"},
    # A date's infinities arrive as one pair of day numbers from the snapshot (and in arrays) and another from
    # the stream; all four lie outside PostgreSQL's date range, so none can be a real date
    "date": {-622191234: "infinity", -625821272: "-infinity", -2147472692: "infinity", -2147472691: "-infinity"},
    "numeric": {"NAN": "NaN", "POSITIVE_INFINITY": "Infinity", "NEGATIVE_INFINITY": "-Infinity"},
    "timestamptz": {"+292269055-12-02T23:00:00.000000Z": "-infinity"},
}

# Values Debezium sends for more than one source value, so that the value is not known: refused (a dead letter).
# A timestamp past 294247-01-10 04:00:54.775807 (PostgreSQL's last is 294276-12-31) overflows Java's 64-bit
# microseconds since 1970: Debezium sends the largest number for all of them.
_LONG_MAX = 2**63 - 1
REFUSED_VALUES: dict[str, dict[int, str]] = {
    "timestamp": {
        _LONG_MAX: "a timestamp after 294247-01-10 04:00:54.775807: Debezium sends every such value as the largest "
        "64-bit number, so its value is not known; use engine 'logical' for this table"
    },
}


class Kind(StrEnum):
    TEXT = "text"  # numbers, strings, uuid, interval, ...: the value's own text
    BOOL = "bool"
    BYTEA = "bytea"
    JSON = "json"
    TIMESTAMP = "timestamp"  # without time zone: microseconds since the epoch
    TIMESTAMP_MS = "timestamp_ms"  # timestamp(0) .. timestamp(3) without time zone: milliseconds since the epoch
    DATE = "date"  # days since the epoch
    NUMERIC = "numeric"  # its decimal text, or the name of a special value
    TIMESTAMPTZ = "timestamptz"  # ISO-8601 text with offset (in an array, -infinity is an instant)
    TIME = "time"  # without time zone: microseconds since midnight
    HSTORE = "hstore"  # a JSON object (hstore.handling.mode=json)
    BITS = "bits"  # bit(1) as a boolean; bit(n) as base64 bytes, the bit string's value little-endian
    POINT = "point"  # {"x": .., "y": .., "wkb": .., "srid": ..}


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
    if base.startswith("timestamp") and "with time zone" in base:
        return Kind.TIMESTAMPTZ
    if base == "numeric" or base.startswith("numeric("):
        return Kind.NUMERIC
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
    if base.startswith("bit(") or base == "bit" or base.startswith("bit varying"):
        return Kind.BITS
    if base == "point":
        return Kind.POINT
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
# Java writes years past 9999 with a sign and years BC as ISO-8601's astronomical years (year 0 is 1 BC,
# -1 is 2 BC): PostgreSQL reads '+10000-...' without the sign and '-4712-...' as '4713-... BC'. Cheap
# tests first: only these start with '+', or with '-' or '0' and match the pattern.
_ZONED_ISO_YEAR = (
    "(CASE WHEN left({0}, 1) = '+' THEN substr({0}, 2)"
    " WHEN left({0}, 1) IN ('-', '0') AND {0} ~ '^(-[0-9]+|0000)-'"
    " THEN lpad((1 - substring({0} from '^(-?[0-9]+)-')::int)::text, 4, '0') || substring({0} from '^-?[0-9]+(-.*)$')"
    " || ' BC' ELSE {0} END)"
)
_ZONED_ISO_YEAR_PATTERN = re.compile(r"^(-\d+|0000)(-.*)$")
# make_time, unlike time + interval, keeps 24:00:00 and refuses what is not a time of day
_TIME_FROM_MICROS = "make_time(({0} / 3600000000)::int, ({0} / 60000000 % 60)::int, ({0} % 60000000)::float8 / 1000000)"


def _with_specials(kind: Kind, type_name: str, otherwise: str) -> str:
    """`otherwise`, but PostgreSQL's own value for each of Debezium's encodings of a special value.
    (The encodings are this module's constants, never data: safe as SQL literals.)"""
    cases = " ".join(
        f"WHEN {k if isinstance(k, int) else _quote(k)} THEN {_quote(v)}::{type_name}"
        for k, v in SPECIAL_VALUES[kind.value].items()
    )
    # A refused value fails the statement (the batch is then applied change by change, and `to_text` names why):
    # by a cast of text made of the value, never a constant, which the planner would fold and fail every time
    refused = " ".join(f"WHEN {k} THEN ('refused: ' || {{0}})::{type_name}" for k in REFUSED_VALUES.get(kind.value, {}))
    return f"(CASE {{0}} {cases} {refused} ELSE {otherwise} END)"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def sql_conversion(column: ColumnType, *, python: bool = False) -> SqlConversion:
    """The conversion of `column`'s values in SQL; `python`: every value through `to_text` first."""
    cast = "{0}::" + column.sql_type
    if python:
        return SqlConversion("text", cast, python=True)
    kind = column.kind
    if column.array:
        if kind in (Kind.TEXT, Kind.BOOL, Kind.NUMERIC):  # a JSON array of the elements' text, numbers or booleans
            return SqlConversion(column.sql_type, "{0}")
        if kind is Kind.JSON:  # each element is a JSON text
            return SqlConversion("text[]", cast)
        return SqlConversion("text", cast, python=True)
    if kind in (Kind.TEXT, Kind.BOOL, Kind.JSON):
        return SqlConversion("text", cast)
    if kind is Kind.TIMESTAMPTZ:
        return SqlConversion("text", _with_specials(kind, "text", _ZONED_ISO_YEAR) + f"::{column.sql_type}")
    if kind is Kind.NUMERIC:
        return SqlConversion("text", _with_specials(kind, "text", "{0}") + f"::{column.sql_type}")
    if kind is Kind.TIMESTAMP:
        return SqlConversion("bigint", _with_specials(kind, "timestamp", _FROM_MICROS) + f"::{column.sql_type}")
    if kind is Kind.TIMESTAMP_MS:
        return SqlConversion("bigint", _with_specials(kind, "timestamp", _FROM_MILLIS) + f"::{column.sql_type}")
    if kind is Kind.DATE:
        return SqlConversion("integer", _with_specials(kind, "date", "('epoch'::date + {0})"))
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
    refused = REFUSED_VALUES.get(kind.value, {})
    if isinstance(value, int) and value in refused:
        raise ConversionError(refused[value])
    special = SPECIAL_VALUES.get(kind.value)
    if special is not None and isinstance(value, (int, str)) and not isinstance(value, bool) and value in special:
        return special[value]
    if kind is Kind.TIMESTAMP and isinstance(value, int):
        return _timestamp_text(value, "us")
    if kind is Kind.TIMESTAMP_MS and isinstance(value, int):
        return _timestamp_text(value * 1000, "ms")
    if kind is Kind.TIMESTAMPTZ and isinstance(value, str):
        return _zoned_iso_year(value)
    if kind is Kind.DATE and isinstance(value, int):
        if not _FIRST_DAY <= value <= _LAST_DAY:
            raise ConversionError(f"date {value} days from the epoch is outside PostgreSQL's range")
        day, era = _civil_date(value)
        return day + era
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
    if kind is Kind.BITS:
        return _bit_string(value, sql_type)
    if kind is Kind.POINT and isinstance(value, dict) and {"x", "y"} <= value.keys():
        return f"({float(value['x'])!r},{float(value['y'])!r})"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, str)):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # shortest text that reads back to the same double
    raise ConversionError(f"cannot convert a JSON {type(value).__name__} to {sql_type}")


_BIT_WIDTH = re.compile(r"^bit\((\d+)\)$")


def _bit_string(value: Any, sql_type: str) -> str:
    """A bit string from Debezium's Bits: bit(1) arrives as a boolean, bit(n) as base64 bytes holding
    the string's value little-endian, so the width comes from the column's type. bit varying has no
    fixed width: its leading zeros are lost (B'0011' and B'11' arrive alike), so it is refused."""
    if isinstance(value, bool):
        return "1" if value else "0"
    width = _BIT_WIDTH.match(sql_type)
    if not isinstance(value, str) or width is None:
        raise ConversionError(
            f"{sql_type}: Debezium sends a bit string's value without its leading zeros or length, so it is "
            "not known; use engine 'logical' for this table"
        )
    number = int.from_bytes(base64.b64decode(value), "little")
    return format(number, f"0{width.group(1)}b")


def _civil_date(days: int) -> tuple[str, str]:
    """The proleptic Gregorian date `days` after 1970-01-01 as PostgreSQL writes it, and its era
    suffix (' BC' or ''): astronomical year 0 is 1 BC. (Howard Hinnant's civil_from_days.)"""
    z = days + 719468
    era, day_of_era = divmod(z, 146097)
    year_of_era = (day_of_era - day_of_era // 1460 + day_of_era // 36524 - day_of_era // 146096) // 365
    day_of_year = day_of_era - (365 * year_of_era + year_of_era // 4 - year_of_era // 100)
    shifted_month = (5 * day_of_year + 2) // 153
    day = day_of_year - (153 * shifted_month + 2) // 5 + 1
    month = shifted_month + 3 if shifted_month < 10 else shifted_month - 9
    year = year_of_era + era * 400 + (1 if month <= 2 else 0)
    if year > 0:
        return f"{year:04d}-{month:02d}-{day:02d}", ""
    return f"{1 - year:04d}-{month:02d}-{day:02d}", " BC"


def _zoned_iso_year(text: str) -> str:
    """`_ZONED_ISO_YEAR` in Python: a ZonedTimestamp's text as PostgreSQL reads it."""
    if text.startswith("+"):
        return text[1:]
    match = _ZONED_ISO_YEAR_PATTERN.match(text)
    if match is None:
        return text
    return f"{1 - int(match.group(1)):04d}{match.group(2)} BC"


def _timestamp_text(micros: int, unit: str) -> str:
    days, of_day = divmod(micros, _MICROS_PER_DAY)
    if not _FIRST_DAY <= days <= _LAST_TIMESTAMP_DAY:
        raise ConversionError(f"timestamp {micros} us from the epoch (sent in {unit}) is outside PostgreSQL's range")
    day, era = _civil_date(days)
    seconds, fraction = divmod(of_day, 1_000_000)
    clock = f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    return f"{day} {clock}" + (f".{fraction:06d}" if fraction else "") + era


def _before_gregorian(value: Any, text: str, kind: Kind) -> bool:
    """Whether an array element (as sent, and as converted) is a day before 1582-10-15, or BC."""
    if isinstance(value, bool) or text.endswith("infinity"):
        return False
    if kind is Kind.DATE and isinstance(value, int):
        return value < _GREGORIAN_START_DAY
    if kind is Kind.TIMESTAMP and isinstance(value, int):
        return value < _GREGORIAN_START_DAY * _MICROS_PER_DAY
    if kind is Kind.TIMESTAMP_MS and isinstance(value, int):
        return value * 1000 < _GREGORIAN_START_DAY * _MICROS_PER_DAY
    if kind is Kind.TIMESTAMPTZ:
        match = _ISO_DATE.match(text)
        return text.endswith(" BC") or (match is not None and tuple(map(int, match.groups())) < _GREGORIAN_START)
    return False


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
            if _before_gregorian(item, text, kind):
                raise ConversionError(JULIAN_ELEMENT)
            parts.append('"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"')
    return "{" + ",".join(parts) + "}"
