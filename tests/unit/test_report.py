"""The HTML report: self-contained, one chart per series group, phases shown."""

from __future__ import annotations

import re

from rehearsal.report import Chart, PhaseSpan, Series, render_report


def test_report_is_self_contained_and_shows_every_chart_and_phase() -> None:
    phases = [
        PhaseSpan("initial copy", 0, 4),
        PhaseSpan("read shift 10%", 4, 6),
        PhaseSpan("rollback", 6, 7, "rollback"),
    ]
    charts = [
        Chart("Replication lag", "seconds", [Series("lag", [(0, 0.0), (2, 1.5), (5, 0.1)])]),
        Chart("Reads on target", "%", [Series("readers", [(0, 0), (4, 10), (6, 0)], step=True)], y_max=100),
    ]
    page = render_report({"outcome": "rolled_back", "fault": "gate"}, charts, phases, [("rows lost", "0", "ok")], 7.0)
    assert page.count("<svg") == 3  # phase strip + two charts
    for name in ("initial copy", "read shift 10%", "rollback", "Replication lag", "Reads on target", "rows lost"):
        assert name in page
    assert "rolled back" in page and "gate" in page
    assert not re.search(r"(src|href)=\"?https?://", page)  # opens without a network


def test_report_shows_each_function_against_its_timeout_and_the_state_limit() -> None:
    # Given a run whose Cutover took 450 s of its 900 s and whose ValidateChunk outran its timeout
    invocations = {
        "Cutover": {
            "invocations": 2,
            "longest_seconds": 450.0,
            "timeout_seconds": 900.0,
            "largest_result_bytes": 1200,
            "result_limit_bytes": 262144,
        },
        "ValidateChunk": {
            "invocations": 6,
            "longest_seconds": 950.0,
            "timeout_seconds": 900.0,
            "largest_result_bytes": 80,
            "result_limit_bytes": 262144,
        },
    }
    # When the report is rendered
    page = render_report({"outcome": "migrated", "lambda_invocations": invocations}, [], [], [], 10.0)
    # Then each function's row gives its share of the timeout, the overrun drawn in red
    assert "Lambda functions, against Lambda's limits" in page
    assert "450.00 s of 900 s" in page and "50.0%" in page
    assert '<span class="bad" style="width:100.0%"></span></span> 105.6%' in page
    assert "1,200 B" in page


def test_events_are_marked_on_every_chart_and_listed() -> None:
    # Given a run in which the source crashed and came back
    charts = [
        Chart("Replication lag", "seconds", [Series("lag", [(0, 0.0), (5, 0.1)])]),
        Chart("Write latency", "ms", [Series("p99", [(0, 2.0), (5, 3.0)])]),
    ]
    events = [(6.6, "source crashed"), (9.9, "source restarted <now>")]
    # When the report is rendered
    page = render_report({"outcome": "migrated"}, charts, [PhaseSpan("read shift", 0, 10)], [], 12.0, events=events)
    # Then each chart carries a dashed mark per event, named on hover, and the events are listed, escaped
    assert page.count('class="event"') == 2 * len(charts)
    assert "<title>6.6s: source crashed</title>" in page
    assert "<h3>Events</h3>" in page and "<td>9.90</td><td>source restarted &lt;now&gt;</td>" in page
    # And a run without events shows neither
    quiet = render_report({"outcome": "migrated"}, charts, [PhaseSpan("read shift", 0, 10)], [], 12.0)
    assert 'class="event"' not in quiet and "<h3>Events</h3>" not in quiet
