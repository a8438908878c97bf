"""`python -m rehearsal`: rehearse a whole migration locally (see rehearsal/run.py), then report.

    python -m rehearsal --rows 1000000 --out out/rehearsal [--fault F]   (--help names every fault)

Writes OUT/summary.json and OUT/report.html (open it in a browser; it needs no network).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from lambdas.core.config import MigrationFileError
from rehearsal.faults import CRASHES, FAULT_HELP, FAULTS, IN_A_CHUNK
from rehearsal.report import Chart, PhaseSpan, Series, render_report
from rehearsal.run import ENGINES, Rehearsal
from rehearsal.servers import ServerError
from rehearsal.timeline import say

# What each fault ends in: a rollback by itself, but for a reverse replication broken after the cutover,
# which stops the migration with the writer on the target (nothing to roll back for; a rollback would be refused)
EXPECTED_OUTCOME = {
    "reverse-ddl": "reverse_replication_broken",
    "new-table": "migrated",
    "retry": "migrated",
    "source-crash": "migrated",  # a crash and restart is weathered: the replication resumes from its slot
    "target-crash": "migrated",
    "source-crash-after": "migrated",
    "source-crash-fence": "migrated",  # the cutover's task is retried, and resumes from its records
    "target-crash-fence": "migrated",
    "target-crash-copy": "migrated",  # the copy's task is retried
    "source-crash-validate": "migrated",  # the chunk's task is retried, comparing the chunk anew
    "target-crash-validate": "migrated",
    "router-crash-fence": "migrated",  # the cutover waits in its task until the router answers again
    "router-restart-fence": "migrated",  # the same; meanwhile the source's fence refuses the writers
}
# Any other fault (alarm-rule included: its rollback execution, after the one the rule stopped) must roll back


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rehearsal", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in the sample source (default 1M)")
    parser.add_argument(
        "--out", type=Path, default=Path("out/rehearsal"), help="folder for summary.json and report.html"
    )
    parser.add_argument(
        "--fault",
        choices=FAULTS,
        default=None,
        help="inject a fault: " + "; ".join(f"{k}: {v}" for k, v in FAULT_HELP.items()),
    )
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="logical",
        help="logical: native logical replication; debezium: Debezium -> local broker -> applier (needs Java 17)",
    )
    parser.add_argument("--clients", type=int, default=8, help="writer clients through pgbouncer (default 8)")
    parser.add_argument("--rate", type=float, default=60.0, help="transactions per second per client (default 60)")
    parser.add_argument(
        "--migration", type=Path, default=None, help="migration file (default migrations/local.yaml; DSNs are replaced)"
    )
    parser.add_argument(
        "--rollback-window-seconds",
        type=int,
        default=2,
        help="the rollback window after the cutover, in place of the file's rollback_window_hours (default 2)",
    )
    args = parser.parse_args(argv)
    if args.rows < 1000:
        parser.error("--rows must be at least 1000")
    if args.rollback_window_seconds < 0:
        parser.error("--rollback-window-seconds must be 0 or more")
    return args


def _buckets(
    latencies: list[tuple[float, float]],
    failed_starts: list[float] | tuple[float, ...] = (),
) -> tuple[list[tuple[float, float]], list[tuple[float, float]], list[tuple[float, float]]]:
    """Per second: committed transactions (attempts less failed ones), p99 and max latency (ms) of every attempt."""
    by_second: dict[int, list[float]] = {}
    for start, seconds in latencies:
        by_second.setdefault(int(start), []).append(seconds * 1000)
    failed_by_second: dict[int, int] = {}
    for start in failed_starts:
        failed_by_second[int(start)] = failed_by_second.get(int(start), 0) + 1
    tps, p99, peak = [], [], []
    for second in sorted(by_second):
        values = sorted(by_second[second])
        tps.append((second + 0.5, float(len(values) - failed_by_second.get(second, 0))))
        p99.append((second + 0.5, values[min(len(values) - 1, int(len(values) * 0.99))]))
        peak.append((second + 0.5, values[-1]))
    return tps, p99, peak


def write_report(summary: dict[str, Any], timeline: Any, out: Path) -> Path:
    latencies = summary.pop("_latencies")
    tps, p99, peak = _buckets(latencies, summary.pop("_failed_starts", []))
    charts = [
        Chart("Replication lag", "seconds", [Series("lag (s)", timeline.lag_seconds, "#d93025")]),
        Chart("Replication lag", "bytes", [Series("lag (bytes)", timeline.lag_bytes, "#e37400")]),
        Chart(
            "Traffic on the target",
            "%",
            [
                Series("reads on target", timeline.reads_on_target, "#1a73e8", step=True),
                Series("writer on target", timeline.writer_on_target, "#188038", step=True),
            ],
            y_max=100,
        ),
        Chart("Workload throughput", "committed transactions / s", [Series("tps", tps, "#1a73e8")]),
        Chart("Write latency", "ms", [Series("p99", p99, "#9334e6"), Series("max", peak, "#d93025")]),
    ]
    phases = [PhaseSpan(name, start, end, status) for name, start, end, status in timeline.phases]
    lost = summary["rows_lost"]
    cards = [
        ("outcome", summary["outcome"].replace("_", " "), "ok" if summary["outcome"] == "migrated" else "warn"),
        ("rows lost", str(lost), "ok" if lost == 0 else "bad"),
        (
            "failed transactions",
            str(summary["failed_transactions"])
            + (f" ({summary['failed_outside_outage']} outside the outage)" if summary.get("outage") else ""),
            "ok" if summary["failed_outside_outage"] == 0 else "bad",
        ),
        ("longest write pause", f"{summary['longest_write_pause_ms']:.0f} ms", ""),
        ("rows validated", f"{summary['rows_validated'] or 0:,}", ""),
        (
            "persistent differences",
            str(summary["persistent_differences"]),
            "ok" if not summary["persistent_differences"] else "bad",
        ),
        ("lag p99", f"{summary['lag_seconds']['p99']:.2f} s", ""),
        ("total", f"{summary['total_seconds']:.0f} s", ""),
    ]
    if summary["final_differences"] is not None:
        differences = summary["final_differences"]
        cards.append(
            (
                "final row compare",
                f"{differences} differences in {summary['final_rows_compared']:,} rows",
                "ok" if differences == 0 else "bad",
            )
        )
    if "lambda_limits_broken" in summary:
        broken = summary["lambda_limits_broken"]
        cards.append(
            (
                "Lambda limits",
                "kept" if not broken else f"{len(broken)} broken",
                "ok" if not broken else "bad",
            )
        )
    if summary["outcome"] == "migrated" or summary.get("reverse_mended") is not None:
        retired = summary["reverse_replication_retired"]
        mended = "mended, " if summary.get("reverse_mended") else ""
        cards.append(
            ("reverse replication", f"{mended}retired" if retired else "not retired", "ok" if retired else "bad")
        )
    if summary.get("abandoned"):
        clean = _abandoned_cleanly(summary)
        cards.append(("rolled back, abandoned", "nothing left" if clean else "not clean", "ok" if clean else "bad"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.html"
    events = sorted((round(t, 3), what) for t, what in timeline.events)
    path.write_text(render_report(summary, charts, phases, cards, summary["total_seconds"], events=events))
    return path


def print_summary(summary: dict[str, Any], out: Path) -> None:
    say("")
    say(f"outcome                {summary['outcome']}" + (f" (fault: {summary['fault']})" if summary["fault"] else ""))
    say(f"engine                 {summary['engine']}")
    if summary.get("fault_missed"):
        say(f"FAULT MISSED           {summary['fault_missed']} (the run proves nothing about this fault)")
    if summary["outcome"] != "migrated":
        say(f"why                    {summary['error']}: {summary['cause'][:300]}")
    if summary.get("rollback_kind"):
        say(f"rollback               {summary['rollback_kind'].replace('_', ' ')}")
    if summary.get("alarm_rule"):
        rule = summary["alarm_rule"]["rule"] or {}
        say(
            f"alarm rule             stopped the execution ({summary['alarm_rule']['stopped']['status']}) and started "
            f"{(rule.get('started') or 'nothing').rsplit(':', 1)[-1]}"
            + (f"; {rule['skipped']}" if rule.get("skipped") else "")
        )
        if summary["alarm_rule"].get("late_read_shift"):
            say(f"late read shift step   {summary['alarm_rule']['late_read_shift'][:200]}")
            say(f"reads on the target    {summary.get('reads_on_target_percent')}% at the end")
    for name, seconds in summary["phase_seconds"].items():
        say(f"  {name:<20} {seconds:8.2f} s")
    say(f"rows copied            {summary['rows_copied']}")
    lag = summary["lag_seconds"]
    say(f"lag (s)                p50 {lag['p50']:.3f}  p99 {lag['p99']:.3f}  max {lag['max']:.3f}")
    say(
        f"rows validated         {summary['rows_validated']}; persistent differences {summary['persistent_differences']}"
    )
    say(
        f"longest write pause    {summary['longest_write_pause_ms']:.1f} ms during {summary['longest_write_pause_during']}"
        f" (the cutover's own fence-to-release: {summary['cutover_pause_ms']} ms)"
    )
    say(
        f"transactions           {summary['committed_transactions']:,} committed, {summary['failed_transactions']} failed"
        + (f" ({summary['failed_read_only']} refused read-only)" if summary.get("failed_read_only") else "")
        + (
            f" ({summary['failed_outside_outage']} outside the crashed server's outage,"
            f" {summary['outage'][0]:.1f}-{summary['outage'][1]:.1f} s)"
            if summary.get("outage")
            else ""
        )
    )
    say(
        f"rows lost              {summary['rows_lost']} (committed inserts missing on the writer, {summary['writer_on']})"
    )
    if "updates_lost" in summary:
        say(
            f"updates/deletes lost   {summary['updates_lost']} order updates, {summary['deletes_lost']} event deletes,"
            f" {summary.get('child_rows_lost', 0)} order_items/events rows of new orders"
            " (committed, not shown by the writer's database)"
        )
    if summary.get("sequences_behind"):
        say(f"sequences behind       {'; '.join(summary['sequences_behind'])}")
    if summary.get("views_refreshed") or summary.get("views_stale"):
        say(
            f"materialized views     refreshed on the target before reads moved: {', '.join(summary['views_refreshed'])}"
            + (f"; STALE on the target: {'; '.join(summary['views_stale'])}" if summary.get("views_stale") else "")
        )
    if summary["final_differences"] is not None:
        say(
            f"final row compare      {summary['final_rows_compared']:,} rows, {summary['final_differences']} differences"
        )
    if summary.get("tables_added"):
        say(f"tables added           after the start, by the copy loop: {', '.join(summary['tables_added'])}")
    if summary.get("abandoned"):
        abandon = summary["abandoned"]
        say(f"rolled back first      {abandon['rolled_back_because'][:200]}")
        say(
            f"abandon                {abandon['status']}"
            + (f" ({abandon['error']}: {(abandon['cause'] or '')[:200]})" if abandon["error"] else "")
            + f"; left of either replication: {', '.join(abandon['left']) or 'nothing'}"
        )
    if summary.get("rollback_problems"):
        say(f"rollback would fail    {'; '.join(summary['rollback_problems'])[:400]}")
    if summary["outcome"] == "migrated" or summary.get("reverse_mended") is not None:
        retired = summary["reverse_replication_retired"]
        when = "once mended, after the stop" if summary.get("reverse_mended") else "after the rollback window"
        say(
            "reverse replication    "
            + (
                f"retired {when} (the source is whole up to {summary['source_whole_as_of_lsn']})"
                if retired
                else f"NOT retired (still there: {', '.join(summary['reverse_replication_left']) or 'see the cause'})"
            )
        )
    if summary.get("lambda_invocations"):
        say("Lambda functions       runs, longest run against the timeout, largest result against a state's limit")
    for function, use in summary.get("lambda_invocations", {}).items():
        say(
            f"  {function:<20} {use['invocations']:4d} run(s), longest {use['longest_seconds']:7.1f} s"
            f" of {use['timeout_seconds']:.0f} s, largest result {use['largest_result_bytes']:,} of"
            f" {use['result_limit_bytes']:,} bytes{_failures(use.get('errors') or {})}"
        )
    for broken in summary.get("lambda_limits_broken", []):
        say(f"LAMBDA LIMIT BROKEN    {broken} (AWS would have failed this step)")
    say(f"report                 {out / 'report.html'}")


@contextlib.contextmanager
def _handler_logs_to(stream: TextIO) -> Iterator[None]:
    """The handlers' Powertools logger writes to the stream it was created with (the terminal, at import):
    point it at `stream` too while the rehearsal runs (metrics are printed, so redirect_stdout takes them)."""
    from lambdas.handlers.runtime import logger

    handler = logger.registered_handler
    if not isinstance(handler, logging.StreamHandler):
        yield
        return
    previous = handler.setStream(stream)
    try:
        yield
    finally:
        handler.setStream(previous)


def _failures(errors: dict[str, int]) -> str:
    """`; failed 3 times (OperationalError 2, DatabaseUnreachable 1)`, or nothing."""
    if not errors:
        return ""
    listed = ", ".join(f"{error} {count}" for error, count in errors.items())
    return f"; failed {sum(errors.values())} time(s) ({listed})"


def _abandoned_cleanly(summary: dict[str, Any]) -> bool:
    abandon = summary.get("abandoned") or {}
    return abandon.get("status") == "SUCCEEDED" and abandon.get("left") == []


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rehearsal = Rehearsal(
        args.rows,
        args.fault,
        args.out,
        clients=args.clients,
        rate=args.rate,
        rollback_window_seconds=args.rollback_window_seconds,
        engine=args.engine,
    )
    if args.migration is not None:
        rehearsal.migration_file = args.migration
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "handlers.log"
    say(f"handler logs and metrics (Powertools JSON): {log_path}")
    try:
        # Handlers log to stdout as on Lambda; here that goes to a file, the terminal shows progress.
        with log_path.open("w") as log, contextlib.redirect_stdout(log), _handler_logs_to(log):
            summary, timeline = rehearsal.run_with_timeline()
    except (MigrationFileError, ServerError) as exc:
        say(f"error: {exc}")
        return 2
    write_report(summary, timeline, args.out)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary, args.out)
    expected = EXPECTED_OUTCOME.get(args.fault, "rolled_back") if args.fault else "migrated"
    # Fault reverse-ddl: the stop is expected; the mend must then bring the source level with the target
    mended = args.fault != "reverse-ddl" or (
        summary["reverse_replication_retired"] and summary["final_differences"] == 0
    )
    # Fault new-table: the table created after the start was added, and the final compare covered it
    added = args.fault != "new-table" or bool(summary.get("tables_added"))
    # Fault alarm-rule-reads: the stopped execution's late step was refused, and every read is on the source
    late_refused = args.fault != "alarm-rule-reads" or (
        str((summary.get("alarm_rule") or {}).get("late_read_shift")).startswith("ReadShiftRefused")
        and summary.get("reads_on_target_percent") == 0
    )
    # Faults crashing a server inside a validation chunk: a chunk's task failed (the crash reached it mid-chunk)
    # and was retried; the validation it then passed is the outcome's
    crash = CRASHES.get(args.fault or "")
    chunk_errors = ((summary.get("lambda_invocations") or {}).get("ValidateChunk") or {}).get("errors")
    chunk_failed = crash is None or crash.moment != IN_A_CHUNK or bool(chunk_errors)
    # Fault router-restart-fence: writers reconnected through the restarted router before the switch, and the old
    # database's fence refused them (else the run did not show what the fault names)
    fence_met = args.fault != "router-restart-fence" or bool(summary.get("failed_read_only"))
    # Fault retry: the abandon succeeded and left nothing of either replication before the second start
    abandoned = args.fault != "retry" or _abandoned_cleanly(summary)
    passed = (
        summary["outcome"] == expected
        and (summary["fault_injected"] or not args.fault)  # a fault that missed its moment proves nothing
        and mended
        and added
        and late_refused
        and chunk_failed
        and fence_met
        and abandoned
        and summary["rows_lost"] == 0
        and summary["failed_outside_outage"] == 0  # every failure, but while a crash fault had its server down
        and not summary.get("sequences_behind")
        and not summary.get("updates_lost")
        and not summary.get("deletes_lost")
        and not summary.get("child_rows_lost")
        and not summary.get("views_stale")
        and not summary["final_differences"]  # None when not migrated: nothing compared
        and not summary.get("lambda_limits_broken")  # a run AWS would not have allowed proves nothing
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
