"""`python -m rehearsal.validate` between two real databases: exit status, JSON on stdout, progress on stderr."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from lambdas.core.db import connect, execute
from rehearsal import validate as cli


def given_tables(src: str, tgt: str) -> None:
    for dsn in (src, tgt):
        conn = connect(dsn)
        execute(
            conn,
            "CREATE TABLE items (id bigint PRIMARY KEY, name text, price numeric(8,2));"
            " INSERT INTO items SELECT g, 'item ' || g, g / 4.0 FROM generate_series(1, 3000) g;"
            " CREATE TABLE tags (t text PRIMARY KEY); INSERT INTO tags SELECT 'tag' || g FROM generate_series(1, 50) g;"
            " ANALYZE",
        )
        conn.close()


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(argv, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def test_json_result_names_the_differences_and_exits_1(fresh_dbs: tuple[str, str]) -> None:
    # Given two databases where the target lost one item and changed another's price
    src, tgt = fresh_dbs
    given_tables(src, tgt)
    conn = connect(tgt)
    execute(conn, "DELETE FROM items WHERE id = 42; UPDATE items SET price = 0 WHERE id = 2500")
    conn.close()
    # When the command line compares them (a password in the DSN, as users write it)
    code, out, err = run(
        ["--source", src + " password=s3cret", "--target", tgt + " password=s3cret", "--json", "--chunk-rows", "1000"]
    )
    # Then it exits 1, prints exactly one JSON object naming both rows, and reports progress on stderr
    assert code == cli.EXIT_DIFFERENT, err
    summary = json.loads(out)
    assert out.count("\n") == 1
    items = next(t for t in summary["per_table"] if t["table"] == "public.items")
    assert items["missing"]["first"][0]["key"] == ["42"]
    assert items["changed"]["first"][0] == {"key": ["2500"], "columns": ["price"], "copies": 1}
    assert (summary["rows_compared"], summary["target_rows"], summary["differences"]) == (3050, 3049, 2)
    assert "planned 2 table(s)" in err and "chunks" in err
    # ... including what a running chunk was doing (its first step is always drawn)
    now = r"; now public\.(items chunk \d/3 \(\d+s\): key ranges, \d/\d slices|tags chunk 1/1 \(\d+s\): key buckets)\n"
    assert re.search(now, err), err
    assert "s3cret" not in out + err


def test_migration_file_and_table_output_for_equal_databases(fresh_dbs: tuple[str, str], tmp_path: Path) -> None:
    # Given equal databases and a migration file naming them and selecting one table
    src, tgt = fresh_dbs
    given_tables(src, tgt)
    path = tmp_path / "m.yaml"
    path.write_text(
        f"name: cli-test\nsource: {{dsn: '{src}'}}\ntarget: {{dsn: '{tgt}'}}\n"
        "tables: {include: ['public.items']}\nvalidation: {chunk_rows: 1000, max_parallel_chunks: 2}\n"
    )
    # When the command line runs on the file
    code, out, err = run(["--migration", str(path)])
    # Then it exits 0 with a table and the verdict
    assert code == cli.EXIT_EQUAL, out + err
    assert "public.items" in out and "public.tags" not in out
    assert out.strip().splitlines()[-1].startswith("EQUAL: 3,000 rows compared")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "give --source and --target DSNs"),
        (["--migration", "/nonexistent.yaml"], "file not found"),
    ],
)
def test_usage_errors_exit_2(argv: list[str], message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZDM_SOURCE_DSN", raising=False)
    monkeypatch.delenv("ZDM_TARGET_DSN", raising=False)
    code, _, err = run(argv)
    assert code == cli.EXIT_ERROR and message in err


def test_an_unreachable_server_is_an_error_without_the_password() -> None:
    code, _, err = run(
        [
            "--source",
            "host=127.0.0.1 port=1 dbname=x user=u password=s3cret connect_timeout=2",
            "--target",
            "host=127.0.0.1 port=1",
        ]
    )
    assert code == cli.EXIT_ERROR and "cannot connect" in err and "s3cret" not in err


def test_a_malformed_dsn_is_an_error_without_any_part_of_it() -> None:
    # Given a password with a space, not quoted: libpq's own message quotes the word after the space
    code, out, err = run(
        ["--source", "host=127.0.0.1 port=1 dbname=x user=u password=correct horsebattery", "--target", "host=b"]
    )
    # Then the error says what is wrong and shows nothing of the string
    assert code == cli.EXIT_ERROR and "not valid libpq syntax" in err
    assert "horsebattery" not in out + err
