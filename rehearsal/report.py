"""The rehearsal's report: one self-contained HTML file (inline SVG, no network needed).

Charts over time share one time axis with the migration's phases drawn as bands, so a
reader sees at a glance where lag rose, when reads moved, when the writer switched and
what the workload felt meanwhile.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

Point = tuple[float, float]

PHASE_COLOURS = ["#e8f0fe", "#fef7e0", "#e6f4ea", "#fce8e6", "#f3e8fd", "#e0f7fa", "#fff3e0", "#ede7f6"]


@dataclass
class Series:
    name: str
    points: list[Point] = field(default_factory=list)
    colour: str = "#1a73e8"
    step: bool = False  # drawn as steps (weights), not lines


@dataclass
class Chart:
    title: str
    unit: str
    series: list[Series]
    y_max: float | None = None


@dataclass(frozen=True)
class PhaseSpan:
    name: str
    start: float
    end: float
    status: str = "ok"  # ok / failed / rollback


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    magnitude = 10 ** (len(str(int(value))) - 1) if value >= 1 else 1.0
    for factor in (1, 2, 2.5, 5, 10):
        if value <= factor * magnitude:
            return factor * magnitude
    return value


def _fmt(value: float) -> str:
    if value >= 1_000_000:
        return f"{value / 1_000_000:.1f}M"
    if value >= 10_000:
        return f"{value / 1000:.0f}k"
    if value >= 100 or value == int(value):
        return f"{value:.0f}"
    return f"{value:.2f}"


MAX_EVENT_MARKS = 40  # a run retrying one step for minutes would otherwise cover the charts in lines


def render_chart(
    chart: Chart,
    phases: Sequence[PhaseSpan],
    t_end: float,
    events: Sequence[tuple[float, str]] = (),
    width: int = 960,
    height: int = 220,
) -> str:
    """`events` (seconds, what happened: a fault, a server crash, a task's error) are drawn as dashed lines."""
    left, right, top, bottom = 64, 16, 28, 28
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [v for s in chart.series for _, v in s.points]
    y_max = chart.y_max if chart.y_max is not None else _nice_max(max(values, default=0.0))
    t_end = max(t_end, 1e-9)

    def x(t: float) -> float:
        return left + plot_w * min(max(t, 0.0), t_end) / t_end

    def y(v: float) -> float:
        return top + plot_h * (1 - min(max(v, 0.0), y_max) / y_max)

    parts = [f'<svg viewBox="0 0 {width} {height}" width="100%" role="img" aria-label="{html.escape(chart.title)}">']
    parts.append(f'<text x="{left}" y="16" class="title">{html.escape(chart.title)} ({html.escape(chart.unit)})</text>')
    for i, phase in enumerate(phases):
        colour = "#fdecea" if phase.status != "ok" else PHASE_COLOURS[i % len(PHASE_COLOURS)]
        parts.append(
            f'<rect x="{x(phase.start):.1f}" y="{top}" width="{max(x(phase.end) - x(phase.start), 0.5):.1f}" '
            f'height="{plot_h}" fill="{colour}"><title>{html.escape(phase.name)}: '
            f"{phase.start:.1f}s - {phase.end:.1f}s</title></rect>"
        )
    for frac in (0, 0.25, 0.5, 0.75, 1):
        yy = top + plot_h * (1 - frac)
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{yy:.1f}" y2="{yy:.1f}" class="grid"/>')
        parts.append(
            f'<text x="{left - 6}" y="{yy + 4:.1f}" class="axis" text-anchor="end">{_fmt(y_max * frac)}</text>'
        )
    ticks = 8
    for i in range(ticks + 1):
        t = t_end * i / ticks
        parts.append(f'<text x="{x(t):.1f}" y="{height - 8}" class="axis" text-anchor="middle">{t:.0f}s</text>')
    for series in chart.series:
        if not series.points:
            continue
        coords: list[str] = []
        previous: Point | None = None
        for t, v in sorted(series.points):
            if series.step and previous is not None:
                coords.append(f"{x(t):.1f},{y(previous[1]):.1f}")
            coords.append(f"{x(t):.1f},{y(v):.1f}")
            previous = (t, v)
        if series.step and previous is not None:
            coords.append(f"{x(t_end):.1f},{y(previous[1]):.1f}")
        parts.append(
            f'<polyline points="{" ".join(coords)}" fill="none" stroke="{series.colour}" stroke-width="1.8">'
            f"<title>{html.escape(series.name)}</title></polyline>"
        )
    for t, what in list(events)[:MAX_EVENT_MARKS]:
        parts.append(
            f'<line x1="{x(t):.1f}" x2="{x(t):.1f}" y1="{top}" y2="{top + plot_h}" class="event">'
            f"<title>{t:.1f}s: {html.escape(what)}</title></line>"
        )
    legend_x = left + plot_w
    for series in reversed(chart.series):
        label = html.escape(series.name)
        legend_x -= 14 + 7 * len(series.name)
        parts.append(f'<rect x="{legend_x}" y="8" width="10" height="10" fill="{series.colour}"/>')
        parts.append(f'<text x="{legend_x + 14}" y="17" class="legend">{label}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def render_phase_strip(phases: Sequence[PhaseSpan], t_end: float, width: int = 960) -> str:
    left, plot_w = 64, width - 64 - 16
    t_end = max(t_end, 1e-9)
    parts = [f'<svg viewBox="0 0 {width} 46" width="100%" role="img" aria-label="phases">']
    for i, phase in enumerate(phases):
        x0 = left + plot_w * phase.start / t_end
        w = max(plot_w * (phase.end - phase.start) / t_end, 1.0)
        colour = "#f28b82" if phase.status != "ok" else PHASE_COLOURS[i % len(PHASE_COLOURS)]
        parts.append(
            f'<rect x="{x0:.1f}" y="4" width="{w:.1f}" height="24" fill="{colour}" stroke="#9aa0a6" stroke-width="0.5">'
            f"<title>{html.escape(phase.name)} ({phase.end - phase.start:.2f}s)</title></rect>"
        )
        if w > 40:
            parts.append(f'<text x="{x0 + 4:.1f}" y="20" class="phase">{html.escape(phase.name[: int(w / 7)])}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


CSS = """
body{font-family:-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1000px;color:#202124}
h1{font-size:22px;margin:0 0 4px} .sub{color:#5f6368;margin-bottom:16px}
.verdict{display:inline-block;padding:6px 14px;border-radius:16px;font-weight:600;font-size:15px}
.ok{background:#e6f4ea;color:#137333} .bad{background:#fce8e6;color:#a50e0e} .warn{background:#fef7e0;color:#8a6100}
.cards{display:grid;grid-template-columns:repeat(4,1fr);gap:10px;margin:16px 0}
.card{border:1px solid #dadce0;border-radius:8px;padding:10px 12px} .card .v{font-size:22px;font-weight:600}
.card .k{color:#5f6368;font-size:12px;text-transform:uppercase;letter-spacing:.04em}
svg text.title{font-size:13px;font-weight:600;fill:#202124} svg text.axis{font-size:10px;fill:#5f6368}
svg text.legend{font-size:11px;fill:#3c4043} svg text.phase{font-size:11px;fill:#202124}
svg line.grid{stroke:#e8eaed;stroke-width:1} svg line.event{stroke:#d93025;stroke-width:1.2;stroke-dasharray:4 3}
table{border-collapse:collapse;width:100%;font-size:13px;margin-top:8px} td,th{border-bottom:1px solid #e8eaed;padding:4px 8px;text-align:left}
th{color:#5f6368;font-weight:500} section{margin-top:22px} details{margin-top:16px}
pre{background:#f8f9fa;padding:10px;overflow:auto;font-size:12px}
.bar{background:#e8eaed;border-radius:3px;height:10px;width:160px;display:inline-block;vertical-align:middle}
.bar span{display:block;height:10px;border-radius:3px;background:#1a73e8} .bar span.bad{background:#d93025}
"""


def _bar(used: float, limit: float | None) -> str:
    """A small bar of `used` against `limit` (red past it), and the share as text."""
    if not limit:
        return ""
    share = used / limit
    width = max(1.0, min(100.0, share * 100))
    tone = ' class="bad"' if share > 1 else ""
    return f'<span class="bar"><span{tone} style="width:{width:.1f}%"></span></span> {share * 100:.1f}%'


def render_function_table(invocations: dict[str, dict[str, Any]]) -> str:
    """Each Lambda function's longest run against its timeout and largest result against a state's limit."""
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{use['invocations']}</td>"
        f"<td>{use['longest_seconds']:.2f} s of {use['timeout_seconds'] or 0:.0f} s</td>"
        f"<td>{_bar(use['longest_seconds'], use['timeout_seconds'])}</td>"
        f"<td>{use['largest_result_bytes']:,} B</td><td>{_bar(use['largest_result_bytes'], use['result_limit_bytes'])}</td></tr>"
        for name, use in invocations.items()
    )
    return (
        "<section><h3>Lambda functions, against Lambda's limits</h3><table><tr><th>function</th><th>runs</th>"
        "<th>longest run</th><th>of its timeout</th><th>largest result</th><th>of a state's 256 KiB</th></tr>"
        f"{rows}</table></section>"
    )


def render_report(
    summary: dict[str, Any],
    charts: Sequence[Chart],
    phases: Sequence[PhaseSpan],
    cards: Sequence[tuple[str, str, str]],
    t_end: float,
    title: str = "Migration rehearsal",
    events: Sequence[tuple[float, str]] = (),
) -> str:
    """`cards` are (label, value, tone) with tone ok / bad / warn / ''; `events` are marked on every chart and
    listed under the phases."""
    outcome = str(summary.get("outcome", "unknown"))
    tone = "ok" if outcome == "migrated" else ("warn" if outcome == "rolled_back" else "bad")
    fault = summary.get("fault") or "none"
    card_html = "".join(
        f'<div class="card"><div class="k">{html.escape(k)}</div><div class="v {t}">{html.escape(v)}</div></div>'
        for k, v, t in cards
    )
    phase_rows = "".join(
        f"<tr><td>{html.escape(p.name)}</td><td>{p.start:.2f}</td><td>{p.end - p.start:.2f}</td>"
        f"<td>{html.escape(p.status)}</td></tr>"
        for p in phases
    )
    chart_html = "".join(f"<section>{render_chart(c, phases, t_end, events)}</section>" for c in charts)
    event_rows = "".join(f"<tr><td>{t:.2f}</td><td>{html.escape(what)}</td></tr>" for t, what in events)
    events_html = (
        f"<section><h3>Events</h3><table><tr><th>at (s)</th><th>what</th></tr>{event_rows}</table></section>"
        if events
        else ""
    )
    functions = render_function_table(summary["lambda_invocations"]) if summary.get("lambda_invocations") else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<div class="sub">fault injected: <b>{html.escape(str(fault))}</b> &middot; total {t_end:.1f}s</div>
<span class="verdict {tone}">{html.escape(outcome.replace("_", " "))}</span>
<div class="cards">{card_html}</div>
<section>{render_phase_strip(phases, t_end)}</section>
{chart_html}
<section><h3>Phases</h3><table><tr><th>phase</th><th>start (s)</th><th>duration (s)</th><th>status</th></tr>
{phase_rows}</table></section>
{events_html}
{functions}
<details><summary>summary.json</summary><pre>{html.escape(json.dumps(summary, indent=2, default=str))}</pre></details>
</body></html>
"""
