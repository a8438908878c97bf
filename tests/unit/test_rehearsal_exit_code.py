"""The rehearsal command fails (exit 1) when its final row compare found differences or its writers saw
failed transactions, and its report shows the compare (once: exit 0, and no such card)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import rehearsal.__main__ as main_mod
from rehearsal.timeline import Timeline

# One function's use in a summary's lambda_invocations, within its limits
_LAMBDA_USE = {
    "longest_seconds": 0.2,
    "timeout_seconds": 900.0,
    "largest_result_bytes": 77,
    "result_limit_bytes": 262144,
}


def _summary(**over: Any) -> dict[str, Any]:
    s: dict[str, Any] = {
        "outcome": "migrated",
        "fault": None,
        "fault_injected": False,
        "error": None,
        "cause": "",
        "phase_seconds": {"cutover": 1.0},
        "total_seconds": 10.0,
        "rows_in_source": 20000,
        "engine": "logical",
        "rows_copied": 20000,
        "lag_seconds": {"p50": 0.0, "p99": 0.0, "max": 0.0},
        "lag_bytes": {"p50": 0.0, "p99": 0.0, "max": 0.0},
        "rows_validated": 20000,
        "persistent_differences": 0,
        "longest_write_pause_ms": 10.0,
        "longest_write_pause_during": "cutover",
        "cutover_pause_ms": 5.0,
        "committed_transactions": 1000,
        "failed_transactions": 0,
        "failed_outside_outage": 0,
        "failed_transaction_errors": [],
        "rows_lost": 0,
        "writer_on": "target",
        "final_rows_compared": 20000,
        "final_differences": 0,
        "reverse_replication_retired": True,
        "reverse_replication_left": [],
        "source_whole_as_of_lsn": "0/1",
        "_latencies": [(1.0, 0.01)],
    }
    s.update(over)
    return s


def _run_main(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, summary: dict[str, Any]) -> int:
    import time

    monkeypatch.setattr(main_mod.Rehearsal, "run_with_timeline", lambda self: (summary, Timeline(time.monotonic())))
    fault = ["--fault", summary["fault"]] if summary["fault"] else []
    return main_mod.main(["--rows", "20000", "--out", str(tmp_path), *fault])


def test_sanity_clean_summary_exits_0(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert _run_main(monkeypatch, tmp_path, _summary()) == 0


def test_final_row_differences_make_the_rehearsal_fail(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The old source and the target differ in 3 rows after a "migrated" run: data is wrong.
    assert _run_main(monkeypatch, tmp_path, _summary(final_differences=3)) != 0


def test_failed_transactions_make_the_rehearsal_fail(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Writers saw failed transactions (e.g. duplicate keys after a missed sequence sync): not zero-downtime.
    assert _run_main(monkeypatch, tmp_path, _summary(failed_transactions=250, failed_outside_outage=250)) != 0


def test_failures_only_while_a_crashed_server_was_down_pass_and_others_fail(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given a crash fault, whose server was down from 6.6 s to 9.9 s: transactions in flight then failed
    crash = {"fault": "source-crash", "fault_injected": True, "outage": [6.6, 9.9], "failed_transactions": 40}
    # Then failures inside the outage pass, and one outside it fails the run
    assert _run_main(monkeypatch, tmp_path / "inside", _summary(**crash, failed_outside_outage=0)) == 0
    assert _run_main(monkeypatch, tmp_path / "outside", _summary(**crash, failed_outside_outage=1)) != 0


def test_a_fault_that_missed_its_moment_fails_the_rehearsal_and_says_why(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a copy-crash run whose copy committed no rows in time, so the crash never happened
    missed = "TimeoutError: the initial copy committed no rows to the target within 60s"
    fault = {"fault": "target-crash-copy", "outage": None}
    # When the rehearsal ends, migrated and clean otherwise
    code = _run_main(monkeypatch, tmp_path / "missed", _summary(**fault, fault_injected=False, fault_missed=missed))
    # Then it fails and says why; the same run with its crash injected passes
    assert code == 1
    assert f"FAULT MISSED           {missed}" in capsys.readouterr().err
    assert _run_main(monkeypatch, tmp_path / "hit", _summary(**fault, fault_injected=True, fault_missed=None)) == 0


def test_a_late_read_shift_step_that_moved_reads_fails_the_alarm_rule_reads_rehearsal(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given an alarm-rule-reads run that rolled back, clean otherwise
    rolled_back = {"fault": "alarm-rule-reads", "fault_injected": True, "outcome": "rolled_back"}
    rule = {"stopped": {"status": "FAILED"}, "rule": {"started": "arn:x:rollback-1"}}
    refused = {**rule, "late_read_shift": "ReadShiftRefused: a rollback of 'shop' started at ..."}
    moved = {**rule, "late_read_shift": "moved reads to 50%"}
    # Then a refused late step with every read on the source passes
    assert (
        _run_main(monkeypatch, tmp_path / "a", _summary(**rolled_back, alarm_rule=refused, reads_on_target_percent=0))
        == 0
    )
    # And a late step that moved reads, or reads left on the target, fails it
    assert (
        _run_main(monkeypatch, tmp_path / "b", _summary(**rolled_back, alarm_rule=moved, reads_on_target_percent=50))
        == 1
    )
    assert (
        _run_main(monkeypatch, tmp_path / "c", _summary(**rolled_back, alarm_rule=refused, reads_on_target_percent=10))
        == 1
    )


def test_report_shows_the_final_row_compare(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _run_main(monkeypatch, tmp_path, _summary(final_differences=3))
    page = (tmp_path / "report.html").read_text()
    assert "final row compare" in page.lower() and "3 differences" in page


def test_a_broken_lambda_limit_makes_the_rehearsal_fail_and_is_shown(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a migrated run in which one function ran past its timeout (AWS would have stopped it)
    broken = ["Cutover ran 912.0s, longer than its timeout of 900s"]
    invocations = {
        "Cutover": {
            "invocations": 1,
            "longest_seconds": 912.0,
            "timeout_seconds": 900.0,
            "largest_result_bytes": 0,
            "result_limit_bytes": 262144,
        }
    }
    summary = _summary(lambda_limits_broken=broken, lambda_invocations=invocations)
    # When the rehearsal ends
    code = _run_main(monkeypatch, tmp_path, summary)
    # Then it fails, names the function on the terminal and shows the card in the report
    assert code == 1
    assert "LAMBDA LIMIT BROKEN    Cutover ran 912.0s" in capsys.readouterr().err
    assert "1 broken" in (tmp_path / "report.html").read_text()


def test_kept_lambda_limits_leave_a_clean_run_passing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert _run_main(monkeypatch, tmp_path, _summary(lambda_limits_broken=[], lambda_invocations={})) == 0


def test_handler_logs_go_to_the_log_file_not_the_terminal(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a rehearsal whose handlers log through their Powertools logger (created at import, on the terminal)
    from lambdas.handlers.runtime import logger

    def run(self: Any) -> tuple[dict[str, Any], Timeline]:
        import time

        logger.info("health gate", extra={"healthy": True})
        return _summary(), Timeline(time.monotonic())

    monkeypatch.setattr(main_mod.Rehearsal, "run_with_timeline", run)
    # When it runs
    code = main_mod.main(["--rows", "20000", "--out", str(tmp_path)])
    # Then the log line is in handlers.log and not on the terminal, and the logger writes where it did before
    assert code == 0
    assert '"message":"health gate"' in (tmp_path / "handlers.log").read_text()
    assert "health gate" not in capsys.readouterr().out
    logger.info("after the rehearsal")
    assert "after the rehearsal" not in (tmp_path / "handlers.log").read_text()


def test_a_crash_inside_a_validation_chunk_must_have_failed_a_chunks_task(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given target-crash-validate runs that migrated cleanly, the server down for a while
    migrated = {"fault": "target-crash-validate", "fault_injected": True, "outage": [4.5, 7.8]}

    def chunk_runs(errors: dict[str, int]) -> dict[str, Any]:
        return {"ValidateChunk": {**_LAMBDA_USE, "invocations": 14, "errors": errors}}

    # Then one in which a chunk's task failed on the crash and was retried passes
    failed_once = chunk_runs({"OperationalError": 3, "DatabaseUnreachable": 5})
    assert _run_main(monkeypatch, tmp_path / "a", _summary(**migrated, lambda_invocations=failed_once)) == 0
    # And one in which no chunk's task failed fails it: the crash missed the chunks it names
    assert _run_main(monkeypatch, tmp_path / "b", _summary(**migrated, lambda_invocations=chunk_runs({}))) == 1


def test_the_terminal_says_how_often_a_function_failed_and_why(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a run in which a chunk's task failed three times, and the cutover's never
    uses = {
        "ValidateChunk": {**_LAMBDA_USE, "invocations": 9, "errors": {"OperationalError": 2, "DatabaseUnreachable": 1}},
        "Cutover": {**_LAMBDA_USE, "invocations": 1, "errors": {}},
    }
    _run_main(monkeypatch, tmp_path, _summary(lambda_invocations=uses))
    lines = {line.split()[0]: line for line in capsys.readouterr().err.splitlines() if line.startswith("  ")}
    # Then its line names the failures by error, and the other line none
    assert lines["ValidateChunk"].endswith("; failed 3 time(s) (OperationalError 2, DatabaseUnreachable 1)")
    assert "failed" not in lines["Cutover"]


def test_a_router_restart_before_the_switch_must_show_writers_refused_by_the_fence(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given router-restart-fence runs that migrated cleanly, pgbouncer down for a while
    migrated = {"fault": "router-restart-fence", "fault_injected": True, "outage": [12.5, 15.5]}
    # Then one in which writers reconnecting met the old database's fence (refused read-only) passes
    assert _run_main(monkeypatch, tmp_path / "a", _summary(**migrated, failed_read_only=515)) == 0
    # And one in which none did fails it: the restart came too late to show what the fault names
    assert _run_main(monkeypatch, tmp_path / "b", _summary(**migrated, failed_read_only=0)) == 1
