"""The preflight checks: pure functions from gathered facts to a CheckResult (no I/O here).

Each check names what it measured and, when it does not pass, says exactly what to do. Problem
lists are complete: a table that cannot be migrated is named, never silently skipped.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable

from lambdas.core.catalog import Column, TableInfo
from lambdas.core.config import DMS_STOP_TIMEOUT_SECONDS
from lambdas.core.durations import fmt_seconds
from lambdas.core.lsn import ORIGIN_PROGRESS
from lambdas.core.matviews import selected_views
from lambdas.core.preflight.facts import (
    LARGE_OBJECT_COUNT_CAP,
    LONG_TRANSACTION_SECONDS,
    TARGET_ROW_COUNT_CAP,
    PreflightFacts,
    SentWrongly,
    ServerFacts,
    ServerVersion,
)
from lambdas.core.preflight.model import CheckResult, PreflightReport, Status
from lambdas.core.schema_compare import compare_table
from lambdas.core.schema_compare import join_names as _join  # one helper for every check's messages

MIN_VERSION_NUM = 100000  # logical replication arrived in PostgreSQL 10
FORWARD_SLOTS_NEEDED = 2  # the forward slot, plus headroom (a retried or temporary slot)
MIN_FREE_DISK_ADVICE = 1024**3  # never advise less free disk than this, however quiet the source
WAL_MARGIN = 2.0  # warn when the estimate uses more than 1/WAL_MARGIN of what is allowed or free


def fmt_bytes(value: float) -> str:
    size = float(value)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(size) < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"  # pragma: no cover


def _worst(statuses: Iterable[Status]) -> Status:
    found = set(statuses)
    if "fail" in found:
        return "fail"
    if "warn" in found:
        return "warn"
    return "pass"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


# --- servers ---------------------------------------------------------------------------------


def server_version_result(source: ServerVersion, target: ServerVersion) -> CheckResult:
    """Versions alone (also used when a server is too old for the other checks to run)."""
    measured = f"source {source.text}, target {target.text}"
    too_old = [
        f"{side} runs PostgreSQL {v.text}"
        for side, v in (("source", source), ("target", target))
        if v.num < MIN_VERSION_NUM
    ]
    if too_old:
        return CheckResult(
            "server_version",
            "fail",
            measured,
            "Logical replication needs PostgreSQL 10 or later on both servers: upgrade the old server "
            "(on RDS: modify the DB instance's engine version) before migrating.",
            too_old,
        )
    if target.major < source.major:
        return CheckResult(
            "server_version",
            "warn",
            measured,
            f"The target (PostgreSQL {target.major}) is older than the source ({source.major}): types, "
            "functions and defaults that exist only in the newer version fail on the target. Use a target of "
            f"major version {source.major} or later, or confirm the schema applies cleanly on the target.",
            [f"target major {target.major} < source major {source.major}"],
        )
    return CheckResult("server_version", "pass", measured)


def check_server_version(facts: PreflightFacts) -> CheckResult:
    return server_version_result(facts.source.version, facts.target.version)


def _restart_hint(server: ServerFacts, setting: str, value: object) -> str:
    if server.is_rds:
        return f"set {setting} = {value} in the DB parameter group and reboot the instance"
    return f"ALTER SYSTEM SET {setting} = {value}; then restart PostgreSQL (a reload is not enough)"


def check_wal_level(facts: PreflightFacts) -> CheckResult:
    src = facts.source
    measured = f"source wal_level={src.wal_level}" + (" (RDS)" if src.is_rds else "")
    if src.wal_level == "logical":
        return CheckResult("wal_level", "pass", measured)
    if src.is_rds:
        remedy = (
            "Set rds.logical_replication = 1 in the source's DB parameter group (cluster parameter group on "
            "Aurora) and reboot the instance; wal_level then becomes 'logical'."
        )
    else:
        remedy = (
            "On the source run ALTER SYSTEM SET wal_level = 'logical'; then restart PostgreSQL (a reload is not "
            "enough). Logical decoding, and so the replication slot, needs it."
        )
    return CheckResult("wal_level", "fail", measured, remedy, [f"source wal_level is {src.wal_level!r}, not 'logical'"])


def _sync_workers(facts: PreflightFacts) -> int:
    return min(facts.target.max_sync_workers_per_subscription, max(1, len(facts.tables.selected)))


def _capacity(
    name: str,
    what: str,
    setting: str,
    server: ServerFacts,
    limit: int,
    used: int,
    needed: int,
    wanted: int,
    why: str,
    extra_remedy: str = "",
) -> CheckResult:
    free = limit - used
    measured = f"{what}: {free} free ({setting}={limit}, {used} in use); need {needed}" + (
        f", want {wanted}" if wanted > needed else ""
    )
    if free >= wanted:
        return CheckResult(name, "pass", measured)
    status: Status = "fail" if free < needed else "warn"
    target_value = used + wanted
    remedy = f"Raise {setting} to at least {target_value}: {_restart_hint(server, setting, target_value)}."
    if extra_remedy:
        remedy += " " + extra_remedy
    return CheckResult(name, status, measured, remedy, [f"{free} free, {needed} needed ({why})"])


def check_source_replication_slots(facts: PreflightFacts) -> CheckResult:
    src = facts.source
    wanted = FORWARD_SLOTS_NEEDED
    why = "the forward slot plus headroom"
    if facts.engine == "logical" and facts.copy_method == "subscription":
        wanted = max(wanted, 1 + _sync_workers(facts))
        why += f"; the subscription copy opens up to {_sync_workers(facts)} table-sync slots at once"
    return _capacity(
        "source_replication_slots",
        "replication slots on the source",
        "max_replication_slots",
        src,
        src.max_replication_slots,
        src.slots_used,
        FORWARD_SLOTS_NEEDED,
        wanted,
        why,
        "Or drop slots nobody uses: SELECT slot_name, active FROM pg_replication_slots; "
        "SELECT pg_drop_replication_slot('<slot_name>'); (an inactive slot also keeps WAL forever).",
    )


def check_source_wal_senders(facts: PreflightFacts) -> CheckResult:
    src = facts.source
    wanted = FORWARD_SLOTS_NEEDED
    why = "the forward stream plus headroom"
    if facts.engine == "logical" and facts.copy_method == "subscription":
        wanted = max(wanted, 1 + _sync_workers(facts))
        why += f"; each of up to {_sync_workers(facts)} table-sync workers uses a WAL sender"
    return _capacity(
        "source_wal_senders",
        "WAL senders on the source",
        "max_wal_senders",
        src,
        src.max_wal_senders,
        src.wal_senders_used,
        FORWARD_SLOTS_NEEDED,
        wanted,
        why,
    )


def check_target_subscription_capacity(facts: PreflightFacts) -> CheckResult:
    name = "target_subscription_capacity"
    if facts.engine != "logical":
        return CheckResult(name, "pass", f"not needed (engine {facts.engine})")
    tgt = facts.target
    extra = _sync_workers(facts) if facts.copy_method == "subscription" else 0
    wanted = 1 + extra
    origins_free = None if tgt.origins_used is None else tgt.max_replication_slots - tgt.origins_used
    workers_free = tgt.max_logical_replication_workers - tgt.logical_workers_used
    processes_free = tgt.max_worker_processes - tgt.background_workers_used
    rows: list[tuple[str, int | None, int, str]] = [
        (
            "max_replication_slots (replication origins)",
            origins_free,
            tgt.max_replication_slots,
            "max_replication_slots",
        ),
        (
            "max_logical_replication_workers",
            workers_free,
            tgt.max_logical_replication_workers,
            "max_logical_replication_workers",
        ),
        ("max_worker_processes", processes_free, tgt.max_worker_processes, "max_worker_processes"),
    ]
    details: list[str] = []
    statuses: list[Status] = []
    fixes: list[str] = []
    for label, free, limit, setting in rows:
        if free is None:
            details.append(f"{label}: {limit}, use unknown (pg_replication_origin is not readable by this role)")
            statuses.append("pass" if limit >= wanted else "fail")
            continue
        status: Status = "pass" if free >= wanted else ("fail" if free < 1 else "warn")
        statuses.append(status)
        details.append(f"{label}: {free} free of {limit}, need 1" + (f", want {wanted}" if wanted > 1 else ""))
        if status != "pass":
            fixes.append(f"{setting} = {limit - free + wanted}")
    status = _worst(statuses)
    measured = (
        f"origins free {'?' if origins_free is None else origins_free}, logical workers free {workers_free}, "
        f"worker processes free {processes_free}"
    )
    if status == "pass":
        return CheckResult(name, "pass", measured)
    how = (
        "in the target's DB parameter group, then reboot"
        if tgt.is_rds
        else "with ALTER SYSTEM SET on the target, then restart it"
    )
    remedy = (
        "The subscription needs one apply worker and one replication origin"
        + (f", plus up to {extra} table-sync workers" if extra else "")
        + f". Set {_join(fixes) or 'these settings higher'} {how}; max_worker_processes must also cover "
        "max_logical_replication_workers plus any parallel and extension workers."
    )
    return CheckResult(name, status, measured, remedy, details)


def check_reverse_replication(facts: PreflightFacts) -> CheckResult:
    """Cutover starts replication target -> source (rollback path): the target must be able to publish."""
    name = "reverse_replication"
    tgt = facts.target
    slots_free = tgt.max_replication_slots - tgt.slots_used
    senders_free = tgt.max_wal_senders - tgt.wal_senders_used
    measured = f"target wal_level={tgt.wal_level}, {slots_free} slot(s) and {senders_free} WAL sender(s) free"
    problems: list[str] = []
    fixes: list[str] = []
    if tgt.wal_level != "logical":
        problems.append(f"target wal_level is {tgt.wal_level!r}, not 'logical'")
        fixes.append("rds.logical_replication = 1" if tgt.is_rds else "wal_level = 'logical'")
    if slots_free < 1:
        problems.append(
            f"no free replication slot on the target ({tgt.slots_used} of {tgt.max_replication_slots} used)"
        )
        fixes.append(f"max_replication_slots = {tgt.slots_used + 1}")
    if senders_free < 1:
        problems.append(f"no free WAL sender on the target ({tgt.wal_senders_used} of {tgt.max_wal_senders} used)")
        fixes.append(f"max_wal_senders = {tgt.wal_senders_used + 1}")
    # The back subscription's apply worker and replication origin live on the source.
    src = facts.source
    src_fixes: list[str] = []
    for setting, limit, used in (
        ("max_logical_replication_workers", src.max_logical_replication_workers, src.logical_workers_used),
        ("max_worker_processes", src.max_worker_processes, src.background_workers_used),
        ("max_replication_slots", src.max_replication_slots, src.origins_used),
    ):
        if used is not None and limit - used < 1:
            problems.append(
                "no room on the source for the back subscription's "
                + ("replication origin" if setting == "max_replication_slots" else "apply worker")
                + f" ({setting}={limit}, {used} in use)"
            )
            src_fixes.append(f"{setting} = {used + 1}")
    if not problems:
        return CheckResult(name, "pass", measured)
    how = (
        "in the target's DB parameter group and reboot it"
        if tgt.is_rds
        else "on the target (ALTER SYSTEM SET) and restart it"
    )
    src_how = (
        "in the source's DB parameter group and reboot it"
        if src.is_rds
        else "on the source (ALTER SYSTEM SET) and restart it"
    )
    remedy = (
        "At cutover the target starts replicating back to the source so that a rollback loses nothing; "
        "it cannot without these. "
        + (f"Set {_join(fixes)} {how}. " if fixes else "")
        + (f"Set {_join(src_fixes)} {src_how}. " if src_fixes else "")
        + "Do it before starting."
    )
    return CheckResult(name, "fail", measured, remedy, problems)


# --- roles -----------------------------------------------------------------------------------


def check_source_role(facts: PreflightFacts) -> CheckResult:
    name = "source_role"
    src = facts.source
    role = src.role
    rds_repl = "rds_replication" in role.member_of
    can_replicate = role.superuser or role.replication or rds_repl
    measured = f"role {role.name}: superuser={_yes(role.superuser)}, replication={_yes(role.replication)}" + (
        f", rds_replication={_yes(rds_repl)}" if src.is_rds else ""
    )
    problems: list[str] = []
    remedies: list[str] = []
    if not can_replicate:
        problems.append(
            f"role {role.name} may not replicate (no REPLICATION attribute, not superuser"
            + (", not in rds_replication)" if src.is_rds else ")")
        )
        if src.is_rds:
            remedies.append(f"as the master user run: GRANT rds_replication TO {role.name};")
        else:
            remedies.append(f"as a superuser run: ALTER ROLE {role.name} REPLICATION;")
    if not role.superuser:
        if facts.tables.source_not_owned:
            problems.append(
                f"role {role.name} does not own {_join(facts.tables.source_not_owned)} "
                "(CREATE PUBLICATION ... FOR TABLE needs the owner)"
            )
            remedies.append(
                "connect as the tables' owner, or ALTER TABLE <table> OWNER TO " + role.name + " for each listed table;"
            )
        if not role.can_create_in_database:
            problems.append(
                f"role {role.name} has no CREATE privilege on database {src.database} (publications need it)"
            )
            remedies.append(f"GRANT CREATE ON DATABASE {src.database} TO {role.name};")
    if facts.tables.source_unreadable:
        problems.append(
            f"role {role.name} may not SELECT from {_join(facts.tables.source_unreadable)} (the copy reads them)"
        )
        remedies.append(f"GRANT SELECT ON <each listed table> TO {role.name};")
    if not problems:
        return CheckResult(name, "pass", measured)
    return CheckResult(name, "fail", measured, "On the source, " + " ".join(remedies), problems)


def check_target_role(facts: PreflightFacts) -> CheckResult:
    """The target role's rights: to create the subscription (logical engine: superuser, or on PostgreSQL
    16+ pg_create_subscription and CREATE on the database), and to write as session_replication_role =
    replica (the parallel copy and the debezium applier: foreign keys are not checked per change, as in
    native logical replication's apply; superuser, or GRANT SET ON PARAMETER on PostgreSQL 15+)."""
    name = "target_role"
    if facts.engine not in ("logical", "debezium"):
        return CheckResult(name, "pass", f"not needed (engine {facts.engine})")
    tgt = facts.target
    role = tgt.role
    major = tgt.version.major
    measured = f"role {role.name} on PostgreSQL {major}: superuser={_yes(role.superuser)}"
    if role.superuser:
        return CheckResult(name, "pass", measured)
    if tgt.is_rds and "rds_superuser" in role.member_of:
        return CheckResult(name, "pass", measured + ", rds_superuser=yes")
    if facts.engine == "logical" and major < 16:
        return CheckResult(
            name,
            "fail",
            measured,
            f"PostgreSQL {major} lets only superusers create subscriptions: give the target endpoint a superuser "
            "(the master user, a member of rds_superuser, on RDS), or upgrade the target to PostgreSQL 16+ and "
            f"GRANT pg_create_subscription TO {role.name}.",
            [f"role {role.name} cannot create a subscription"],
        )
    problems: list[str] = []
    grants: list[str] = []
    if facts.engine == "logical":
        has_right = "pg_create_subscription" in role.member_of
        measured += (
            f", pg_create_subscription={_yes(has_right)}, CREATE on database={_yes(role.can_create_in_database)}"
        )
        if not has_right:
            grants.append(f"GRANT pg_create_subscription TO {role.name};")
        if not role.can_create_in_database:
            grants.append(f"GRANT CREATE ON DATABASE {tgt.database} TO {role.name};")
        if grants:
            problems.append(f"role {role.name} cannot create a subscription")
    if facts.engine == "debezium" or facts.copy_method == "parallel-snapshot":
        measured += f", may set session_replication_role={_yes(role.can_set_replication_role)}"
        if not role.can_set_replication_role:
            problems.append(f"role {role.name} cannot set session_replication_role")
            if major >= 15:
                grants.append(f"GRANT SET ON PARAMETER session_replication_role TO {role.name};")
    if not problems:
        return CheckResult(name, "pass", measured)
    remedy = "On the target, as a superuser run: " + " ".join(grants) if grants else ""
    if major < 15 and not role.can_set_replication_role:
        remedy = (
            f"PostgreSQL {major} lets only superusers set session_replication_role, which the debezium applier "
            "does: give the target endpoint a superuser (the master user, a member of rds_superuser, on RDS)."
        )
    return CheckResult(name, "fail", measured, remedy, problems)


def _can_create_subscription(server: ServerFacts) -> bool:
    role = server.role
    if role.superuser or (server.is_rds and "rds_superuser" in role.member_of):
        return True
    return server.version.major >= 16 and "pg_create_subscription" in role.member_of and role.can_create_in_database


def check_cutover_rights(facts: PreflightFacts) -> CheckResult:
    """What the cutover and a rollback do with the endpoints' roles beyond the forward replication: fence
    each database (ALTER DATABASE, ending sessions), subscribe on the source to the target (the replication
    back), publish and replicate from the target."""
    name = "cutover_rights"
    src, tgt = facts.source, facts.target
    measured = (
        f"source role {src.role.name}: owns database={_yes(src.role.owns_database or src.role.superuser)}, "
        f"can subscribe={_yes(_can_create_subscription(src))}; target role {tgt.role.name}: owns database="
        f"{_yes(tgt.role.owns_database or tgt.role.superuser)}, replication={_yes(tgt.role.replication or tgt.role.superuser)}"
    )
    problems: list[str] = []
    fixes: list[str] = []
    warnings: list[str] = []
    for side, server, when in (("source", src, "cutover"), ("target", tgt, "rollback")):
        role = server.role
        if not (role.superuser or role.owns_database):
            problems.append(
                f"{side} role {role.name} does not own database {server.database}: the {when}'s fence "
                "(ALTER DATABASE ... SET default_transaction_read_only) needs the owner"
            )
            fixes.append(f"on the {side}: ALTER DATABASE {server.database} OWNER TO {role.name};")
        if not (role.superuser or "pg_signal_backend" in role.member_of):
            warnings.append(
                f"{side} role {role.name} is not in pg_signal_backend: the {when}'s fence cannot end other roles' "
                "sessions"
            )
            fixes.append(f"on the {side}: GRANT pg_signal_backend TO {role.name};")
    if not _can_create_subscription(src):
        problems.append(
            f"source role {src.role.name} cannot create the subscription that replicates back from the target "
            f"(PostgreSQL {src.version.major}"
            + (": superuser only)" if src.version.major < 16 else ": needs pg_create_subscription and CREATE)")
        )
        fixes.append(
            "on the source: use a superuser (rds_superuser on RDS)"
            + (f" or GRANT pg_create_subscription TO {src.role.name};" if src.version.major >= 16 else "")
        )
    if not (tgt.role.superuser or tgt.role.replication or "rds_replication" in tgt.role.member_of):
        problems.append(f"target role {tgt.role.name} may not replicate (the replication back streams from the target)")
        fixes.append(f"on the target: ALTER ROLE {tgt.role.name} REPLICATION;")
    if not problems and not warnings:
        return CheckResult(name, "pass", measured)
    return CheckResult(
        name,
        "fail" if problems else "warn",
        measured,
        "The cutover fences the source and starts the replication back (target -> source); a rollback fences "
        "the target. Without these rights the cutover aborts with writes paused, or cannot be rolled back: "
        + " ".join(fixes),
        problems + warnings,
    )


def _subscribing_sides(facts: PreflightFacts, back: str) -> list[tuple[str, ServerFacts, str]]:
    """The servers a subscription is created on, with what it is for: the target for the logical engine's
    forward replication, and the source for the replication back (`back` says when) under every engine."""
    sides = [("source", facts.source, back)]
    if facts.engine == "logical":
        sides.insert(0, ("target", facts.target, "the forward replication"))
    return sides


def check_apply_position_rights(facts: PreflightFacts) -> CheckResult:
    """How far a subscription applied is read from its replication origin (`lsn.applied_lsn`): the lag, the
    cutover's catch-up, validation's re-checks. Reading it is superuser-only unless granted, which a
    PostgreSQL 16 subscription owner in pg_create_subscription is not. Without it the waits still end, on
    the apply worker's received position and the walsender's report, which confirm later."""
    name = "apply_position_rights"
    sides = _subscribing_sides(facts, "the replication back, at a rollback")
    lacking = [(side, server, what) for side, server, what in sides if not server.role.can_read_origin_progress]
    measured = ", ".join(
        f"{side} role {server.role.name}: reads origin progress={_yes(server.role.can_read_origin_progress)}"
        for side, server, _ in sides
    )
    if not lacking:
        return CheckResult(name, "pass", measured)
    return CheckResult(
        name,
        "warn",
        measured,
        "Waits for the subscriber to apply a position (the cutover's catch-up, the lag, validation's re-checks) "
        "would confirm it later, from the apply worker's received position and the walsender's report. "
        + " ".join(
            f"On the {side}, in database {server.database}, as a superuser run: "
            f"GRANT EXECUTE ON FUNCTION {ORIGIN_PROGRESS} TO {server.role.name};"
            for side, server, _ in lacking
        ),
        [
            f"{side} role {server.role.name} may not execute pg_replication_origin_progress ({what})"
            for side, server, what in lacking
        ],
    )


def check_database_encoding(facts: PreflightFacts) -> CheckResult:
    name = "database_encoding"
    src, tgt = facts.source.encoding, facts.target.encoding
    measured = f"source {src}, target {tgt}"
    if src == tgt or (tgt == "UTF8" and src != "SQL_ASCII"):
        return CheckResult(name, "pass", measured)
    return CheckResult(
        name,
        "warn",
        measured,
        "The databases' encodings differ: text the target's encoding cannot represent stops the copy or the "
        "apply ('has no equivalent in encoding'), and SQL_ASCII text is not checked at all. Create the target "
        f"database with ENCODING '{src if src != 'SQL_ASCII' else 'UTF8'}' (CREATE DATABASE ... TEMPLATE template0).",
        [f"source database encoding {src}, target {tgt}"],
    )


def check_subscription_password_logging(facts: PreflightFacts) -> CheckResult:
    """CREATE SUBSCRIPTION carries the other side's password in its connection string. The engines switch
    off every setting that keeps a statement's text around it; where the role may not, and the server's
    value keeps it, the password ends up in the server log or in pg_stat_statements."""
    name = "subscription_password_logging"
    sides = _subscribing_sides(facts, "the replication back, at the cutover")
    details: list[str] = []
    fixes: list[str] = []
    for side, server, what in sides:
        kept = [s for s in server.statement_logging if not s.can_set and s.keeps_statements]
        for setting in kept:
            details.append(
                f"{side}: {setting.name} = {setting.value} and role {server.role.name} may not change it: "
                f"CREATE SUBSCRIPTION of {what} would keep its password there"
            )
        if kept:
            names = ", ".join(s.name for s in kept)
            fixes.append(
                f"on the {side}: GRANT SET ON PARAMETER {names} TO {server.role.name};"
                if server.version.major >= 15
                else f"on the {side}: use a superuser, or turn {names} off in the server's parameters"
            )
            if any(s.name == "pgaudit.log" for s in kept):
                # What RDS documents for keeping a role out of pgaudit's session log (rds_superuser may run it).
                fixes.append(
                    f"For pgaudit.log, or on RDS: ALTER ROLE {server.role.name} SET pgaudit.log = 'none'; "
                    "(that role's own statements are then not audited)."
                )
    measured = ", ".join(
        f"{side}: {sum(1 for s in server.statement_logging if s.can_set)} of {len(server.statement_logging)} switchable"
        for side, server, _ in sides
    )
    if not details:
        return CheckResult(name, "pass", measured)
    return CheckResult(
        name,
        "warn",
        measured,
        "The subscription's password would be written where these settings keep statements (the server log, "
        "pg_stat_statements, readable by pg_read_all_stats). " + " ".join(fixes) + " Or change the password "
        "after the migration.",
        details,
    )


def check_slot_names(facts: PreflightFacts) -> CheckResult:
    name = "slot_names"
    if not facts.foreign_slots:
        return CheckResult(name, "pass", "no slot of another database uses the migration's slot names")
    return CheckResult(
        name,
        "fail",
        f"{len(facts.foreign_slots)} slot(s) named as this migration's belong to another database",
        "Starting (or the cutover, for the target's) drops a slot of that name first, and with it whatever "
        "replicates from it (another migration of the same name, another tool). Rename this migration ('name' "
        "in the migration file) or drop the listed slots knowingly.",
        list(facts.foreign_slots),
    )


def _quoted(identifier: str) -> str:
    """An identifier as a remedy's SQL must spell it (text shown to a person, never run)."""
    return '"' + identifier.replace('"', '""') + '"'


def check_earlier_attempt(facts: PreflightFacts) -> CheckResult:
    """An earlier execution's replication: a start would resume it (a subscription is enabled again, not
    created), on a target emptied or changed since, and skip the copy."""
    name = "earlier_attempt"
    left = facts.replication_left
    if not left:
        return CheckResult(name, "pass", "nothing of an earlier execution of this migration is left")
    return CheckResult(
        name,
        "fail",
        f"{len(left)} replication object(s) of an earlier execution of this migration left",
        "A rollback stops this migration's replication and keeps it (nothing is lost, and its slot keeps WAL on "
        "the source); a new start would resume it rather than copy again. Remove it first: start the state "
        'machine with {"action": "abandon"}, then empty the target\'s tables and start again (docs/operations.md).',
        list(left),
    )


def check_read_only_fence(facts: PreflightFacts) -> CheckResult:
    """A fence left in place: on the source, a cutover's (applications cannot write there); on the target, a
    rollback's after the cutover (the copy cannot write there)."""
    name = "read_only_fence"
    details: list[str] = []
    remedies: list[str] = []
    if facts.source.fenced:
        details.append(
            f"source: database {facts.source.database!r} is read-only by default (default_transaction_read_only "
            "= on): a cutover's fence, which stays after a cutover so that no client writes to the old database"
        )
        remedies.append(
            "If this migration's cutover completed, the target is the database now: do not start it again. If a "
            'cutover stopped half-way, start {"action": "rollback"}: it lifts the fence.'
        )
    if facts.target.fenced:
        details.append(
            f"target: database {facts.target.database!r} is read-only by default (default_transaction_read_only "
            "= on): a rollback after the cutover leaves this fence, so that no client still pointed at the "
            "target commits a write there that the source would never see"
        )
        remedies.append(
            "Once no client writes to the target any more, lift it there (the first statement lets this session "
            "write): SET default_transaction_read_only = off; ALTER DATABASE "
            f"{_quoted(facts.target.database)} RESET default_transaction_read_only;"
        )
    if not details:
        return CheckResult(name, "pass", "neither database is fenced read-only")
    return CheckResult(name, "fail", f"{len(details)} database(s) fenced read-only", " ".join(remedies), details)


# --- tables ----------------------------------------------------------------------------------


def suggest_table(pattern: str, names: list[str]) -> str | None:
    """The table a mistyped pattern most likely meant: close as a whole and in its table part."""
    wanted = pattern.rpartition(".")[2]
    for candidate in difflib.get_close_matches(pattern, names, n=5, cutoff=0.75):
        if difflib.SequenceMatcher(None, wanted, candidate.rpartition(".")[2]).ratio() >= 0.7:
            return candidate
    return None


def check_table_selection(facts: PreflightFacts) -> CheckResult:
    name = "table_selection"
    tables = facts.tables
    measured = (
        f"{len(tables.selected)} of {len(tables.candidates)} source tables selected "
        f"(include {_join(tables.include)}" + (f"; exclude {_join(tables.exclude)}" if tables.exclude else "") + ")"
    )
    details: list[str] = []
    names = [str(t) for t in tables.candidates]
    for pattern in tables.unmatched_include:
        close = suggest_table(pattern, names)
        hint = f"; did you mean {close}?" if close else ""
        details.append(f"include pattern {pattern!r} matches no table on the source{hint}")
    if not tables.selected:
        details.append("no table is selected: nothing would be migrated")
    if not details:
        return CheckResult(name, "pass", measured)
    return CheckResult(
        name,
        "fail",
        measured,
        "Fix 'tables.include' in the migration file: each pattern is 'schema.table' (wildcards * ? allowed) and "
        "must match at least one table on the source; names are case-sensitive. Remove patterns for tables "
        "that do not exist.",
        details,
    )


def _identity_problem(info: TableInfo) -> str:
    if info.replica_identity == "n":
        return f"{info.name}: REPLICA IDENTITY NOTHING"
    if info.replica_identity == "i":
        return f"{info.name}: REPLICA IDENTITY USING INDEX, but the index no longer exists"
    if info.primary_key and info.primary_key_deferrable:
        return f"{info.name}: its primary key is DEFERRABLE, which PostgreSQL never uses as replica identity"
    return f"{info.name}: no primary key (replica identity default)"


def check_replica_identity(facts: PreflightFacts) -> CheckResult:
    name = "replica_identity"
    infos = [facts.tables.source[t] for t in facts.tables.selected if t in facts.tables.source]
    # Partitions published through a selected root: UPDATE/DELETE on each checks its own replica identity
    # (ALTER TABLE <root> REPLICA IDENTITY does not reach them).
    infos += [facts.tables.partitions[t] for t in sorted(facts.tables.partitions)]
    missing = [i for i in infos if not i.has_usable_identity]
    full_only = [i for i in infos if i.has_usable_identity and i.replica_identity == "f" and not i.primary_key]
    measured = (
        f"{len(infos) - len(missing)} of {len(infos)} selected tables have a primary key or usable replica identity"
    )
    if missing:
        return CheckResult(
            name,
            "fail",
            measured,
            "Give each listed table a primary key (ALTER TABLE <table> ADD PRIMARY KEY (<columns>)), or point the "
            "replica identity at a unique index on NOT NULL columns (ALTER TABLE <table> REPLICA IDENTITY USING "
            "INDEX <index>); as a last resort ALTER TABLE <table> REPLICA IDENTITY FULL (slow on big tables); or "
            "exclude the table (a partition needs it itself: the root's setting does not reach it). Do not start without it: once such a table is in the publication, every UPDATE "
            "and DELETE on it FAILS ON THE SOURCE ('cannot update table ... because it does not have a replica "
            "identity and publishes updates').",
            [_identity_problem(i) for i in missing],
        )
    if full_only and facts.engine == "debezium":
        return CheckResult(
            name,
            "fail",
            measured,
            "The debezium engine applies each change by primary key (upsert and delete on the target): give each "
            "listed table a primary key (ALTER TABLE <table> ADD PRIMARY KEY (<columns>)), exclude it, or use "
            "engine 'logical', which can apply REPLICA IDENTITY FULL tables.",
            [f"{i.name}: REPLICA IDENTITY FULL, no primary key" for i in full_only],
        )
    if full_only:
        return CheckResult(
            name,
            "warn",
            measured,
            "These tables replicate with REPLICA IDENTITY FULL and have no primary key: each UPDATE/DELETE is found "
            "on the target by scanning, and validation cannot split them by key. Add a primary key if you can.",
            [f"{i.name}: REPLICA IDENTITY FULL, no primary key" for i in full_only],
        )
    return CheckResult(name, "pass", measured)


# Array element types whose unchanged TOASTed value Debezium marks with its placeholder (the applier
# keeps the target's value); for any other array it sends NULL when the value was not in the WAL
# record (REPLICA IDENTITY DEFAULT), which would be written as NULL.
_MARKED_ARRAY_ELEMENTS = frozenset({"text", "character varying", "integer", "bigint", "date", "uuid"})


def _array_element(type_name: str) -> str | None:
    if not type_name.endswith("[]"):
        return None
    base = type_name.removesuffix("[]")
    return base.split("(")[0].strip()


# Types the Debezium connector (3.6.3, read from the real connector) leaves out of its events (the
# column is missing: the applier refuses such a change), composite types among them (known by the
# catalog's typtype, not by name), or sends so that the value cannot be rebuilt.
_DEBEZIUM_OMITS = frozenset({"box", "line", "lseg", "path", "polygon", "circle", "tsquery", "interval[]"})
_DEBEZIUM_LOSES = {
    "time with time zone": "converted to UTC ('12:00:00+02' arrives as '10:00:00Z')",
    "time with time zone[]": "converted to UTC ('12:00:00+02' arrives as '10:00:00Z')",
    "bit varying": "without its leading zeros (B'0011' arrives as B'11')",
    "bit varying[]": "without its leading zeros (B'0011' arrives as B'11')",
    "time without time zone[]": "without the elements' microseconds (java.sql.Time keeps milliseconds), and "
    "24:00:00 as 00:00:00",
    "bit[]": "as NULL",
}


def _debezium_type_problem(column: Column) -> str | None:
    """Why Debezium cannot carry a column of this type exactly, or None."""
    base = re.sub(r"\(\d+(,\d+)?\)", "", column.type)  # time(3) with time zone[] -> time with time zone[]
    if column.composite or base in _DEBEZIUM_OMITS or base.endswith(("multirange", "multirange[]")):
        return "left out of Debezium's events (a type it does not know)"
    if base in _DEBEZIUM_LOSES:
        return "sent " + _DEBEZIUM_LOSES[base]
    return None


# Measured through the real connector (tests/integration/test_debezium_stream.py)
_ARRAY_SHAPES = (
    "of more than one dimension, or whose first index is not 1, wrongly and without an error ('{{1,2},{3,4}}' "
    "arrives as '{NULL,NULL}', '[0:1]={5,6}' as '{5,6}')"
)


def check_change_stream_types(facts: PreflightFacts) -> CheckResult:
    name = "change_stream_types"
    if facts.engine != "debezium":
        return CheckResult(name, "pass", f"not needed (engine {facts.engine})")
    infos = [facts.tables.source[t] for t in facts.tables.selected if t in facts.tables.source]
    columns = [(i, c) for i in infos for c in i.columns if not c.generated]  # generated ones are never sent
    lost = [
        f"{i.name}.{c.name} ({c.type}): {problem}"
        for i, c in columns
        if (problem := _debezium_type_problem(c)) is not None
    ]
    unmarked = [
        f"{i.name}.{c.name} ({c.type})"
        for i, c in columns
        if i.replica_identity != "f"
        and (element := _array_element(c.type)) is not None
        and element not in _MARKED_ARRAY_ELEMENTS
    ]
    arrays = [f"{i.name}.{c.name}" for i, c in columns if _array_element(c.type) is not None]
    sent_wrongly = facts.tables.sent_wrongly or SentWrongly([], [], [])
    numeric_arrays = [f"{i.name}.{c.name}" for i, c in columns if _array_element(c.type) == "numeric"]
    calendar_arrays = [
        f"{i.name}.{c.name}"
        for i, c in columns
        if (element := _array_element(c.type)) is not None and (element == "date" or element.startswith("timestamp"))
    ]
    failures = [
        (items, advice)
        for items, advice in (
            (
                lost,
                "Debezium would not deliver these columns' values as they are on the source, and the target would "
                "hold others: use engine 'logical', exclude these tables, or change the columns' types on both sides.",
            ),
            (
                unmarked,
                "With REPLICA IDENTITY DEFAULT, Debezium sends NULL for an unchanged TOASTed array of these element "
                "types, and the target would lose the value: set ALTER TABLE <table> REPLICA IDENTITY FULL on the "
                "listed tables (more WAL per UPDATE/DELETE), exclude them, or use engine 'logical'.",
            ),
            (
                sent_wrongly.arrays,
                f"These columns hold arrays {_ARRAY_SHAPES}: use engine 'logical', exclude these tables, or store "
                "the values otherwise (jsonb, or one dimension from index 1).",
            ),
            (
                sent_wrongly.bc_dates,
                "These date columns hold dates BC, which Debezium's snapshot sends as the same day AD ('0044-03-15 "
                "BC' arrives as '0044-03-15', with no error; its stream sends them right): use engine 'logical' "
                "or exclude these tables.",
            ),
        )
        if items
    ]
    warnings = [
        (items, advice)
        for items, advice in (
            (
                [str(t) for t in sent_wrongly.unscanned],
                "These tables were not scanned in time for arrays of more than one dimension or another first "
                "index, or dates BC.",
            ),
            (
                arrays,
                f"Debezium sends an array {_ARRAY_SHAPES}; none is on the source now, but one written later would "
                "reach the target wrong, also after validation: on the source, add CHECK (array_ndims(<column>) = 1 "
                "AND array_lower(<column>, 1) = 1) NOT VALID to each such column, or use engine 'logical'.",
            ),
            (numeric_arrays, "Debezium sends NULL for a numeric[] value holding NaN."),
            (
                calendar_arrays,
                "Debezium sends a date or timestamp array element before 1582-10-15 shifted by the Julian calendar "
                "and without its era (the applier refuses such a change: a dead letter), and a BC element of a later "
                "year as AD.",
            ),
        )
        if items
    ]
    measured = (
        f"{len(lost)} column(s) of types Debezium cannot carry exactly, "
        f"{len(unmarked)} array column(s) it could send as NULL when unchanged, "
        f"{len(sent_wrongly.arrays) + len(sent_wrongly.bc_dates)} holding values it would send wrongly"
    )
    if failures:
        details = [item for items, _ in failures for item in items]
        return CheckResult(name, "fail", measured, " ".join(advice for _, advice in failures), details)
    if warnings:
        return CheckResult(
            name,
            "warn",
            measured,
            " ".join(advice for _, advice in warnings)
            + " If these columns can hold such values, use engine 'logical'; validation before the cutover would "
            "find such rows.",
            list(dict.fromkeys(item for items, _ in warnings for item in items)),
        )
    return CheckResult(name, "pass", measured)


def check_row_level_security(facts: PreflightFacts) -> CheckResult:
    """Policies that hide rows from the migration's roles: PostgreSQL filters silently, so the copy (and
    Debezium's or DMS's snapshot) would leave rows behind and the validation would compare only what both
    roles see, and call the result equal."""
    name = "row_level_security"
    tables = facts.tables
    problems: list[str] = []
    sides = (
        ("source", facts.source, [*tables.source.values(), *tables.partitions.values()], "the copy and the validation"),
        ("target", facts.target, list(tables.target.values()), "the validation"),
    )
    roles: list[str] = []
    counts: list[str] = []
    for side, server, infos, readers in sides:
        filtered = sorted(str(t.name) for t in infos if t.row_security_active)
        counts.append(f"{side} {len(filtered)}")
        if filtered:
            roles.append(server.role.name)
            problems.append(
                f"{side}: row-level security policies filter what role {server.role.name} reads from "
                f"{_join(filtered)} ({readers} would silently see only those rows)"
            )
    measured = "tables whose policies hide rows from the migration's role: " + _join(counts)
    if not problems:
        return CheckResult(name, "pass", measured)
    grants = " ".join(f"ALTER ROLE {role} BYPASSRLS;" for role in sorted(set(roles)))
    return CheckResult(
        name,
        "fail",
        measured,
        f"Let the migration's roles read every row: as a superuser run {grants} Or connect as each table's owner: "
        "an owner bypasses its table's policies unless the table has FORCE ROW LEVEL SECURITY (then ALTER TABLE "
        "<table> NO FORCE ROW LEVEL SECURITY; for the migration's duration).",
        problems,
    )


def check_references_outside_the_selection(facts: PreflightFacts) -> CheckResult:
    """Foreign keys from migrated tables to tables that are not: the copy and the apply write with
    session_replication_role = replica, which checks no foreign key, so the target would hold rows
    referencing rows it lacks, and after the cutover the application's writes would fail on them."""
    name = "references_outside_selection"
    refs = facts.tables.references_outside
    measured = f"{len(refs)} foreign key(s) from selected tables to tables not selected"
    if not refs:
        return CheckResult(name, "pass", measured)
    lacking = [r for r in refs if r.on_target in ("missing", "empty")]
    details = [
        f"{r.table}: {r.constraint} references {r.referenced}, which is not selected and is "
        + {
            "missing": "missing on the target",
            "empty": "empty on the target",
            "has rows": "filled on the target by something other than this migration",
            "unreadable": "unreadable on the target for this role",
        }[r.on_target]
        for r in refs
    ]
    return CheckResult(
        name,
        "fail" if lacking else "warn",
        measured,
        "Select the referenced tables too (tables.include), or leave the referencing tables out. Replication "
        "checks no foreign key on the target: its rows would reference rows it lacks, and after the cutover "
        "the application's inserts and updates of them would fail. A referenced table kept in step some other "
        "way must be complete on the target before the cutover.",
        details,
    )


def check_unlogged_tables(facts: PreflightFacts) -> CheckResult:
    name = "unlogged_tables"
    unlogged = [
        t for t in facts.tables.selected if t in facts.tables.source and facts.tables.source[t].persistence == "u"
    ]
    measured = f"{len(unlogged)} unlogged table(s) selected"
    if not unlogged:
        return CheckResult(name, "pass", measured)
    return CheckResult(
        name,
        "fail",
        measured,
        "Logical decoding does not see unlogged tables: their changes would never reach the target. Make them "
        "logged (ALTER TABLE <table> SET LOGGED; rewrites the table under an exclusive lock) or exclude them "
        "in 'tables.exclude' and handle their contents yourself.",
        [f"{t}: UNLOGGED" for t in unlogged],
    )


def check_writers_the_fence_cannot_stop(facts: PreflightFacts) -> CheckResult:
    """Writers that are no client session: the cutover's fence (source) and a rollback's (target)
    wait for them or refuse, so say so now rather than at the cutover."""
    name = "writers_the_fence_cannot_stop"
    details: list[str] = []
    for side, server in (("source", facts.source), ("target", facts.target)):
        outside = [s for s in server.subscriptions if s not in facts.own_subscriptions]
        if outside:
            details.append(
                f"{side}: subscription(s) {_join(outside)} apply into database {server.database!r}; their workers "
                "ignore the read-only fence, so the "
                + ("cutover" if side == "source" else "rollback after cutover")
                + " refuses while they are enabled"
            )
        if server.read_only_overrides:
            details.append(
                f"{side}: role(s) {_join(server.read_only_overrides)} set default_transaction_read_only themselves "
                "(ALTER ROLE ... SET), which would win over the read-only fence: the "
                + ("cutover" if side == "source" else "rollback after cutover")
                + " refuses while they do (ALTER ROLE <role> [IN DATABASE <db>] RESET default_transaction_read_only)"
            )
        if server.prepared_transactions:
            details.append(
                f"{side}: {server.prepared_transactions} prepared (two-phase) transaction(s) in database "
                f"{server.database!r} not yet committed or rolled back; the fence waits for them (COMMIT PREPARED "
                "is allowed on a read-only database), and gives up after fence_timeout_seconds"
            )
    measured = f"{len(details)} finding(s)"
    if not details:
        return CheckResult(name, "pass", "no other subscription, no pending prepared transaction")
    return CheckResult(
        name,
        "warn",
        measured,
        "Before the cutover, disable the other subscriptions (ALTER SUBSCRIPTION <name> DISABLE) and point what "
        "feeds them at the side that will hold the writer; resolve prepared transactions (COMMIT PREPARED or "
        "ROLLBACK PREPARED by their coordinator).",
        details,
    )


def sessions_needed(facts: PreflightFacts, side: str) -> int:
    """The most client sessions the migration holds on one side at once, beside the control session: the
    parallel copy's workers (a session a side each), or later the validation's chunks (one a side each).
    Replication connections (the slot's, a subscription's, a connector's) count against max_wal_senders."""
    copying = facts.copy_workers if facts.engine == "logical" and facts.copy_method == "parallel-snapshot" else 0
    applier = 1 if side == "target" and facts.engine == "debezium" else 0  # the applier's session
    return 1 + applier + max(copying, facts.validation_sessions)


def check_connection_capacity(facts: PreflightFacts) -> CheckResult:
    """Sessions the migration will open against the role's, the database's and the server's limits: a
    CONNECTION LIMIT is hard (a copy worker or a validation chunk fails to connect), free slots vary with load."""
    name = "connection_capacity"
    hard: list[str] = []
    tight: list[str] = []
    measured: list[str] = []
    for side, server in (("source", facts.source), ("target", facts.target)):
        c = server.connections
        needed = sessions_needed(facts, side)
        # This preflight's own session ends before the migration's open. Both limits also count replication
        # connections (the source's walsenders: the slot's, and a table sync's per sync worker of the
        # subscription copy), max_connections does not; superusers are exempt from both.
        syncing = facts.copy_method == "subscription" and facts.engine == "logical"
        walsenders = 1 + (facts.target.max_sync_workers_per_subscription if syncing else 0)
        opens = needed + (walsenders if side == "source" else 0)
        limits = (
            (f"role {server.role.name}", c.role_limit, c.role_used - 1),
            (f"database {server.database}", c.database_limit, c.database_used - 1),
        )
        for what, limit, used in limits:
            if not server.role.superuser and limit >= 0 and used + opens > limit:
                hard.append(
                    f"{side}: {what} has CONNECTION LIMIT {limit} with {used} session(s) open; the migration opens "
                    f"up to {opens}"
                )
        usable = c.max_connections - (0 if server.role.superuser else c.reserved)
        free = usable - (c.used - 1)
        measured.append(f"{side} needs up to {needed}, {free} of {c.max_connections} free")
        if needed > free:
            tight.append(
                f"{side}: {free} of max_connections {c.max_connections} free for role {server.role.name} "
                f"({c.used - 1} in use{'' if server.role.superuser else f', {c.reserved} kept for superusers'}); "
                f"the migration opens up to {needed}"
            )
    summary = "; ".join(measured)
    if not hard and not tight:
        return CheckResult(name, "pass", summary)
    return CheckResult(
        name,
        "fail" if hard else "warn",
        summary,
        "Make room for the migration's sessions: raise the CONNECTION LIMIT named (ALTER ROLE <role> CONNECTION "
        "LIMIT <n>; ALTER DATABASE <db> CONNECTION LIMIT <n>;), or lower logical.copy_workers and "
        "validation.max_parallel_chunks (the sessions a side are 1 + the larger of the two). Free sessions vary "
        "with the applications' load; max_connections needs a restart (on RDS: the parameter group, then reboot).",
        hard + tight,
    )


def check_open_transactions(facts: PreflightFacts) -> CheckResult:
    """Transactions a new replication slot on the source would wait for: the start fails after
    `logical.slot_wait_seconds` naming them (the logical engine), or hangs (a connector creating its slot)."""
    name = "open_transactions"
    source = facts.source
    open_now = source.open_write_transactions
    seen = (
        "" if source.sees_all_sessions else f" (of role {source.role.name}'s own sessions only: no pg_read_all_stats)"
    )
    measured = (
        f"{len(open_now)} transaction(s) on the source holding a transaction id for over "
        f"{LONG_TRANSACTION_SECONDS:.0f} s, or prepared{seen}"
    )
    if not open_now:
        return CheckResult(name, "pass", measured)
    return CheckResult(
        name,
        "warn",
        measured,
        "Creating the replication slot waits until every transaction holding a transaction id when it starts has "
        "ended (in every database of the server). End or finish these before starting (a session: "
        "SELECT pg_terminate_backend(<pid>); a prepared transaction: COMMIT PREPARED or ROLLBACK PREPARED "
        "'<gid>'), or the logical engine's start fails after logical.slot_wait_seconds, naming them.",
        [b.describe() for b in open_now],
    )


def check_triggers_firing_on_replication(facts: PreflightFacts) -> CheckResult:
    """Triggers that replication's writes fire: the copy and apply run as session_replication_role = replica,
    which skips ordinary triggers but not those set ENABLE ALWAYS or ENABLE REPLICA."""
    name = "triggers_firing_on_replication"
    found = [f"target: {t}" for t in facts.tables.target_replica_triggers]
    found += [f"source: {t}" for t in facts.tables.source_replica_triggers]
    if not found:
        return CheckResult(name, "pass", "no trigger on the selected tables fires on replicated writes")
    return CheckResult(
        name,
        "warn",
        f"{len(found)} trigger(s) fire on replicated writes",
        "On the target they fire for every copied and applied row, on the source for every row the replication "
        "back applies after the cutover: a trigger that writes another table writes it a second time (a "
        "replicated table then collides with its replicated rows and the apply stops), one that changes NEW "
        "leaves the two databases different, and one naming tables without their schema fails under the apply "
        "worker's empty search_path, which stops the apply. Unless that is meant, ALTER TABLE <table> ENABLE TRIGGER <trigger> "
        "(fires for the application's writes only) before starting.",
        found,
    )


def check_target_schema(facts: PreflightFacts) -> CheckResult:
    name = "target_schema"
    tables = facts.tables
    findings: list[tuple[Status, str]] = []
    missing_tables = 0
    for table in tables.selected:
        source = tables.source.get(table)
        if source is None:
            continue
        target = tables.target.get(table)
        if target is None:
            missing_tables += 1
            findings.append(("fail", f"{table}: table missing on the target"))
            continue
        findings.extend(compare_table(source, target))
    findings += [
        ("warn", f"{c}: only on the target (a source row that breaks it stops the copy or the apply)")
        for c in tables.target_only_constraints
    ]
    status = _worst(s for s, _ in findings)
    measured = (
        f"{len(tables.selected) - missing_tables} of {len(tables.selected)} selected tables exist on the target; "
        f"{sum(1 for s, _ in findings if s == 'fail')} blocking and {sum(1 for s, _ in findings if s == 'warn')} "
        "other differences"
    )
    if status == "pass":
        return CheckResult(name, "pass", measured)
    details = [f"{s.upper()}: {text}" for s, text in findings]
    remedy = (
        "Create the schema on the target before starting (pg_dump --schema-only --no-publications "
        "--no-subscriptions on the source, restored on the target), then fix each listed difference: "
        "missing tables and columns make the apply stop, a different type or a NOT NULL that the source does "
        "not have rejects rows, an extra NOT NULL column without a default rejects every insert."
        if status == "fail"
        else "Not blocking: replication copies these rows, but the schemas differ; align them if the "
        "application expects the source's definition after cutover."
    )
    return CheckResult(name, status, measured, remedy, details)


def check_target_empty(facts: PreflightFacts) -> CheckResult:
    name = "target_empty"
    tables = facts.tables
    present = [t for t in tables.selected if t in tables.target]
    rows = tables.target_rows
    measured = f"{len(rows)} of {len(present)} target tables hold rows" + (
        f"; {len(tables.target_unreadable)} could not be read" if tables.target_unreadable else ""
    )
    if rows:
        details = [
            f"{t}: {'more than ' + str(TARGET_ROW_COUNT_CAP) if n > TARGET_ROW_COUNT_CAP else n} row(s)"
            for t, n in sorted(rows.items())
        ]
        return CheckResult(
            name,
            "fail",
            measured,
            "The initial copy needs empty target tables: existing rows collide with copied keys or are "
            "duplicated. If they are left over from an earlier attempt or a test, empty them on the target: "
            f"TRUNCATE {_join(sorted(rows))}; otherwise exclude these tables.",
            details,
        )
    if tables.target_unreadable:
        return CheckResult(
            name,
            "warn",
            measured,
            "The target role may not SELECT from these tables, so they could not be checked for rows: grant "
            "SELECT on them to the target role, or check them yourself.",
            [f"{t}: not readable by the target role" for t in tables.target_unreadable],
        )
    return CheckResult(name, "pass", measured)


def check_extensions(facts: PreflightFacts) -> CheckResult:
    name = "extensions"
    src, tgt = facts.source.extensions, facts.target.extensions
    missing = sorted(set(src) - set(tgt) - {"plpgsql"})
    versions = sorted(e for e in set(src) & set(tgt) if src[e] != tgt[e] and e != "plpgsql")
    measured = f"{len(src)} extension(s) on the source, {len(missing)} missing on the target"
    if missing:
        details = []
        for ext in missing:
            if ext in facts.target.available_extensions:
                details.append(f"{ext} {src[ext]}: available on the target, run CREATE EXTENSION {ext};")
            else:
                details.append(
                    f"{ext} {src[ext]}: not available on the target server: install its package"
                    + (" (on RDS: check that your engine version supports it)" if facts.target.is_rds else "")
                )
        return CheckResult(
            name,
            "fail",
            measured,
            f"In the target database run CREATE EXTENSION for {_join(missing)} (before creating the schema: "
            "their types and functions are used by it).",
            details,
        )
    if versions:
        return CheckResult(
            name,
            "warn",
            measured,
            "Extension versions differ: run ALTER EXTENSION <name> UPDATE on the older side if the schema "
            "or application relies on the newer behaviour.",
            [f"{e}: {src[e]} on the source, {tgt[e]} on the target" for e in versions],
        )
    return CheckResult(name, "pass", measured)


def check_partitions(facts: PreflightFacts) -> CheckResult:
    name = "partitions"
    tables = facts.tables
    selected = set(tables.selected)
    infos = [tables.source[t] for t in tables.selected if t in tables.source]
    roots = [
        i for i in infos if i.relkind == "p" and (i.partition_parent is None or i.partition_parent not in selected)
    ]
    children = [i for i in infos if i.is_partition]
    orphans = [i for i in children if i.partition_parent not in selected]
    # Plain inheritance: every table holds its own rows (copied and published with ONLY).
    left_out = [(i, [c for c in i.inheritance_children if c not in selected]) for i in infos]
    left_out = [(i, kids) for i, kids in left_out if kids]
    measured = f"{len(roots)} partitioned root(s), {len(children)} partition(s) selected"
    if left_out:
        measured += f", {len(left_out)} table(s) with inheritance children not selected"
    details = [
        f"{i.name}: partitioned; replicates through its root (publish_via_partition_root = true), so the target "
        "may partition it differently"
        for i in roots
    ]
    details += [
        f"{i.name}: partition of {i.partition_parent}, replicates through it" for i in children if i not in orphans
    ]
    details += [
        f"{i.name}: inherits from {i.partition_parent} (plain inheritance): replicates as a table of its own"
        for i in infos
        if i.partition_parent is not None and not i.is_partition
    ]
    details += [
        f"{i.name}: its inheritance children {_join(kids)} are not selected: their rows (which `SELECT FROM "
        f"{i.name}` also shows) are not migrated"
        for i, kids in left_out
    ]
    if left_out and not orphans:
        return CheckResult(
            name,
            "warn",
            measured,
            "Under plain inheritance each child holds its own rows: select the children too "
            f"({_join(sorted({str(c) for _, kids in left_out for c in kids}))}) in 'tables.include', or exclude "
            "them knowingly.",
            details,
        )
    if orphans:
        details += [f"{i.name}: partition of {i.partition_parent}, which is not selected" for i in orphans]
        return CheckResult(
            name,
            "warn",
            measured,
            "A partition selected without its parent replicates as a table of its own: the target needs a table "
            "of that name, and rows routed through the parent on the target will not match. Prefer selecting the "
            f"partitioned parent ({_join(sorted({str(i.partition_parent) for i in orphans}))}) in 'tables.include'.",
            details,
        )
    return CheckResult(name, "pass", measured, "", details)


def check_sequences(facts: PreflightFacts) -> CheckResult:
    name = "sequences"
    uses = facts.tables.sequences
    unowned = [u for u in uses if not u.owned]
    measured = (
        f"{len({u.sequence for u in uses})} sequence(s) used by selected tables, "
        f"{len({u.sequence for u in unowned})} owned by no column"
    )
    problems = [
        f"{seq}: missing on the target (the cutover sets it there)" for seq in facts.tables.target_missing_sequences
    ]
    problems += [
        f"{seq}: the source role may not read it (GRANT SELECT ON SEQUENCE {seq} TO {facts.source.role.name};)"
        for seq in facts.tables.source_unreadable_sequences
    ]
    problems += [
        f"{seq}: the target role may not read and set it "
        f"(GRANT SELECT, UPDATE ON SEQUENCE {seq} TO {facts.target.role.name};)"
        for seq in facts.tables.target_unwritable_sequences
    ]
    if problems:
        return CheckResult(
            name,
            "fail",
            measured,
            "The cutover copies every listed sequence's position from the source to the target while writes are "
            "fenced; it fails on these. Create the missing sequences on the target as on the source (pg_dump "
            "--schema-only includes them) and grant what is listed.",
            problems,
        )
    if not unowned:
        return CheckResult(name, "pass", measured)
    return CheckResult(
        name,
        "warn",
        measured,
        "Logical replication does not carry sequence values; the cutover copies them all, these included "
        "(plus cutover.sequence_margin). Make sure each exists on the target (pg_dump --schema-only includes "
        "it) and that nothing on the target draws from it before cutover. To tie one to its column: "
        "ALTER SEQUENCE <sequence> OWNED BY <table>.<column>.",
        [f"{u.sequence}: used in the default of {u.table}.{u.column}, owned by no column" for u in unowned],
    )


def check_materialized_views(facts: PreflightFacts) -> CheckResult:
    """Neither the copy nor replication fills a materialized view: the migration refreshes the selected ones
    on the target before reads move (`matviews`). One the target lacks, or whose owner the target's role is
    not, would stop it there."""
    name = "materialized_views"
    include, exclude = facts.tables.include, facts.tables.exclude
    selected = selected_views(facts.source.materialized_views, include, exclude)
    on_target = {v.name: v for v in selected_views(facts.target.materialized_views, include, exclude)}
    left_out = [v.name for v in facts.source.materialized_views if v not in selected]
    missing = [v.name for v in selected if v.name not in on_target]
    not_owned = [v.name for v in selected if v.populated and v.name in on_target and not on_target[v.name].owned]
    measured = (
        f"{len(selected)} selected materialized view(s), {sum(v.populated for v in selected)} to refresh on the "
        "target before reads move" + (f"; {len(left_out)} not selected" if left_out else "")
    )
    if missing or not_owned:
        details = [f"{v}: missing on the target" for v in missing] + [
            f"{v}: the target's role {facts.target.role.name} is not its owner (REFRESH needs the owner)"
            for v in not_owned
        ]
        return CheckResult(
            name,
            "fail",
            measured,
            "Create the missing views on the target (pg_dump --schema-only restores them), and let the target's "
            "role refresh the others: ALTER MATERIALIZED VIEW <view> OWNER TO <role>, or GRANT <owner> TO <role>.",
            details,
        )
    if left_out:
        return CheckResult(
            name,
            "warn",
            measured,
            "tables.include/exclude do not match these views: the migration leaves them as they are on the target, "
            "unpopulated (or computed over empty tables) until you REFRESH them there; do it before reads move, "
            "or add them to tables.include.",
            [str(v) for v in left_out],
        )
    return CheckResult(name, "pass", measured)


def _is_lo_type(type_name: str) -> bool:
    return type_name == "oid" or type_name.rsplit(".", 1)[-1] == "lo"


def check_large_objects(facts: PreflightFacts) -> CheckResult:
    name = "large_objects"
    columns = [
        f"{info.name}.{col.name} ({col.type})"
        for t in facts.tables.selected
        if (info := facts.tables.source.get(t)) is not None
        for col in info.columns
        if _is_lo_type(col.type)
    ]
    count = facts.source.large_objects
    shown = "unknown" if count is None else (f"at least {count}" if count >= LARGE_OBJECT_COUNT_CAP else str(count))
    measured = f"{shown} large object(s) in the source database, {len(columns)} oid/lo column(s) selected"
    details = list(columns)
    if count:
        details.append(f"pg_largeobject_metadata holds {shown} large object(s)")
    remedy = (
        "Large objects (pg_largeobject) are not replicated by logical decoding: the target would hold "
        "references to objects that do not exist. Move the contents into bytea columns before migrating "
        "(e.g. ALTER TABLE <table> ADD COLUMN data bytea; UPDATE <table> SET data = lo_get(<oid column>)), or "
        "exclude these tables and copy the large objects separately during a write freeze "
        "(pg_dump --large-objects)."
    )
    if columns:
        return CheckResult(name, "fail", measured, remedy, details)
    if count:
        return CheckResult(
            name,
            "warn",
            measured,
            "No selected column references large objects by type, but the database holds some: if the "
            "application stores their oids in other columns, they will be missing on the target. " + remedy,
            details,
        )
    if count is None:
        return CheckResult(
            name,
            "warn",
            measured,
            "The source role may not read pg_largeobject_metadata: check with a superuser that "
            "SELECT count(*) FROM pg_largeobject_metadata returns 0.",
            ["pg_largeobject_metadata not readable"],
        )
    return CheckResult(name, "pass", measured)


# --- WAL retention ---------------------------------------------------------------------------


def check_cutover_engine(facts: PreflightFacts) -> CheckResult:
    """Whether the cutover can wait for this engine to apply everything up to the fence position."""
    name = "cutover_engine"
    if facts.engine != "dms":
        return CheckResult(name, "pass", f"engine {facts.engine}: the cutover waits for an exact position")
    return CheckResult(
        name,
        "warn",
        "engine dms: the cutover waits for a marker row written after the fence to reach the target, then for "
        f"the task to stop (up to {DMS_STOP_TIMEOUT_SECONDS:g} s), writes paused meanwhile",
        "DMS exposes no applied position, so the cutover writes a row into _zdm.dms_fence_markers on the source "
        "after the fence and waits until the task has applied it; the task is then stopped before the replication "
        "back starts, and stopping a DMS task takes tens of seconds: the write pause lasts that long (not measured "
        "on AWS). For a pause of a second or less use engine logical (PostgreSQL to PostgreSQL).",
    )


def check_copy_fits_the_function(facts: PreflightFacts) -> CheckResult:
    """On AWS the parallel-snapshot copy runs inside one Replication function invocation (its snapshot
    cannot outlive the session that exported it): a copy longer than the function would be stopped."""
    name = "copy_fits_the_function"
    limit = facts.copy_time_limit_seconds
    if limit is None or facts.engine != "logical" or facts.copy_method != "parallel-snapshot":
        return CheckResult(name, "pass", "no time limit on the copy here")
    mb_per_s = facts.expected_copy_mb_per_s
    seconds = facts.tables.copy_bytes / (mb_per_s * 1024 * 1024)
    measured = (
        f"copy of {fmt_bytes(facts.tables.copy_bytes)} at {mb_per_s:g} MB/s takes ~{fmt_seconds(seconds)}; "
        f"the Replication function has {fmt_seconds(limit)} for it"
    )
    if seconds <= limit / 2:
        return CheckResult(name, "pass", measured)
    return CheckResult(
        name,
        "fail" if seconds > limit else "warn",
        measured,
        "Set engine.logical.copy_method: subscription (PostgreSQL's own table sync copies on the target "
        "server, with no function time limit), or, if you measured a faster copy, set "
        "engine.logical.expected_copy_mb_per_s to it.",
    )


def check_wal_retention(facts: PreflightFacts) -> CheckResult:
    """The slot keeps all WAL written during the copy: does the limit (or the disk) allow that much?"""
    name = "wal_retention"
    mb_per_s = facts.expected_copy_mb_per_s
    copy_seconds = facts.tables.copy_bytes / (mb_per_s * 1024 * 1024)
    rate = facts.wal.bytes_per_second
    expected = rate * copy_seconds
    limit = facts.source.max_slot_wal_keep_size
    free = facts.free_disk_bytes
    measured = (
        f"copy of {fmt_bytes(facts.tables.copy_bytes)} at {mb_per_s:g} MB/s takes ~{fmt_seconds(copy_seconds)}; "
        f"WAL rate {fmt_bytes(rate)}/s (sampled over {facts.wal.seconds:.1f} s) -> ~{fmt_bytes(expected)} retained; "
        f"max_slot_wal_keep_size={'unlimited' if limit is None else fmt_bytes(limit)}; "
        f"free disk {'unknown' if free is None else fmt_bytes(free)}"
    )
    details = [
        f"estimated copy time: {fmt_seconds(copy_seconds)} ({fmt_bytes(facts.tables.copy_bytes)} / "
        f"engine.logical.expected_copy_mb_per_s={mb_per_s:g})",
        f"WAL generation rate: {fmt_bytes(rate)}/s, measured over {facts.wal.seconds:.1f} s; measure at peak write "
        "time, the rate may be higher then",
        f"WAL retained by the slot during the copy: ~{fmt_bytes(expected)}",
    ]
    needed = int(expected * WAL_MARGIN) + 1
    disk_to_check = max(needed, MIN_FREE_DISK_ADVICE)
    if limit is not None:
        if expected > limit:
            return CheckResult(
                name,
                "fail",
                measured,
                f"max_slot_wal_keep_size ({fmt_bytes(limit)}) is smaller than the ~{fmt_bytes(expected)} of WAL the "
                "slot must keep during the copy: the server would invalidate the slot and the migration would have "
                f"to start over. Raise it to at least {fmt_bytes(needed)} "
                + (
                    "(DB parameter group, no reboot needed)"
                    if facts.source.is_rds
                    else f"(ALTER SYSTEM SET max_slot_wal_keep_size = '{needed // (1024 * 1024) + 1}MB'; "
                    "SELECT pg_reload_conf();)"
                )
                + ", or copy faster (more engine.logical.copy_workers, copy at a quieter time) and set "
                "expected_copy_mb_per_s to the speed you measured.",
                details,
            )
        if free is not None and expected > free:
            return CheckResult(
                name,
                "fail",
                measured,
                f"The ~{fmt_bytes(expected)} of WAL kept during the copy exceeds the {fmt_bytes(free)} free on the "
                "source's disk: grow the volume (on RDS: allocated storage) or copy at a quieter time.",
                details,
            )
        if expected * WAL_MARGIN > limit:
            return CheckResult(
                name,
                "warn",
                measured,
                f"Less than {WAL_MARGIN:g}x headroom under max_slot_wal_keep_size: a busier hour or a slower copy "
                f"invalidates the slot. Raise it to at least {fmt_bytes(needed)}.",
                details,
            )
        return CheckResult(name, "pass", measured)
    if free is None:
        return CheckResult(
            name,
            "warn",
            measured,
            f"max_slot_wal_keep_size is unlimited, so the slot may fill the source's disk, and free disk space "
            f"could not be measured from here. Check that the volume holding the source's pg_wal has more than "
            f"{fmt_bytes(disk_to_check)} free (on RDS: the CloudWatch metric FreeStorageSpace); consider setting "
            "max_slot_wal_keep_size as a safety limit.",
            details,
        )
    if expected > free:
        return CheckResult(
            name,
            "fail",
            measured,
            f"The ~{fmt_bytes(expected)} of WAL kept during the copy exceeds the {fmt_bytes(free)} free on the "
            "source's disk, and max_slot_wal_keep_size is unlimited: the source would run out of disk and stop. "
            "Grow the volume, copy faster or at a quieter time.",
            details,
        )
    if expected * WAL_MARGIN > free:
        return CheckResult(
            name,
            "warn",
            measured,
            f"Less than {WAL_MARGIN:g}x headroom on the source's disk for the WAL kept during the copy: grow the "
            f"volume to have at least {fmt_bytes(needed)} free, or set max_slot_wal_keep_size as a safety limit.",
            details,
        )
    return CheckResult(name, "pass", measured)


Check = Callable[[PreflightFacts], CheckResult]

CHECKS: tuple[Check, ...] = (
    check_server_version,
    check_wal_level,
    check_source_replication_slots,
    check_source_wal_senders,
    check_target_subscription_capacity,
    check_reverse_replication,
    check_source_role,
    check_target_role,
    check_apply_position_rights,
    check_cutover_rights,
    check_subscription_password_logging,
    check_slot_names,
    check_earlier_attempt,
    check_read_only_fence,
    check_database_encoding,
    check_table_selection,
    check_references_outside_the_selection,
    check_replica_identity,
    check_change_stream_types,
    check_unlogged_tables,
    check_row_level_security,
    check_writers_the_fence_cannot_stop,
    check_open_transactions,
    check_connection_capacity,
    check_target_schema,
    check_triggers_firing_on_replication,
    check_target_empty,
    check_extensions,
    check_partitions,
    check_sequences,
    check_large_objects,
    check_materialized_views,
    check_copy_fits_the_function,
    check_cutover_engine,
    check_wal_retention,
)


def evaluate(facts: PreflightFacts) -> PreflightReport:
    """Run every check over the facts."""
    return PreflightReport([check(facts) for check in CHECKS])
