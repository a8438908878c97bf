"""The README's main job at small scale: the real state machine, handlers, servers, pgbouncer and writers.

Each run is the command a user types; the assertions read the summary.json it writes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


RUN_MARK = "ZDM_E2E_RUN"  # in the rehearsal's environment, so inherited by every process it starts


def rehearse(out: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, "-m", "rehearsal", "--rows", "20000", "--out", str(out), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, RUN_MARK: str(out)},
    )
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    return proc, summary


def short_bakes(folder: Path, *, post_cutover: bool = True) -> list[str]:
    """`--migration` for the local migration with 2-second bakes: the read shift's (and, with `post_cutover`, the
    bake after the cutover). The suite's time: a fault's test checks what the fault does, and every gate still runs
    after its wait; the happy path keeps the shipped file's bakes."""
    text = (ROOT / "migrations" / "local.yaml").read_text()
    edits = {"\n  bake_seconds: 5\n": "\n  bake_seconds: 2\n"}
    if post_cutover:
        edits["\n  post_cutover_bake_seconds: 5\n"] = "\n  post_cutover_bake_seconds: 2\n"
    for shipped, short in edits.items():
        assert text.count(shipped) == 1, f"migrations/local.yaml no longer has {shipped.strip()!r}"
        text = text.replace(shipped, short)
    folder.mkdir(parents=True, exist_ok=True)
    migration = folder / "local-short-bakes.yaml"
    migration.write_text(text)
    return ["--migration", str(migration)]


def processes_started_by(out: Path) -> list[str]:
    """Command lines of live processes the rehearsal writing to `out` started (they inherit RUN_MARK):
    other processes on the machine, another test's included, are not counted."""
    mark = f"{RUN_MARK}={out}".encode()
    found: list[str] = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if mark in (proc / "environ").read_bytes().split(b"\0"):
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip())
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def test_happy_path_migrates_with_no_failed_transaction_no_lost_row_and_no_difference(tmp_path: Path) -> None:
    # When the whole migration is rehearsed under a live write workload
    proc, summary = rehearse(tmp_path)
    # Then it migrated: the writer is on the target and nothing was lost or changed
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary["outcome"] == "migrated"
    assert summary["writer_on"] == "target"
    assert summary["failed_transactions"] == 0
    assert summary["rows_lost"] == 0
    assert summary["persistent_differences"] == 0
    assert summary["rows_validated"] >= 20_000
    assert summary["final_differences"] == 0 and summary["final_rows_compared"] >= 20_000
    assert summary["committed_transactions"] > 100
    assert {
        "preflight",
        "initial copy",
        "validation",
        "read shift",
        "cutover",
        "finalize",
        "rollback window",
        "retire reverse",
    } <= set(summary["phase_seconds"])
    # And after the (shortened) rollback window the reverse replication was retired, the source whole
    assert summary["phase_seconds"]["rollback window"] >= 1.5  # 2 s by default, from event timestamps
    assert summary["reverse_replication_retired"] is True and summary["reverse_replication_left"] == []
    assert summary["source_whole_as_of_lsn"]
    assert summary["cutover_pause_ms"] is not None
    # And the report shows the charts over time, the terminal showed progress
    report = (tmp_path / "report.html").read_text()
    for chart in ("Replication lag", "Traffic on the target", "Write latency", "Workload throughput"):
        assert chart in report
    assert "phase: cutover" in proc.stderr and "rows lost" in proc.stderr
    assert "reverse replication    retired after the rollback window" in proc.stderr


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("gate", "HealthGateTripped"),
        # killed mid-copy the copy fails; killed between tasks the next connection does
        ("kill-target", "CopyFailed|DatabaseUnreachable"),
        ("cutover", "fault injected: cutover failed right after the fence"),
        # the status names the drift, and the read shift's gate fails on it
        ("ddl", "HealthGateTripped.*public.orders.gift_note: missing on the target"),
    ],
)
def test_injected_fault_ends_in_a_clean_rollback_with_nothing_lost(tmp_path: Path, fault: str, reason: str) -> None:
    # When a fault is injected into the rehearsal
    proc, summary = rehearse(tmp_path / "out", "--fault", fault, *short_bakes(tmp_path))
    # Then the state machine rolled back by itself, and the source holds every committed write
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary["fault"] == fault and summary["fault_injected"] is True
    assert summary["outcome"] == "rolled_back"
    assert summary["error"] == "RolledBack" and re.search(reason, summary["cause"])
    assert summary["writer_on"] == "source"
    assert summary["rows_lost"] == 0
    assert summary["failed_transactions"] == 0
    assert "rollback" in summary["phase_seconds"]
    assert summary["reverse_replication_retired"] is False and "rollback window" not in summary["phase_seconds"]
    assert "rolled back" in (tmp_path / "out" / "report.html").read_text()


def test_an_alarm_during_the_cutover_rolls_back_through_the_alarm_rule_after_the_cutover_lambda_ends(
    tmp_path: Path,
) -> None:
    # When the composite alarm enters ALARM right after the cutover's fence, and its state change reaches the
    # alarm rule's Rollback function (as EventBridge delivers it) while the Cutover function still runs
    proc, summary = rehearse(tmp_path / "out", "--fault", "alarm-rule", *short_bakes(tmp_path))
    # Then the rule stopped the execution and started the rollback execution
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary["fault_injected"] is True
    assert summary["alarm_rule"]["stopped"]["status"] == "ABORTED"
    assert summary["alarm_rule"]["rule"]["started"].rsplit(":", 1)[-1].startswith("rollback-")
    # And that one waited for the cutover still running in its Lambda, then rolled it back over the reverse
    # replication: the writer back on the source, nothing lost
    assert summary["outcome"] == "rolled_back" and summary["error"] == "RolledBack"
    assert "RollbackRequested: zdm-shop-orders-health entered ALARM" in summary["cause"]
    assert summary["rollback_kind"] == "after_cutover"
    assert summary["writer_on"] == "source"
    assert summary["rows_lost"] == 0 and summary["failed_transactions"] == 0
    assert summary["updates_lost"] == 0 and summary["deletes_lost"] == 0 and summary["child_rows_lost"] == 0
    assert "alarm rule             stopped the execution (ABORTED) and started rollback-" in proc.stderr


def test_an_alarm_during_the_read_shift_rolls_back_and_the_stopped_executions_late_step_is_refused(
    tmp_path: Path,
) -> None:
    # When the alarm rule stops the execution at the read shift's second step, before that step moves reads, and
    # the step goes on once the rollback has started (on AWS a stop does not end a running Lambda)
    proc, summary = rehearse(tmp_path / "out", "--fault", "alarm-rule-reads", *short_bakes(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary["fault_injected"] is True
    rule = summary["alarm_rule"]
    assert rule["rule"]["stopped"] and rule["rule"]["started"].rsplit(":", 1)[-1].startswith("rollback-")
    # Then the late step was refused, and every read is where the rollback put it, on the source
    assert rule["late_read_shift"].startswith("ReadShiftRefused: a rollback of 'shop-orders' started at")
    assert summary["reads_on_target_percent"] == 0
    # And the rollback execution rolled back before any cutover, nothing lost
    assert summary["outcome"] == "rolled_back" and summary["rollback_kind"] == "before_cutover"
    assert "RollbackRequested" in summary["cause"]
    assert summary["writer_on"] == "source"
    assert summary["rows_lost"] == 0 and summary["failed_transactions"] == 0


@pytest.mark.parametrize(
    ("fault", "engine"),
    [
        # during the read shift: the forward replication resumes from its slot on the source
        ("source-crash", "logical"),
        # the new writer, after the cutover: the reverse replication resumes from its slot there
        ("target-crash", "logical"),
        # the old writer, after the cutover: its reverse subscription resumes from its origin
        ("source-crash-after", "logical"),
        # the old writer, fenced, inside the cutover: its task's retry resumes it
        ("source-crash-fence", "logical"),
        # the new writer while it catches up inside the cutover's fence: the same
        ("target-crash-fence", "logical"),
        # the same under the change stream: the applier reconnects, the catch-up waits for its marker
        ("target-crash-fence", "debezium"),
        # the target during the initial copy: the copy resumes from the same snapshot
        ("target-crash-copy", "logical"),
        # pgbouncer, holding the writers at the fence: the cutover switches the writer once it answers again
        ("router-crash-fence", "logical"),
        # ... back 1 s before the switch: the writers reconnecting through it meet the source's fence
        ("router-restart-fence", "logical"),
        # the same under the change stream: the connector's own sessions outlive the fence, so it does not restart
        # (restart_wait_ms later) before publishing the catch-up's marker while the writers are refused
        ("router-restart-fence", "debezium"),
        # the target inside a validation chunk, applying changes: the chunk's task is retried
        ("target-crash-validate", "logical"),
        # the source inside a validation chunk, taking writes: the same, the writers failing while it is down
        ("source-crash-validate", "logical"),
    ],
)
def test_a_server_crash_and_restart_loses_nothing_and_the_migration_completes(
    tmp_path: Path, fault: str, engine: str
) -> None:
    # When a server crashes (immediate shutdown) mid-migration and starts again 3 s later (the bake after the
    # cutover as shipped: the target-crash fault's server is back before its gate)
    proc, summary = rehearse(
        tmp_path / "out", "--fault", fault, "--engine", engine, *short_bakes(tmp_path, post_cutover=False)
    )
    # Then it was down (checked by the fault) and restarted, and no transaction failed but while it was down
    # (those in flight at the crash; pgbouncer holds the others until it reconnects)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary["fault_injected"] is True and summary["engine"] == engine
    crashed, restarted = summary["outage"]
    assert restarted > crashed
    assert summary["failed_outside_outage"] == 0
    # And the replication resumed: nothing lost, nothing applied twice, both databases equal at the end
    assert summary["outcome"] == "migrated", (summary["error"], summary["cause"])
    assert summary["rows_lost"] == 0
    assert summary["updates_lost"] == 0 and summary["deletes_lost"] == 0 and summary["child_rows_lost"] == 0
    assert summary["final_differences"] == 0 and summary["final_rows_compared"] >= 20_000
    assert summary["reverse_replication_retired"] is True
    if fault in ("source-crash-fence", "target-crash-fence"):
        # And inside the cutover the crash failed its task, whose retry resumed it rather than rolling it back.
        # Which error depends on the moment: a statement in flight (OperationalError, seen on a loaded machine)
        # or a connection refused while the server is down (DatabaseUnreachable)
        failed = summary["lambda_invocations"]["Cutover"]["errors"]
        assert set(failed) & {"DatabaseUnreachable", "OperationalError"}, failed
        assert summary["rollback_kind"] is None
    if fault.startswith("router-"):
        # And the cutover waited for the restarted router inside its task, rather than fail and wait for its
        # task's next retry
        assert summary["lambda_invocations"]["Cutover"]["errors"] == {}
        assert summary["cutover_pause_ms"] >= 1000 * (restarted - crashed)
    if fault == "router-restart-fence":
        # And the writers that reconnected through it before the switch were refused by the source's fence (the
        # other failures: pgbouncer down), and none of their writes was lost (above)
        assert summary["failed_read_only"] > 0
    if fault.endswith("-validate"):
        # And inside a chunk the crash failed its task, whose retry compared the chunk anew and found no difference
        assert summary["lambda_invocations"]["ValidateChunk"]["errors"]
        assert summary["rows_validated"] >= 20_000 and summary["persistent_differences"] == 0


@pytest.mark.parametrize(
    ("fault", "down_seconds", "kind", "why"),
    [
        # the old writer, fenced, down past the cutover task's retries (3, 6 and 12 s apart): its catch rolls back
        ("source-outage-fence", 25, "before_cutover", "DatabaseUnreachable"),
        # the new writer down 10 s after the cutover, its alarm tripping the gate: the rollback needs its writes
        ("target-outage-after", 10, "after_cutover", "HealthGateTripped: after cutover"),
        # the old writer inside the rollback after the cutover (the gate tripped), catching up on the target's
        # writes: the rollback's task is retried and resumes from its records
        ("source-crash-rollback", 3, "after_cutover", "HealthGateTripped: after cutover"),
        # the new writer, fenced by that rollback and holding the writes the source catches up on: the same
        ("target-crash-rollback", 3, "after_cutover", "HealthGateTripped: after cutover"),
        # pgbouncer, holding the writers at that rollback's fence: the rollback goes on once it answers again
        ("router-crash-rollback", 3, "after_cutover", "HealthGateTripped: after cutover"),
    ],
)
def test_a_server_crash_that_ends_in_a_rollback_or_during_one_loses_nothing(
    tmp_path: Path, fault: str, down_seconds: int, kind: str, why: str
) -> None:
    # When a server crashes so that the migration rolls back (down long enough), or while it rolls back
    proc, summary = rehearse(tmp_path / "out", "--fault", fault, *short_bakes(tmp_path, post_cutover=False))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary["fault_injected"] is True
    crashed, restarted = summary["outage"]
    assert restarted - crashed >= down_seconds
    # Then it rolled back, its tasks failing on the unreachable server until it answered (the rollback's own
    # retries waited for it rather than give up or roll back without its writes); a rollback waits for the router
    # inside its task
    assert summary["outcome"] == "rolled_back" and summary["rollback_kind"] == kind
    assert why in summary["cause"]
    if fault.startswith("router-"):
        assert summary["lambda_invocations"]["Cutover"]["errors"] == {}
    else:
        assert "DatabaseUnreachable" in summary["task_errors"]
    # And the writers are back on the source with every write committed on either side there; none failed but
    # while the server was down
    assert summary["writer_on"] == "source"
    assert summary["rows_lost"] == 0 and summary["failed_outside_outage"] == 0
    assert summary["updates_lost"] == 0 and summary["deletes_lost"] == 0 and summary["child_rows_lost"] == 0


def test_ddl_on_the_new_writer_in_the_rollback_window_stops_the_migration_naming_it_and_the_mend_loses_nothing(
    tmp_path: Path,
) -> None:
    # When a column is added on the target (the writer) as the rollback window opens
    proc, summary = rehearse(tmp_path / "out", "--fault", "reverse-ddl", *short_bakes(tmp_path))
    # Then the window's checks stopped the migration, naming the column and the side it is missing on,
    # without rolling back (the rollback is what would be refused) and without retiring
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary["fault_injected"] is True and summary["outcome"] == "reverse_replication_broken"
    assert summary["error"] == "ReverseReplicationBroken"
    assert "public.orders.gift_note: missing on the source (target type text)" in summary["cause"]
    assert "make the same change on the source as on the target" in summary["cause"]
    assert "rollback" not in summary["phase_seconds"] and summary["writer_on"] == "target"
    assert summary["rows_lost"] == 0 and summary["failed_transactions"] == 0
    # And once mended as the stop says (the same column on the source), the retire left the source whole
    assert summary["reverse_mended"] is True and summary["reverse_replication_retired"] is True
    assert summary["final_differences"] == 0 and summary["final_rows_compared"] >= 20_000
    assert "mended, retired" in (tmp_path / "out" / "report.html").read_text()


def test_a_table_created_after_the_start_is_added_validated_and_migrated_with_the_rest(tmp_path: Path) -> None:
    # When the application's release creates a table on both sides right after the start, rows on the source
    proc, summary = rehearse(tmp_path / "out", "--fault", "new-table", *short_bakes(tmp_path))
    # Then the copy loop added it, and the migration completed with every row of it on the target
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary["fault_injected"] is True and summary["outcome"] == "migrated", (summary["error"], summary["cause"])
    assert summary["tables_added"] == ["public.coupons"]
    assert summary["persistent_differences"] == 0
    assert summary["final_differences"] == 0 and summary["rows_lost"] == 0
    assert summary["final_rows_by_table"]["public.coupons"] == 2_000  # compared row for row, source and target
    assert summary["reverse_replication_retired"] is True
    assert "tables added           after the start, by the copy loop: public.coupons" in proc.stderr


def test_after_a_rollback_the_runbook_abandons_and_a_second_start_migrates_with_nothing_lost(tmp_path: Path) -> None:
    # When the gate trips after the cutover (rolled back over the reverse replication), and the runbook is followed
    # to migrate again: the abandon, the target's fence lifted, its tables emptied, the migration started anew,
    # the writers running throughout
    proc, summary = rehearse(tmp_path / "out", "--fault", "retry", *short_bakes(tmp_path))
    # Then the first execution rolled back after its cutover, on the tripped gate
    assert proc.returncode == 0, proc.stderr[-3000:]
    abandon = summary["abandoned"]
    assert summary["fault_injected"] is True
    assert "HealthGateTripped: after cutover" in abandon["rolled_back_because"]
    # And the abandon succeeded and left nothing of either replication (read from both databases); the
    # rollback's fence on the target was there to lift
    assert abandon["status"] == "SUCCEEDED" and abandon["error"] is None and abandon["left"] == []
    assert abandon["target_fence_lifted"] is True
    # And the second execution migrated: every write of both attempts is on the target, equal row for row
    assert summary["outcome"] == "migrated", (summary["error"], summary["cause"])
    assert summary["writer_on"] == "target"
    assert summary["rows_lost"] == 0 and summary["failed_transactions"] == 0
    assert summary["updates_lost"] == 0 and summary["deletes_lost"] == 0 and summary["child_rows_lost"] == 0
    assert summary["persistent_differences"] == 0
    assert summary["final_differences"] == 0 and summary["final_rows_compared"] >= 20_000
    assert summary["reverse_replication_retired"] is True
    assert {"rollback", "abandon", "cutover"} <= set(summary["phase_seconds"])
    assert "abandon                SUCCEEDED; left of either replication: nothing" in proc.stderr
    assert "Exception=" not in proc.stderr  # the local interpreter's error dumps stay out of the terminal


def test_bad_migration_file_stops_before_anything_starts_with_the_field_and_fix(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: shop\nsource: {dsn: 'host=x'}\ntarget: {dsn: 'host=y'}\nread_shift: {steps: [10, 50]}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "rehearsal", "--rows", "20000", "--out", str(tmp_path / "out"), "--migration", str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "read_shift.steps: the last step must be 100" in proc.stderr
    assert not (tmp_path / "out" / "summary.json").exists()


def test_the_debezium_engine_migrates_the_same_way(tmp_path: Path) -> None:
    # When the whole migration is rehearsed with the change stream (Debezium -> local broker -> applier)
    proc, summary = rehearse(tmp_path / "out", "--engine", "debezium", *short_bakes(tmp_path))
    # Then it migrated with nothing failed, lost or different, the copy done by Debezium's snapshot
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary["engine"] == "debezium"
    assert summary["outcome"] == "migrated", (summary["error"], summary["cause"])
    assert summary["failed_transactions"] == 0 and summary["rows_lost"] == 0
    assert summary["persistent_differences"] == 0 and summary["rows_validated"] >= 20_000
    assert summary["final_differences"] == 0 and summary["final_rows_compared"] >= 20_000
    assert summary["rows_copied"] >= 20_000
    assert summary["reverse_replication_retired"] is True
    # And no process of the change stream is left behind
    left = processes_started_by(tmp_path / "out")
    assert left == [], f"processes of the rehearsal left running: {left}"
