"""The migration file: the shipped examples load, defaults apply, and every mistake gets one
exact message naming the field path and the fix. No servers needed."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from lambdas.core.config import (
    Endpoint,
    Migration,
    MigrationFileError,
    _submodel,
    load_migration,
    parse_bytes,
    parse_migration,
)

MIGRATIONS = Path(__file__).resolve().parents[2] / "migrations"
PASSWORD = "s3cr3t-Hunter2"  # a fake password the tests look for

MINIMAL: dict[str, Any] = {
    "name": "shop-orders",
    "source": {"dsn": f"host=127.0.0.1 port=5432 dbname=orders user=app password={PASSWORD}"},
    "target": {"dsn": "host=127.0.0.1 port=5433 dbname=orders user=app"},
}
ARN = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:shop/orders-AbCdEf"


def problems_for(data: Any) -> list[str]:
    """Parse `data`, expecting it to be rejected; return the problems."""
    with pytest.raises(MigrationFileError) as caught:
        parse_migration(data, "test.yaml")
    return caught.value.problems


def with_changes(**sections: Any) -> dict[str, Any]:
    """The minimal valid mapping with top-level keys replaced."""
    data = copy.deepcopy(MINIMAL)
    data.update(sections)
    return data


# --- the shipped files ------------------------------------------------------------------------


def test_example_yaml_loads_as_the_aws_form() -> None:
    # Given the documented AWS example
    path = MIGRATIONS / "example.yaml"
    # When it is loaded
    migration = load_migration(path)
    # Then every section holds what the file says
    assert migration.name == "shop-orders"
    assert migration.slot_name == "zdm_shop_orders"
    for endpoint in (migration.source, migration.target):
        assert endpoint.dsn is None
        assert endpoint.secret_arn is not None
        assert endpoint.secret_arn.startswith("arn:aws:secretsmanager:")
        assert endpoint.host is not None
        assert endpoint.database == "orders"
        assert endpoint.port == 5432
    assert "public.*" in migration.tables.include
    assert migration.tables.exclude
    assert migration.engine.type == "dms"
    assert migration.engine.dms.serverless is False
    assert migration.router.type == "route53"
    assert migration.router.route53.hosted_zone_id == "Z0123456789ABCDEFGHIJ"
    assert migration.router.pgbouncer.admin_dsn is not None
    assert migration.router.pgbouncer.config_path == "/etc/pgbouncer/pgbouncer.ini"
    assert migration.source.rds_cluster_identifier == "shop-orders-pg13"
    assert migration.aws.network.vpc_id == "vpc-0a1b2c3d4e5f60718"
    assert migration.aws.streaming.dms_change_stream is True
    assert migration.lag.max_bytes == 16 * 1024**2
    assert migration.read_shift.steps == [10, 50, 100]
    assert migration.validation.enabled is True
    assert migration.alarms.names
    assert migration.alarms.error_rate_metric == "Shop/API/ErrorRate"


def test_local_yaml_loads_as_the_dsn_form_and_takes_rehearsal_overrides() -> None:
    # Given the local rehearsal file and the DSNs a rehearsal would substitute
    path = MIGRATIONS / "local.yaml"
    overrides = {"source": {"dsn": "host=127.0.0.1 port=55001 dbname=orders"}}
    # When it is loaded with and without them
    plain = load_migration(path)
    replaced = load_migration(path, overrides)
    # Then both use DSNs only, and the override replaced the source's DSN
    for migration in (plain, replaced):
        for endpoint in (migration.source, migration.target):
            assert endpoint.dsn is not None
            assert endpoint.secret_arn is None
    assert plain.name == "shop-orders"
    assert plain.read_shift.steps == [10, 50, 100]
    assert replaced.source.dsn is not None
    assert replaced.source.dsn.get_secret_value() == "host=127.0.0.1 port=55001 dbname=orders"
    assert replaced.target == plain.target


def test_example_and_local_describe_the_same_migration() -> None:
    # Given both shipped files
    aws = load_migration(MIGRATIONS / "example.yaml")
    local = load_migration(MIGRATIONS / "local.yaml")
    # Then they select the same tables with the same lag limits and read steps; the engine and
    # router differ only where the local choice has no AWS counterpart (dms, route53 are AWS only)
    assert aws.name == local.name
    assert aws.tables == local.tables
    assert aws.lag == local.lag
    assert aws.read_shift.steps == local.read_shift.steps
    assert (aws.engine.type, aws.router.type) == ("dms", "route53")
    assert (local.engine.type, local.router.type) == ("logical", "pgbouncer")


def test_defaults_fill_everything_left_out() -> None:
    # Given a file with only the required keys
    data = copy.deepcopy(MINIMAL)
    # When it is parsed
    migration = parse_migration(data)
    # Then every optional section takes its documented default
    assert migration.source.port == 5432
    assert migration.tables.include == ["public.*"]
    assert migration.tables.exclude == []
    assert migration.engine.type == "logical"
    assert migration.engine.logical.copy_method == "parallel-snapshot"
    assert migration.engine.logical.copy_workers == 4
    assert migration.engine.logical.copy_chunk_rows == 250_000
    assert migration.engine.dms.lob_mode == "full"
    assert migration.router.type == "pgbouncer"
    assert migration.router.pgbouncer.database_alias == "app"
    assert migration.router.route53.ttl_seconds == 5
    assert migration.lag.max_seconds == 5.0
    assert migration.lag.max_bytes == 16 * 1024**2
    assert migration.read_shift.steps == [10, 50, 100]
    assert migration.read_shift.bake_seconds == 60.0
    assert migration.validation.enabled is True
    assert migration.validation.chunk_rows == 100_000
    assert migration.validation.max_parallel_chunks == 8
    assert migration.cutover.fence_timeout_seconds == 5.0
    assert migration.cutover.catch_up_timeout_seconds == 30.0
    assert migration.cutover.sequence_margin == 1000
    assert migration.cutover.rollback_window_hours == 24.0
    assert migration.alarms.names == []
    assert migration.alarms.error_rate_metric is None


@pytest.mark.parametrize(
    ("given", "expected"),
    [("16MB", 16 * 1024**2), (1048576, 1048576), ("1.5GB", 1536 * 1024**2), ("64kB", 65536), ("512", 512)],
)
def test_sizes_accept_bytes_and_postgresql_units(given: Any, expected: int) -> None:
    # Given a size as PostgreSQL writes it / When parsed / Then it is a number of bytes
    assert parse_bytes(given) == expected


def test_a_size_with_units_is_accepted_in_the_file() -> None:
    # Given lag.max_bytes written with a fractional unit
    data = with_changes(lag={"max_bytes": "1.5GB"})
    # When parsed / Then it is stored in bytes
    assert parse_migration(data).lag.max_bytes == 1536 * 1024**2


# --- mistakes: one exact message each ---------------------------------------------------------


def test_unknown_top_level_key_suggests_the_close_one() -> None:
    # Given a misspelt top-level key
    data = with_changes(read_shfit={"steps": [10, 100]})
    # When parsed / Then the message names it, suggests the right one and lists the allowed keys
    assert problems_for(data) == [
        "read_shfit: unknown key 'read_shfit'; did you mean 'read_shift'? allowed keys here: alarms, aws, cutover, "
        "engine, lag, name, read_shift, router, source, tables, target, validation"
    ]


def test_unknown_nested_key_lists_the_keys_of_that_section() -> None:
    # Given a misspelt key two levels down
    data = with_changes(router={"pgbouncer": {"admin_dns": "host=127.0.0.1 port=6432 dbname=pgbouncer"}})
    # When parsed / Then the hint comes from the pgbouncer section, not the top level
    assert problems_for(data) == [
        "router.pgbouncer.admin_dns: unknown key 'admin_dns'; did you mean 'admin_dsn'? "
        "allowed keys here: admin_dsn, config_path, database_alias, reader_alias, reconnect_seconds, source_backend, target_backend"
    ]


def test_unknown_key_in_an_endpoint() -> None:
    # Given 'hots' for 'host' in the source
    data = with_changes(source={"secret_arn": ARN, "host": "db", "database": "orders", "hots": "db"})
    # When parsed / Then the endpoint's keys are listed
    assert problems_for(data) == [
        "source.hots: unknown key 'hots'; did you mean 'host'? allowed keys here: database, dsn, host, port, "
        "rds_cluster_identifier, rds_instance_identifier, secret_arn, secret_kms_key_arn"
    ]


def test_string_where_a_whole_number_belongs() -> None:
    # Given a word for a row count
    data = with_changes(validation={"chunk_rows": "lots"})
    # When parsed / Then the message says what kind of value is expected
    assert problems_for(data) == ["validation.chunk_rows: expected a whole number, got 'lots'"]


def test_fraction_in_the_step_list_names_its_index() -> None:
    data = with_changes(read_shift={"steps": [10.5, 100]})
    assert problems_for(data) == ["read_shift.steps[0]: expected a whole number, got 10.5"]


def test_steps_must_end_at_100() -> None:
    # Given steps that leave some reads on the source
    data = with_changes(read_shift={"steps": [10, 50]})
    # When parsed / Then the message says the last step must be 100
    assert problems_for(data) == ["read_shift.steps: the last step must be 100 (all reads on the target); got [10, 50]"]


def test_steps_must_rise() -> None:
    data = with_changes(read_shift={"steps": [50, 10, 100]})
    assert problems_for(data) == ["read_shift.steps: steps must rise strictly, e.g. [10, 50, 100]; got [50, 10, 100]"]


def test_a_step_above_100_is_named() -> None:
    data = with_changes(read_shift={"steps": [10, 150]})
    assert problems_for(data) == [
        "read_shift.steps: each step is a percentage of reads on the target, from 1 to 100; got [150] in [10, 150]"
    ]


def test_empty_step_list() -> None:
    data = with_changes(read_shift={"steps": []})
    assert problems_for(data) == [
        "read_shift.steps: the list is empty; give at least 1 item(s), or remove the key to use the default"
    ]


def test_endpoint_without_any_connection() -> None:
    # Given a target with only a port
    data = with_changes(target={"port": 5433})
    # When parsed / Then both ways to connect are spelled out
    assert problems_for(data) == [
        "target: missing connection: add 'dsn: \"host=... port=... dbname=... user=...\"' for a local run, "
        "or 'secret_arn', 'host' and 'database' for AWS"
    ]


def test_endpoint_with_both_dsn_and_secret_arn() -> None:
    data = with_changes(target={"dsn": "host=127.0.0.1", "secret_arn": ARN, "host": "db", "database": "orders"})
    assert problems_for(data) == [
        "target: give either 'dsn' (local runs) or 'secret_arn' with 'host' and 'database' (AWS), not both"
    ]


def test_secret_arn_without_host_and_database() -> None:
    data = with_changes(source={"secret_arn": ARN})
    assert problems_for(data) == [
        "source: with 'secret_arn' also give 'host', 'database' (the secret holds only the credentials)"
    ]


def test_secret_arn_without_database_only() -> None:
    data = with_changes(source={"secret_arn": ARN, "host": "db.internal"})
    assert problems_for(data) == [
        "source: with 'secret_arn' also give 'database' (the secret holds only the credentials)"
    ]


def test_bad_secret_arn() -> None:
    # Given a secret's name instead of its ARN
    data = with_changes(source={"secret_arn": "shop/orders", "host": "db", "database": "orders"})
    # When parsed / Then the expected ARN shape is shown
    assert problems_for(data) == [
        "source: 'secret_arn' is not a Secrets Manager ARN: expected "
        "'arn:aws:secretsmanager:<region>:<account>:secret:<name>'"
    ]


def test_port_out_of_range() -> None:
    data = with_changes(target={"dsn": "host=127.0.0.1", "port": 70000})
    assert problems_for(data) == ["target.port: 70000 is too large; use 65535 or less"]


def test_engine_type_not_in_the_list() -> None:
    # Given an engine this version does not offer
    data = with_changes(engine={"type": "pglogical"})
    # When parsed / Then the allowed values are listed
    assert problems_for(data) == ["engine.type: 'pglogical' is not allowed; use one of 'logical', 'dms' or 'debezium'"]


def test_bad_name() -> None:
    data = with_changes(name="Shop_Orders")
    assert problems_for(data) == [
        "name: 'Shop_Orders' is not a usable name: lower-case letters, digits and '-', starting with a letter, "
        "at most 40 characters (it names the stack, slot and publication)"
    ]


def test_missing_name() -> None:
    data = copy.deepcopy(MINIMAL)
    del data["name"]
    assert problems_for(data) == ["name: required field is missing; add it"]


def test_table_pattern_without_schema() -> None:
    data = with_changes(tables={"include": ["orders"]})
    assert problems_for(data) == [
        "tables.include: pattern 'orders' must be 'schema.table' (wildcards * ? allowed), "
        "e.g. 'public.orders' or 'sales.*'"
    ]


def test_empty_section_says_it_is_empty() -> None:
    # Given `tables:` with nothing under it (YAML null)
    data = with_changes(tables=None)
    assert problems_for(data) == ["tables: expected a mapping of keys, got an empty value"]


def test_route53_router_needs_its_hosted_zone() -> None:
    data = with_changes(router={"type": "route53"})
    assert problems_for(data) == ["router: router type 'route53' needs 'route53.hosted_zone_id' (the private zone)"]


def test_rds_proxy_router_needs_the_proxy_name() -> None:
    data = with_changes(router={"type": "rds-proxy"})
    assert problems_for(data) == ["router: router type 'rds-proxy' needs 'rds_proxy.proxy_name'"]


def test_size_in_unknown_units() -> None:
    data = with_changes(lag={"max_bytes": "16 parsecs"})
    assert problems_for(data) == [
        "lag.max_bytes: '16 parsecs' is not a size: write a number of bytes or a number with a unit "
        "(B, kB, MB, GB, TB), e.g. '64MB', '1.5GB'"
    ]


def test_zero_timeout() -> None:
    data = with_changes(cutover={"fence_timeout_seconds": 0})
    assert problems_for(data) == ["cutover.fence_timeout_seconds: 0 is too small; use a value above 0"]


def test_invalid_yaml_gives_line_and_column(tmp_path: Path) -> None:
    # Given a file whose second line is indented under a scalar
    path = tmp_path / "broken.yaml"
    path.write_text("name: shop-orders\n  source: x\n", encoding="utf-8")
    # When loaded
    with pytest.raises(MigrationFileError) as caught:
        load_migration(path)
    # Then the position and the YAML problem are given
    assert caught.value.path == str(path)
    assert caught.value.problems == [
        "not valid YAML at line 2, column 9: mapping values are not allowed here "
        "(check indentation, colons and quotes on or before that line)"
    ]


def test_file_not_found(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(MigrationFileError) as caught:
        load_migration(path)
    assert caught.value.problems == ["file not found: give the path of a migrations/<name>.yaml file"]
    assert str(caught.value).startswith(f"{path}: 1 problem(s) in the migration file:")


@pytest.mark.parametrize("text", ["- name: shop-orders\n", "just text\n", ""])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    # Given a file that is a list, a scalar or empty
    path = tmp_path / "odd.yaml"
    path.write_text(text, encoding="utf-8")
    # When loaded / Then one message explains the expected shape
    with pytest.raises(MigrationFileError) as caught:
        load_migration(path)
    assert caught.value.problems == [
        "(top level): the file must be a YAML mapping with 'name', 'source', 'target', ..."
    ]


def test_several_problems_are_all_reported_at_once(tmp_path: Path) -> None:
    # Given a file with four unrelated mistakes
    path = tmp_path / "many.yaml"
    path.write_text(
        "name: shop-orders\n"
        "source:\n  dsn: host=127.0.0.1\n"
        "target:\n  port: 5433\n"
        "engine:\n  type: pglogical\n"
        "read_shift:\n  steps: [10, 50]\n",
        encoding="utf-8",
    )
    # When loaded
    with pytest.raises(MigrationFileError) as caught:
        load_migration(path)
    # Then each mistake has its own message, and the error text lists them all
    problems = caught.value.problems
    assert problems == [
        "target: missing connection: add 'dsn: \"host=... port=... dbname=... user=...\"' for a local run, "
        "or 'secret_arn', 'host' and 'database' for AWS",
        "engine.type: 'pglogical' is not allowed; use one of 'logical', 'dms' or 'debezium'",
        "read_shift.steps: the last step must be 100 (all reads on the target); got [10, 50]",
    ]
    assert str(caught.value) == f"{path}: 3 problem(s) in the migration file:\n" + "\n".join(
        f"  - {p}" for p in problems
    )


# --- secrets ----------------------------------------------------------------------------------


def test_dsn_password_never_appears_in_str_repr_or_json() -> None:
    # Given a migration whose source DSN and pgbouncer admin DSN carry a password
    data = with_changes(router={"pgbouncer": {"admin_dsn": f"host=127.0.0.1 dbname=pgbouncer password={PASSWORD}"}})
    migration = parse_migration(data)
    # When it is printed, repr'd or serialized
    shown = [str(migration), repr(migration), migration.model_dump_json(), str(migration.model_dump())]
    # Then the password is nowhere, yet the code can still read it
    for text in shown:
        assert PASSWORD not in text
        assert "**********" in text
    assert migration.source.dsn is not None
    assert PASSWORD in migration.source.dsn.get_secret_value()


def test_a_dsn_in_the_wrong_place_is_not_echoed_in_the_error() -> None:
    # Given a DSN written directly as the source, and a DSN given as a mapping
    data = with_changes(
        source=f"host=127.0.0.1 dbname=orders password={PASSWORD}",
        target={"dsn": {"host": "127.0.0.1", "password": PASSWORD}},
    )
    # When parsed
    problems = problems_for(data)
    # Then the messages say what is wrong without repeating the password
    assert problems == [
        "source: expected a mapping of keys, got a text value (not shown: it may hold a password)",
        "target.dsn: expected a text value, got a mapping (not shown: it may hold a password)",
    ]


def test_a_malformed_dsn_is_named_without_showing_it() -> None:
    # Given a password with a space, not quoted (libpq's own message would quote the word after it)
    data = with_changes(source={"dsn": "host=127.0.0.1 dbname=orders user=app password=correct horsebattery"})
    # When parsed / Then the field is named with the fix, and no part of the string is shown
    problems = problems_for(data)
    assert len(problems) == 1 and problems[0].startswith("source.dsn: 'dsn' is not a libpq connection string")
    assert "horsebattery" not in problems[0] and "quoting values with spaces" in problems[0]


def test_a_malformed_dsn_reaching_connect_is_an_error_without_the_password() -> None:
    # Given a DSN that bypassed the file (the validation CLI takes DSNs directly)
    from lambdas.core.db import InvalidDsn, connect

    # When connecting / Then the error names the problem, not the string
    with pytest.raises(InvalidDsn) as caught:
        connect("host=127.0.0.1 port=1 dbname=x user=app password=correct horsebattery")
    assert "horsebattery" not in str(caught.value) and "not valid libpq syntax" in str(caught.value)


@pytest.mark.parametrize(
    "target",
    [
        {"dsn": MINIMAL["source"]["dsn"]},  # the very same string
        {"dsn": f"port=5432 host=127.0.0.1  user=app dbname=orders password={PASSWORD}"},  # reordered
    ],
)
def test_a_target_that_is_the_source_database_is_refused(target: dict[str, Any]) -> None:
    # Given a target pointing at the source's host, port and database
    problems = problems_for(with_changes(target=target))
    # Then it is refused naming 'target', without the password
    assert problems == [
        "target: names the same database as source (same connection settings); point 'target' at the database "
        "to migrate to"
    ]


@pytest.mark.parametrize(
    ("sections", "field"),
    [
        ({"read_shift": {"bake_seconds": True}}, "read_shift.bake_seconds"),  # YAML `bake_seconds: yes`
        ({"read_shift": {"steps": [True, 100]}}, "read_shift.steps[0]"),
        ({"lag": {"max_seconds": float("inf")}}, "lag.max_seconds"),  # YAML `.inf`: not JSON for Step Functions
        ({"cutover": {"fence_timeout_seconds": float("nan")}}, "cutover.fence_timeout_seconds"),
    ],
)
def test_a_boolean_or_a_non_finite_number_is_refused_naming_the_field(sections: dict[str, Any], field: str) -> None:
    problems = problems_for(with_changes(**sections))
    assert len(problems) == 1 and problems[0].startswith(field + ":"), problems


@pytest.mark.parametrize(
    ("sections", "field"),
    [
        ({"cutover": {"catch_up_timeout_seconds": 1200}}, "cutover"),
        # waited twice (before the fence for a streaming replication, inside it for the catch-up): 5 + 2 x 420 s
        ({"cutover": {"catch_up_timeout_seconds": 420}}, "cutover"),
        (
            {"router": {"type": "route53", "route53": {"hosted_zone_id": "Z1", "insync_timeout_seconds": 1000}}},
            "router",
        ),
        ({"validation": {"recheck_timeout_seconds": 600}}, "validation.recheck_timeout_seconds"),
    ],
)
def test_a_wait_longer_than_the_function_that_waits_is_refused(sections: dict[str, Any], field: str) -> None:
    # Given waits the Cutover function (900 s) or a ValidateChunk function (two re-checks within 780 s of its
    # 900 s) cannot finish: it would be
    # stopped mid-step (a cutover with the source fenced and clients held)
    from stacks.registry import HANDLERS

    assert {h.name: h.timeout_seconds for h in HANDLERS if h.name in ("Cutover", "ValidateChunk")} == {
        "Cutover": 900,
        "ValidateChunk": 900,
    }
    # When parsed / Then refused naming the section
    problems = problems_for(with_changes(**sections))
    assert len(problems) == 1 and problems[0].startswith(field), problems


def test_the_time_budgets_leave_each_function_a_minute_of_its_own() -> None:
    # The budgets the file and preflight check against, and the functions the stack deploys
    from lambdas.core.config import COPY_TIME_BUDGET_SECONDS, CUTOVER_WAIT_BUDGET_SECONDS
    from stacks.registry import HANDLERS

    timeouts = {h.name: h.timeout_seconds for h in HANDLERS}
    assert timeouts["Cutover"] - 60 == CUTOVER_WAIT_BUDGET_SECONDS
    assert timeouts["Replication"] - 60 == COPY_TIME_BUDGET_SECONDS


# --- helpers behind the hints -----------------------------------------------------------------


def test_nested_model_is_found_through_optional_and_list_annotations() -> None:
    # Given annotations that wrap a model / Then the model inside is found (for unknown-key hints)
    assert _submodel(Endpoint) is Endpoint
    assert _submodel(Endpoint | None) is Endpoint
    assert _submodel(list[Endpoint]) is Endpoint
    assert _submodel(int | None) is None
    assert _submodel(Migration.model_fields["source"].annotation) is Endpoint


# --- validation settings ------------------------------------------------------------------------


def test_validation_settings_default_and_accept_overrides() -> None:
    # Given no validation section / Then the validator's documented defaults apply
    defaults = parse_migration(copy.deepcopy(MINIMAL)).validation
    assert (defaults.slice_rows, defaults.recheck_attempts, defaults.recheck_timeout_seconds, defaults.row_hash) == (
        10_000,
        5,
        60.0,
        "auto",
    )
    # Given each set / Then each is kept
    chosen = parse_migration(
        with_changes(
            validation={"slice_rows": 500, "recheck_attempts": 3, "recheck_timeout_seconds": 5, "row_hash": "md5"}
        )
    ).validation
    assert (chosen.slice_rows, chosen.recheck_attempts, chosen.recheck_timeout_seconds, chosen.row_hash) == (
        500,
        3,
        5.0,
        "md5",
    )


def test_validation_settings_out_of_range_name_the_fix() -> None:
    # Given a single re-check (an extra row needs two sightings), a tiny slice and an unknown hash
    data = with_changes(validation={"recheck_attempts": 1, "slice_rows": 5, "row_hash": "sha1"})
    # When parsed / Then one message each
    assert problems_for(data) == [
        "validation.slice_rows: 5 is too small; use 10 or more",
        "validation.recheck_attempts: 1 is too small; use 2 or more",
        "validation.row_hash: 'sha1' is not allowed; use one of 'auto' or 'md5'",
    ]
