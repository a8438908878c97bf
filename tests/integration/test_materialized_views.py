"""Materialized views on real servers: neither the copy nor replication fills them, so the migration
refreshes the selected ones on the target (inputs first) before reads move there."""

from __future__ import annotations

import pytest
from psycopg2.extensions import parse_dsn

from lambdas.core.db import connect
from lambdas.core.matviews import MaterializedViewsMissing, refresh_materialized_views
from tests.integration.db_env import query, run_sql

TABLE = "CREATE TABLE orders (id int PRIMARY KEY, customer int NOT NULL, amount numeric NOT NULL)"
# order_totals <- big_totals (a plain view) <- big_customers: refreshing big_customers first would read an
# unpopulated order_totals and fail. slow_view takes longer than the target database's statement_timeout.
VIEWS = """
CREATE MATERIALIZED VIEW order_totals AS SELECT customer, sum(amount) AS total FROM orders GROUP BY customer {data};
CREATE VIEW big_totals AS SELECT * FROM order_totals WHERE total > 100;
CREATE MATERIALIZED VIEW big_customers AS SELECT customer FROM big_totals {data};
CREATE MATERIALIZED VIEW slow_view AS SELECT count(*) AS n FROM orders, pg_sleep(0.3) {data};
CREATE MATERIALIZED VIEW never_filled AS SELECT id FROM orders WITH NO DATA;
"""
ROWS = "INSERT INTO orders SELECT g, g % 10, g FROM generate_series(1, 100) g"
POPULATED = "SELECT relname, relispopulated FROM pg_class WHERE relkind = 'm' ORDER BY 1"


def refresh(source_dsn: str, target_dsn: str, include: list[str]) -> list[tuple[str, bool]]:
    source, target = connect(source_dsn), connect(target_dsn)
    try:
        return [(str(r.name), r.refreshed) for r in refresh_materialized_views(source, target, include, [])]
    finally:
        source.close()
        target.close()


def test_views_are_refreshed_on_the_target_inputs_first_and_again_safely(fresh_dbs: tuple[str, str]) -> None:
    # Given the source with its views populated, and the target as pg_dump --schema-only leaves it (every
    # view WITH NO DATA) after the copy filled its table, under a 100 ms statement_timeout
    src, tgt = fresh_dbs
    run_sql(src, TABLE + "; " + ROWS + "; " + VIEWS.format(data="WITH DATA"))
    run_sql(tgt, TABLE + "; " + ROWS + "; " + VIEWS.format(data="WITH NO DATA"))
    run_sql(tgt, f"ALTER DATABASE \"{parse_dsn(tgt)['dbname']}\" SET statement_timeout = '100ms'")

    # When the migration refreshes them, twice (a retried task)
    first = refresh(src, tgt, ["public.*"])
    second = refresh(src, tgt, ["public.*"])

    # Then each view the source holds populated is refreshed, its inputs first, and one the source holds
    # unpopulated stays so; the second run does the same
    assert first == [
        ("public.order_totals", True),
        ("public.big_customers", True),
        ("public.never_filled", False),
        ("public.slow_view", True),
    ]
    assert second == first
    # And reads on the target get the source's answers
    for view in ("order_totals", "big_customers", "slow_view"):
        statement = f"SELECT * FROM {view} ORDER BY 1"
        assert query(tgt, statement) == query(src, statement), view
    assert query(tgt, POPULATED) == query(src, POPULATED)


def test_a_view_the_target_lacks_stops_the_refresh_before_any_view_changes(fresh_dbs: tuple[str, str]) -> None:
    # Given a view created on the source only
    src, tgt = fresh_dbs
    run_sql(src, TABLE + "; " + ROWS + "; " + VIEWS.format(data="WITH DATA"))
    run_sql(tgt, TABLE + "; " + ROWS + "; " + VIEWS.format(data="WITH NO DATA") + "; DROP MATERIALIZED VIEW slow_view")

    # When the migration refreshes the views, it refuses, naming the view and what to do
    with pytest.raises(MaterializedViewsMissing, match=r"public\.slow_view exist on the source but not on the target"):
        refresh(src, tgt, ["public.*"])

    # And no view was refreshed
    assert all(not populated for _, populated in query(tgt, POPULATED))


def test_only_the_views_the_selection_matches_are_refreshed(fresh_dbs: tuple[str, str]) -> None:
    # Given views in public and a table pattern that matches only some of them
    src, tgt = fresh_dbs
    run_sql(src, TABLE + "; " + ROWS + "; " + VIEWS.format(data="WITH DATA"))
    run_sql(tgt, TABLE + "; " + ROWS + "; " + VIEWS.format(data="WITH NO DATA"))

    # When the migration refreshes the views of `public.order*`
    refreshed = refresh(src, tgt, ["public.order*"])

    # Then only order_totals is refreshed
    assert refreshed == [("public.order_totals", True)]
    assert [name for name, populated in query(tgt, POPULATED) if populated] == ["order_totals"]
