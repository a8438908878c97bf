"""The change stream's local runtime: the connector and the applier as processes beside a local broker.

The same ChangeStreamRuntime interface MSK Connect and the applier Lambda implement on AWS
(lambdas/core/changestream/msk_runtime.py). Each part runs in a folder of its own under
`workdir`; the connector keeps its offsets there, so starting it again resumes the stream
without a new snapshot. Config files hold the database password and are readable by the owner only.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from psycopg2.extensions import parse_dsn

from lambdas.core.changestream.connector import (
    connector_properties,
    dead_letter_topic,
    heartbeat_topic,
    message_topic,
    publication_name,
    slot_name,
)
from lambdas.core.changestream.kafka import KafkaStream
from lambdas.core.changestream.runtime import ChangeStreamRuntime, PartState, RuntimeHealth
from lambdas.core.config import Migration
from lambdas.core.engines.debezium import DebeziumEngine, DebeziumPlan
from lambdas.core.tables import TableName
from rehearsal.processes import OwnedProcess, running_in, start_process

CONNECTOR = "connector"
APPLIER = "applier"
_PAUSED = "paused"


@dataclass(frozen=True)
class LocalStreamSettings:
    """What the local runtime needs besides the connector settings (the ZDM_CHANGE_STREAM env, backend 'local')."""

    workdir: str
    bootstrap: str
    target_dsn: str
    prefix: str
    tables: tuple[str, ...]
    batch_size: int = 2000  # the migration file's default (engine.debezium.batch_size)
    batch_window_seconds: float = 0.2
    group_id: str = "zdm-applier"
    # Applier processes, each with its own share of the table topics (as the AWS side has one event
    # source mapping per topic): tables are independent (foreign keys are not checked per change).
    # 0: one per table, at most one more than the CPUs (`applier_count`): one applier's Python work
    # runs while another's target backend writes (bench/apply.py on 2 CPUs: about 0.8 of native
    # apply's rate with three, 0.6 with two, 0.45-0.5 with one).
    appliers: int = 0
    # How often the local connector stores its offsets (MSK Connect's workers: every 60 s). A connector
    # killed before storing any after its snapshot takes the snapshot again when it restarts.
    offset_flush_ms: int = 1000

    @property
    def applier_count(self) -> int:
        if self.appliers > 0:
            return self.appliers
        return max(1, min(len(self.tables), (os.cpu_count() or 1) + 1))

    def to_json(self) -> str:
        return json.dumps({"backend": "local", **asdict(self)})

    @classmethod
    def from_json(cls, raw: Mapping[str, object]) -> LocalStreamSettings:
        fields = {k: v for k, v in raw.items() if k != "backend"}
        fields["tables"] = tuple(fields.get("tables", ()))  # type: ignore[arg-type]
        return cls(**fields)  # type: ignore[arg-type]


def _write_private(path: Path, content: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(content)


class LocalChangeStream(ChangeStreamRuntime):
    def __init__(self, settings: LocalStreamSettings) -> None:
        self.settings = settings
        self.workdir = Path(settings.workdir)
        self.kafka = KafkaStream({"bootstrap.servers": settings.bootstrap})

    def _dir(self, part: str) -> Path:
        return self.workdir / part

    def process(self, part: str) -> OwnedProcess | None:
        return running_in(self._dir(part))

    @property
    def parts(self) -> list[str]:
        """The connector, then the appliers: 'applier' (with the heartbeats), 'applier-1', ..."""
        return [CONNECTOR, APPLIER, *(f"{APPLIER}-{i}" for i in range(1, self.settings.applier_count))]

    def _tables_of(self, part: str) -> list[str]:
        index = 0 if part == APPLIER else int(part.rsplit("-", 1)[1])
        return [t for i, t in enumerate(self.settings.tables) if i % self.settings.applier_count == index]

    def start(self, connector: Mapping[str, str], topics: Sequence[str]) -> None:
        prefix = self.settings.prefix
        self.kafka.ensure_topics([*topics, message_topic(prefix), heartbeat_topic(prefix), dead_letter_topic(prefix)])
        for part in self.parts[1:]:
            self.start_part(part, connector, topics)
        self.start_part(CONNECTOR, connector, topics)

    def start_part(self, part: str, connector: Mapping[str, str], topics: Sequence[str]) -> OwnedProcess:
        """Start one part unless it runs (again in its folder after a stop or a crash)."""
        running = self.process(part)
        if running is not None:
            return running
        directory = self._dir(part)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / _PAUSED).unlink(missing_ok=True)
        config = directory / "config.json"
        if part == CONNECTOR:
            _write_private(
                config,
                json.dumps(
                    {
                        "bootstrap": self.settings.bootstrap,
                        "properties": dict(connector),
                        "offset_flush_ms": self.settings.offset_flush_ms,
                    }
                ),
            )
            module = "rehearsal.connector_process"
        else:
            s = self.settings
            _write_private(
                config,
                json.dumps(
                    {
                        "bootstrap": s.bootstrap,
                        "target_dsn": s.target_dsn,
                        "prefix": s.prefix,
                        "tables": self._tables_of(part),
                        "heartbeats": part == APPLIER,
                        "dead_letter_topic": dead_letter_topic(s.prefix),
                        "batch_size": s.batch_size,
                        "batch_window_seconds": s.batch_window_seconds,
                        "group_id": s.group_id if part == APPLIER else f"{s.group_id}-{part}",
                    }
                ),
            )
            module = "rehearsal.applier_process"
        return start_process(part, [sys.executable, "-m", module, str(config)], directory=directory)

    def health(self) -> RuntimeHealth:
        states: dict[str, PartState] = {}
        problems: list[str] = []
        for part in self.parts:
            directory = self._dir(part)
            if self.process(part) is not None:
                states[part] = PartState.RUNNING
            elif (directory / _PAUSED).exists():
                states[part] = PartState.PAUSED
            elif (directory / "process.pid").exists():
                states[part] = PartState.FAILED
                tail = (
                    (directory / "process.log").read_text(errors="replace")[-600:]
                    if (directory / "process.log").exists()
                    else ""
                )
                problems.append(
                    f"the {part} process exited: {tail.strip().splitlines()[-1] if tail.strip() else 'no log'}"
                )
            else:
                states[part] = PartState.ABSENT
        appliers = [states[p] for p in self.parts[1:]]
        worst = next((st for st in (PartState.FAILED, PartState.ABSENT, PartState.PAUSED) if st in appliers), None)
        return RuntimeHealth(states[CONNECTOR], worst or PartState.RUNNING, problems)

    def stop(self) -> None:
        for part in self.parts:  # the connector first: nothing new to apply after it
            directory = self._dir(part)
            running = self.process(part)
            if running is not None:
                running.stop(remove=False)
            if directory.exists():
                (directory / _PAUSED).touch()

    def teardown(self) -> list[str]:
        removed = []
        for part in self.parts:
            directory = self._dir(part)
            running = self.process(part)
            if running is not None:
                running.stop(remove=True)
                removed.append(f"local {part} process")
            if directory.exists():
                import shutil

                shutil.rmtree(directory, ignore_errors=True)
        return removed


def local_connector(migration: Migration, tables: Sequence[TableName], source_dsn: str) -> dict[str, str]:
    """The connector's settings for a local source named by its DSN (the password, if any, stays in them)."""
    parsed = parse_dsn(source_dsn)
    return connector_properties(
        migration,
        tables,
        host=parsed.get("host", "127.0.0.1"),
        port=int(parsed.get("port", 5432)),
        dbname=parsed.get("dbname", "postgres"),
        user=parsed.get("user", "postgres"),
        password=parsed.get("password", ""),
    )


def local_engine(
    migration: Migration,
    source_dsn: str,
    target_dsn: str,
    tables: Sequence[TableName],
    settings: LocalStreamSettings,
) -> DebeziumEngine:
    """The debezium engine over the local runtime: what the rehearsal's handlers, tests and benches drive."""
    plan = DebeziumPlan(
        migration.topic_prefix,
        slot_name(migration),
        publication_name(migration),
        tuple(tables),
        local_connector(migration, tables, source_dsn),
        migration.engine.logical.lock_wait_seconds,
    )
    kafka = KafkaStream({"bootstrap.servers": settings.bootstrap})
    return DebeziumEngine(source_dsn, target_dsn, plan, LocalChangeStream(settings), kafka)


def standalone_engine(
    name: str,
    source_dsn: str,
    target_dsn: str,
    bootstrap: str,
    workdir: Path,
    tables: Sequence[TableName],
    *,
    debezium: Mapping[str, object] | None = None,
    **stream: object,
) -> DebeziumEngine:
    """A debezium engine outside a migration file (tests, benches): the settings of a migration named
    `name` (its topic prefix) with `debezium` overrides, the local runtime in `workdir` with `stream`'s
    LocalStreamSettings fields."""
    migration = Migration.model_validate(
        {
            "name": name,
            # the endpoints are given as DSNs below; the file's own are not read
            "source": {"dsn": "host=127.0.0.1 dbname=x user=postgres"},
            "target": {"dsn": "host=127.0.0.1 dbname=y user=postgres"},
            "engine": {"type": "debezium", "debezium": dict(debezium or {})},
        }
    )
    settings = LocalStreamSettings(
        workdir=str(workdir),
        bootstrap=bootstrap,
        target_dsn=target_dsn,
        prefix=migration.topic_prefix,
        tables=tuple(str(t) for t in tables),
        **stream,  # type: ignore[arg-type]
    )
    return local_engine(migration, source_dsn, target_dsn, tables, settings)
