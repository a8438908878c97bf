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
