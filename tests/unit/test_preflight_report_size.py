"""What the Preflight task returns stays within a state's 256 KiB whatever the schema's size."""

from __future__ import annotations

import json

from lambdas.core.preflight.model import CheckResult, PreflightReport
from lambdas.handlers.preflight import DETAILS_SHOWN, report_for_state


def test_a_check_failing_on_thousands_of_tables_is_trimmed_for_the_state_and_says_how_many_more() -> None:
    # Given a report whose replica-identity check names 8,000 tables (~600 KB of findings)
    findings = [
        f"shop_{i:05d}.orders_archive_partition_{i:05d}: no primary key (replica identity default)" for i in range(8000)
    ]
    report = PreflightReport(
        [
            CheckResult("replica_identity", "fail", "8000 tables without identity", "add keys", findings),
            CheckResult("wal_level", "pass", "logical"),
        ]
    )
    assert len(json.dumps([c.details for c in report.checks])) > 256 * 1024
    # When the task shapes its result
    result = report_for_state(report)
    # Then it fits a state, keeps the verdict and the first findings, and counts the rest
    assert len(json.dumps(result).encode()) < 64 * 1024
    assert result["ok"] is False and result["failed"] == ["replica_identity"]
    details = result["checks"][0]["details"]
    assert details[:DETAILS_SHOWN] == findings[:DETAILS_SHOWN]
    assert details[-1] == f"... and {8000 - DETAILS_SHOWN} more (all in the function's log)"
    assert result["checks"][1]["details"] == []
