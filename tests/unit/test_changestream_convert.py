"""Debezium JSON values back to PostgreSQL input text, per target column type (values as Debezium 3.6.3
sends them with the connector settings of lambdas/core/changestream/connector.py)."""

from __future__ import annotations

import hashlib
import uuid

import pytest

from lambdas.core.changestream.connector import UNAVAILABLE_PLACEHOLDER
from lambdas.core.changestream.convert import ColumnType, ConversionError, Kind, is_unavailable, sql_conversion, to_text


def text(value: object, sql_type: str) -> str | None:
    return to_text(value, ColumnType.of(sql_type))


@pytest.mark.parametrize(
    ("sql_type", "kind", "array"),
    [
        ("timestamp without time zone", Kind.TIMESTAMP, False),
        ("timestamp(6) without time zone", Kind.TIMESTAMP, False),
        ("timestamp(4) without time zone", Kind.TIMESTAMP, False),
        ("timestamp(3) without time zone", Kind.TIMESTAMP_MS, False),
        ("timestamp(0) without time zone", Kind.TIMESTAMP_MS, False),
        ("timestamp(3) without time zone[]", Kind.TIMESTAMP_MS, True),
        ("timestamp with time zone", Kind.TIMESTAMPTZ, False),
        ("timestamp(3) with time zone[]", Kind.TIMESTAMPTZ, True),
        ("time without time zone", Kind.TIME, False),
        ("time(3) without time zone", Kind.TIME, False),
        ("time with time zone", Kind.TEXT, False),
        ("date", Kind.DATE, False),
        ("date[]", Kind.DATE, True),
        ("bytea", Kind.BYTEA, False),
        ("json", Kind.JSON, False),
        ("jsonb[]", Kind.JSON, True),
        ("boolean", Kind.BOOL, False),
        ("hstore", Kind.HSTORE, False),
        ("numeric(12,2)", Kind.NUMERIC, False),
        ("numeric", Kind.NUMERIC, False),
        ("numeric[]", Kind.NUMERIC, True),
        ("text[][]", Kind.TEXT, True),
        ("uuid", Kind.TEXT, False),
        ("bit(1)", Kind.BITS, False),
        ("bit(16)", Kind.BITS, False),
        ("bit varying(20)", Kind.BITS, False),
        ("point", Kind.POINT, False),
    ],
)
def test_column_kind_follows_the_target_type(sql_type: str, kind: Kind, array: bool) -> None:
    column = ColumnType.of(sql_type)
    assert (column.kind, column.array, column.sql_type) == (kind, array, sql_type)


def test_null_is_none_for_every_kind() -> None:
    for sql_type in ("text", "timestamp without time zone", "date", "bytea", "jsonb", "integer[]", "hstore"):
        assert text(None, sql_type) is None


def test_timestamp_micros_since_the_epoch_including_negative() -> None:
    # Given timestamp / timestamp(6) values in microseconds (MicroTimestamp)
    assert text(1709210096123456, "timestamp without time zone") == "2024-02-29 12:34:56.123456"
    assert text(1704067200000001, "timestamp(6) without time zone") == "2024-01-01 00:00:00.000001"
    assert text(0, "timestamp without time zone") == "1970-01-01 00:00:00"
    # And before the epoch
    assert text(-1, "timestamp without time zone") == "1969-12-31 23:59:59.999999"
    assert text(-2208988800000000, "timestamp without time zone") == "1900-01-01 00:00:00"


def test_timestamp_up_to_millisecond_precision_arrives_in_millis() -> None:
    # Given timestamp(0) '1969-12-31 23:59:59' and timestamp(3) '1900-01-01 00:00:00.123' as Debezium sent them
    assert text(-1000, "timestamp(0) without time zone") == "1969-12-31 23:59:59"
    assert text(-2208988799877, "timestamp(3) without time zone") == "1900-01-01 00:00:00.123000"
    assert text([1577836800123, None], "timestamp(3) without time zone[]") == '{"2020-01-01 00:00:00.123000",NULL}'


def test_timestamp_outside_postgresqls_range_is_a_conversion_error() -> None:
    with pytest.raises(ConversionError, match="outside PostgreSQL's range"):
        text(-(10**18), "timestamp without time zone")
    with pytest.raises(ConversionError, match="outside PostgreSQL's range"):
        text(10**17, "timestamp(3) without time zone")


def test_timestamps_and_dates_cover_postgresqls_whole_range_bc_and_past_year_9999() -> None:
    # Given the first and last instants and days PostgreSQL holds (numbers from PostgreSQL 15: x - 'epoch')
    assert text(-210866803200000000, "timestamp without time zone") == "4714-11-24 00:00:00 BC"
    assert text(9224318015999999, "timestamp(3) without time zone") == "294276-12-31 23:59:59.999000"
    assert text(-62135596800000001, "timestamp without time zone") == "0001-12-31 23:59:59.999999 BC"
    assert text(-2440588, "date") == "4714-11-24 BC"
    assert text(-719528, "date") == "0001-01-01 BC"  # year 0 is 1 BC
    assert text(2145042905, "date") == "5874897-12-31"
    assert text([2932897, -141427], "date[]") == '{"10000-01-01","1582-10-15"}'
    # And one step past either end is refused, naming the range
    with pytest.raises(ConversionError, match="outside PostgreSQL's range"):
        text(-2440589, "date")
    with pytest.raises(ConversionError, match="outside PostgreSQL's range"):
        text(-210866803200000001, "timestamp without time zone")


@pytest.mark.parametrize(
    ("value", "sql_type", "expected"),
    [
        (9223372036825200000, "timestamp without time zone", "infinity"),
        (-9223372036832400000, "timestamp(6) without time zone", "-infinity"),
        (9223372036825200, "timestamp(3) without time zone", "infinity"),
        (-9223372036832400, "timestamp(0) without time zone", "-infinity"),
        (-622191234, "date", "infinity"),
        (-2147472691, "date", "-infinity"),
        (-2147472692, "date", "infinity"),  # the stream's; the snapshot sends -622191234
        (-625821272, "date", "-infinity"),  # the snapshot's; the stream sends -2147472691
        ("NAN", "numeric", "NaN"),
        ("POSITIVE_INFINITY", "numeric(12,2)", "Infinity"),
        ("NEGATIVE_INFINITY", "numeric", "-Infinity"),
        ("-infinity", "timestamp with time zone", "-infinity"),
        ([-622191234, None, -2147472691], "date[]", '{"infinity",NULL,"-infinity"}'),
        (["+292269055-12-02T23:00:00.000000Z", "infinity"], "timestamp with time zone[]", '{"-infinity","infinity"}'),
        ([9223372036825200], "timestamp(3) without time zone[]", '{"infinity"}'),
    ],
)
def test_debeziums_encodings_of_special_values_become_the_values(value: object, sql_type: str, expected: str) -> None:
    # Given a special value as Debezium 3.6.3 sends it (read from the real connector) -> PostgreSQL's own text
    assert text(value, sql_type) == expected


def test_special_value_encodings_only_apply_to_their_own_kind() -> None:
    # Given the same numbers and names in columns of other types: taken as they are
    assert text(-622191234, "bigint") == "-622191234"
    assert text("NAN", "text") == "NAN"
    assert text(9223372036825200000, "numeric") == "9223372036825200000"


def test_timestamptz_and_timetz_pass_through_as_iso_text() -> None:
    assert text("2024-05-01T08:00:00.500000Z", "timestamp with time zone") == "2024-05-01T08:00:00.500000Z"
    assert text("08:00:00Z", "time with time zone") == "08:00:00Z"


def test_date_days_since_the_epoch() -> None:
    assert text(-3594, "date") == "1960-02-29"
    assert text(0, "date") == "1970-01-01"
    assert text(19782, "date") == "2024-02-29"
    assert text([18262, None], "date[]") == '{"2020-01-01",NULL}'
    with pytest.raises(ConversionError, match="outside PostgreSQL's range"):
        text(3 * 10**9, "date")


def test_time_micros_since_midnight() -> None:
    assert text(86399999999, "time without time zone") == "23:59:59.999999"
    assert text(43200123000, "time(3) without time zone") == "12:00:00.123000"
    assert text(0, "time without time zone") == "00:00:00.000000"
    assert text(86400000000, "time without time zone") == "24:00:00.000000"  # PostgreSQL's own maximum


def test_bytea_hex() -> None:
    assert text("00ff10", "bytea") == "\\x00ff10"
    assert text("", "bytea") == "\\x"
    # And in an array each element is quoted with its backslash escaped
    assert text(["00ff", None], "bytea[]") == '{"\\\\x00ff",NULL}'


def test_json_text_is_kept_exactly() -> None:
    # Given json keeps its spacing and key order; jsonb arrives in its normal form
    assert text('{"b": 1,  "a": [1, 2.50]}', "json") == '{"b": 1,  "a": [1, 2.50]}'
    assert text('{"a": "ü", "b": 1}', "jsonb") == '{"a": "ü", "b": 1}'
    assert text("null", "jsonb") == "null"
    # And a decoded value (a converter that parsed it) is serialised back
    assert text({"a": [1, None]}, "jsonb") == '{"a": [1, null]}'
    assert text(['{"a":1}', None], "jsonb[]") == '{"{\\"a\\":1}",NULL}'


def test_bool() -> None:
    assert text(True, "boolean") == "true"
    assert text(False, "boolean") == "false"
    assert text([True, None, False], "boolean[]") == '{"true",NULL,"false"}'


def test_float_repr_reads_back_to_the_same_double() -> None:
    assert text(1.0000000000000002, "double precision") == "1.0000000000000002"
    assert text(0.1, "double precision") == "0.1"
    assert text(1e-320, "double precision") == "1e-320"
    assert text(3.0, "double precision") == "3.0"
    assert text(1.1, "real") == "1.1"
    assert text(float("nan"), "double precision") == "nan"
    assert text(float("-inf"), "double precision") == "-inf"
    for value in (0.1, 1 / 3, 2.5e300, -7.25e-5):
        assert float(text(value, "double precision") or "") == value


def test_numeric_strings_and_integers_keep_every_digit() -> None:
    assert (
        text("123456789012345678901234567890.000000000001", "numeric") == "123456789012345678901234567890.000000000001"
    )
    assert text("12.30", "numeric(12,2)") == "12.30"
    assert text("-0.00", "numeric(12,2)") == "-0.00"
    assert text("NaN", "numeric") == "NaN"
    assert text(9007199254740993, "bigint") == "9007199254740993"
    assert text(["1.5", None, "2"], "numeric[]") == '{"1.5",NULL,"2"}'


def test_text_uuid_interval_pass_through() -> None:
    assert text('héllo "q" \\ back', "text") == 'héllo "q" \\ back'
    assert text("054c3383-8fb9-474a-bc3b-54c2064c27bc", "uuid") == "054c3383-8fb9-474a-bc3b-54c2064c27bc"
    assert text("P0Y0M-1DT2H3M4.5S", "interval") == "P0Y0M-1DT2H3M4.5S"
    assert text("", "text") == ""


def test_array_literals_quote_nulls_quotes_backslashes_and_nest() -> None:
    # Given text[] with NULL, quotes, backslashes, an empty string and the string 'NULL'
    assert text(["a", None, 'x"y', "b\\c", "", "NULL"], "text[]") == '{"a",NULL,"x\\"y","b\\\\c","","NULL"}'
    # And an empty array, a nested one, non-ASCII, braces and commas
    assert text([], "text[]") == "{}"
    assert text([["a", "b"], ["c", None]], "text[][]") == '{{"a","b"},{"c",NULL}}'
    assert text(["Zoë, {x}", "李"], "text[]") == '{"Zoë, {x}","李"}'
    assert text([1, None, 3], "integer[]") == '{"1",NULL,"3"}'


def test_hstore_from_json_object() -> None:
    # Given hstore as Debezium sends it with hstore.handling.mode=json
    value = '{"a":"1","b c":null,"q\\"x":"v\\\\"}'
    assert text(value, "hstore") == '"a"=>"1", "b c"=>NULL, "q\\"x"=>"v\\\\"'
    assert text("{}", "hstore") == ""
    assert text({"k": "v"}, "hstore") == '"k"=>"v"'
    with pytest.raises(ConversionError, match="expected a JSON object for hstore"):
        text("a=>1", "hstore")


def test_wrong_json_shape_is_a_conversion_error() -> None:
    with pytest.raises(ConversionError, match="expected an array"):
        text("{1,2}", "integer[]")
    with pytest.raises(ConversionError, match="cannot convert a JSON dict"):
        text({"a": 1}, "text")


PLACEHOLDER_UUID = str(uuid.UUID(bytes=hashlib.md5(UNAVAILABLE_PLACEHOLDER.encode()).digest(), version=3))


@pytest.mark.parametrize(
    "value",
    [
        UNAVAILABLE_PLACEHOLDER,  # text, varchar, json, jsonb, numeric, ...
        UNAVAILABLE_PLACEHOLDER.encode().hex(),  # bytea with binary.handling.mode=hex
        [UNAVAILABLE_PLACEHOLDER],  # text[], varchar[], json[], jsonb[]
        [UNAVAILABLE_PLACEHOLDER.encode().hex()],  # bytea[]
        list(UNAVAILABLE_PLACEHOLDER.encode()),  # integer[], date[], bigint[]: the placeholder's bytes
        [PLACEHOLDER_UUID],  # uuid[]: UUID.nameUUIDFromBytes(placeholder)
        f'{{"{UNAVAILABLE_PLACEHOLDER}":"{UNAVAILABLE_PLACEHOLDER}"}}',  # hstore as JSON
        {UNAVAILABLE_PLACEHOLDER: UNAVAILABLE_PLACEHOLDER},
    ],
)
def test_every_form_of_the_unchanged_toast_placeholder_is_recognised(value: object) -> None:
    assert is_unavailable(value)


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "__zdm_unchanged",
        UNAVAILABLE_PLACEHOLDER + "x",
        [UNAVAILABLE_PLACEHOLDER, "a"],
        list(UNAVAILABLE_PLACEHOLDER.encode())[:-1],
        ["d9684f09-18a3-327a-b294-a9dd6b907dfe"],
        '{"a": "__zdm_unchanged_toast__"}',
        "{not json __zdm_unchanged_toast__",
        42,
        {"a": 1},
    ],
)
def test_real_values_are_not_mistaken_for_the_placeholder(value: object) -> None:
    assert not is_unavailable(value)


def test_placeholder_uuid_is_debeziums() -> None:
    # The value Debezium 3.6.3 sent for an unchanged TOASTed uuid[] with this placeholder
    assert PLACEHOLDER_UUID == "d9684f09-18a3-327a-b294-a9dd6b907dfd"


@pytest.mark.parametrize(
    ("value", "sql_type"),
    [
        ([18262, -141428], "date[]"),  # 1582-10-14
        ([-703383], "date[]"),  # 0044-03-15 BC as Debezium sends it: 0044-03-15
        ([-62135769600000001], "timestamp without time zone[]"),  # 0001-12-31 23:59:59.999999 BC, shifted
        ([-12219292800001], "timestamp(3) without time zone[]"),  # 1582-10-14 23:59:59.999
        (["0044-03-15T12:00:00.000000Z"], "timestamp with time zone[]"),  # 0044-03-15 12:00 BC, era dropped
        (["-4712-01-01T00:00:00Z"], "timestamp with time zone[]"),
    ],
)
def test_array_elements_before_the_gregorian_calendar_are_refused(value: object, sql_type: str) -> None:
    # Given an array element Debezium sent through java.sql types, before 1582-10-15 (Julian, era dropped)
    # Then it is refused, saying why and what to do: its value is not known
    with pytest.raises(ConversionError, match=r"before 1582-10-15.*engine 'logical'"):
        text(value, sql_type)


def test_array_elements_from_the_gregorian_start_and_scalars_of_any_day_are_taken() -> None:
    assert text([-12219292800000000], "timestamp without time zone[]") == '{"1582-10-15 00:00:00"}'
    assert text(["1582-10-15T00:00:00Z", "infinity"], "timestamp with time zone[]") == (
        '{"1582-10-15T00:00:00Z","infinity"}'
    )
    assert text(-703383, "date") == "0044-03-15"  # a scalar arrives exactly (LocalDate), era and all
    assert text("-0043-03-15T12:00:00Z", "timestamp with time zone") == "0044-03-15T12:00:00Z BC"


def test_bit_strings_from_debeziums_bits() -> None:
    # Given bit(1) as a boolean and bit(n) as base64 bytes of the string's value, little-endian (as sent)
    assert text(True, "bit(1)") == "1" and text(False, "bit(1)") == "0"
    assert text("A4A=", "bit(16)") == "1000000000000011"
    assert text("Aw==", "bit(3)") == "011"  # the width comes from the type: leading zeros kept
    assert text("", "bit(8)") == "00000000"
    # And bit varying, whose leading zeros Debezium drops (B'0011' arrives as B'11' does), is refused
    with pytest.raises(ConversionError, match="leading zeros"):
        text("Aw==", "bit varying(20)")


def test_point_from_debeziums_struct_keeps_every_double() -> None:
    value = {"x": 1e-300, "y": -0.0, "wkb": "AQEAAABZ8/jCH26lAQAAAAAAAACA", "srid": None}
    assert text(value, "point") == "(1e-300,-0.0)"
    assert text({"x": 1.5, "y": -2.25, "wkb": "", "srid": None}, "point") == "(1.5,-2.25)"
    with pytest.raises(ConversionError, match="cannot convert a JSON dict to point"):
        text({"wkb": "AQEAAAAAAAAAAAD4PwAAAAAAAALA"}, "point")


def test_a_timestamp_debezium_sends_as_the_largest_64_bit_number_is_refused_not_guessed() -> None:
    # Given the number Debezium sends for every timestamp after 294247-01-10 04:00:54.775807 (read from the
    # real connector: '294276-12-31 12:00:00' arrived so)
    saturated = 2**63 - 1
    # Then converting it fails, saying why, alone and in an array
    with pytest.raises(ConversionError, match=r"after 294247-01-10 04:00:54\.775807"):
        to_text(saturated, ColumnType.of("timestamp without time zone"))
    with pytest.raises(ConversionError, match=r"after 294247-01-10 04:00:54\.775807"):
        to_text([saturated], ColumnType.of("timestamp(6) without time zone[]"))
    # And the SQL conversion fails on it too (by a cast of text made of the value, not of a constant)
    expression = sql_conversion(ColumnType.of("timestamp without time zone")).expression
    assert f"WHEN {saturated} THEN ('refused: ' || {{0}})::timestamp" in expression
    # And the number one less is a timestamp like any other
    assert to_text(saturated - 1, ColumnType.of("timestamp without time zone")) == "294247-01-10 04:00:54.775806"
