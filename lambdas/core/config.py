"""The migration file: YAML parsed into typed, validated models.

A bad file never gets half-used: `load_migration` either returns a complete `Migration`
or raises `MigrationFileError` carrying one message per problem, each naming the field
path and what to do about it.
"""

from __future__ import annotations

import difflib
import ipaddress
import itertools
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from psycopg2.extensions import parse_dsn
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,39}$")
_ARN_RE = re.compile(r"^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:\d{12}:secret:.+$")
_PATTERN_RE = re.compile(r"^[A-Za-z0-9_*?$\[\]-]+\.[A-Za-z0-9_*?$\[\]-]+$")
_RDS_ID_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9-]{0,62}$")
_KMS_ARN_RE = re.compile(r"^arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{12}:key/[a-zA-Z0-9-]+$")
_AWS_ENDPOINT_FIELDS = ("rds_cluster_identifier", "rds_instance_identifier", "secret_kms_key_arn")


class _Model(BaseModel):
    # strict: a YAML `yes` is not the number 1; no .inf or .nan (not JSON: Step Functions cannot read them)
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class Endpoint(_Model):
    """A database: either a libpq DSN (local runs) or a Secrets Manager secret plus address (AWS)."""

    dsn: SecretStr | None = Field(default=None, description="libpq connection string; holds the password, never logged")
    secret_arn: str | None = Field(default=None, description="Secrets Manager ARN with the credentials")
    host: str | None = None
    port: int = Field(default=5432, ge=1, le=65535)
    database: str | None = None
    rds_cluster_identifier: str | None = Field(
        default=None, description="Aurora cluster behind `host`: the RDS Proxy target and the database alarms"
    )
    rds_instance_identifier: str | None = Field(
        default=None, description="RDS instance behind `host` (when it is not an Aurora cluster)"
    )
    secret_kms_key_arn: str | None = Field(
        default=None, description="customer managed KMS key encrypting the secret (readers are granted kms:Decrypt)"
    )

    @field_validator("dsn")
    @classmethod
    def _parsable_dsn(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            try:
                parse_dsn(value.get_secret_value())
            except Exception:  # libpq's message quotes the string: never shown
                raise ValueError(
                    "'dsn' is not a libpq connection string (not shown: it may hold a password); write "
                    'key=value pairs, quoting values with spaces or quotes, e.g. "host=db port=5432 '
                    "dbname=orders user=app password='a b'\""
                ) from None
        return value

    @model_validator(mode="after")
    def _one_form(self) -> Endpoint:
        if self.dsn is not None and self.secret_arn is not None:
            raise ValueError(
                "give either 'dsn' (local runs) or 'secret_arn' with 'host' and 'database' (AWS), not both"
            )
        if self.dsn is None and self.secret_arn is None:
            raise ValueError(
                "missing connection: add 'dsn: \"host=... port=... dbname=... user=...\"' for a local "
                "run, or 'secret_arn', 'host' and 'database' for AWS"
            )
        if self.secret_arn is not None:
            if not _ARN_RE.match(self.secret_arn):
                raise ValueError(
                    "'secret_arn' is not a Secrets Manager ARN: expected "
                    "'arn:aws:secretsmanager:<region>:<account>:secret:<name>'"
                )
            missing = [f for f in ("host", "database") if getattr(self, f) is None]
            if missing:
                raise ValueError(
                    f"with 'secret_arn' also give {', '.join(repr(m) for m in missing)} "
                    "(the secret holds only the credentials)"
                )
        aws_only = [f for f in _AWS_ENDPOINT_FIELDS if getattr(self, f) is not None]
        if self.dsn is not None and aws_only:
            raise ValueError(
                f"{', '.join(repr(f) for f in aws_only)} describe an AWS database; with 'dsn' (local runs) leave them out"
            )
        if self.rds_cluster_identifier is not None and self.rds_instance_identifier is not None:
            raise ValueError(
                "give 'rds_cluster_identifier' (Aurora) or 'rds_instance_identifier' (RDS instance), not both"
            )
        for field in ("rds_cluster_identifier", "rds_instance_identifier"):
            value = getattr(self, field)
            if value is not None and not _RDS_ID_RE.match(value):
                raise ValueError(
                    f"{field} {value!r} is not an RDS identifier: 1-63 letters, digits and '-', "
                    "starting with a letter (the first label of the endpoint's DNS name)"
                )
        if self.secret_kms_key_arn is not None and not _KMS_ARN_RE.match(self.secret_kms_key_arn):
            raise ValueError(
                "'secret_kms_key_arn' is not a KMS key ARN: expected 'arn:aws:kms:<region>:<account>:key/<key id>'"
            )
        return self


class TableSelection(_Model):
    """Which tables migrate. Patterns are 'schema.table' with shell wildcards (* ? [..])."""

    include: list[str] = Field(default_factory=lambda: ["public.*"], min_length=1)
    exclude: list[str] = Field(default_factory=list)

    @field_validator("include", "exclude")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        for pattern in value:
            if not _PATTERN_RE.match(pattern):
                raise ValueError(
                    f"pattern {pattern!r} must be 'schema.table' (wildcards * ? allowed), "
                    "e.g. 'public.orders' or 'sales.*'"
                )
        return value


class LogicalSettings(_Model):
    """Native logical replication (publication + subscription)."""

    copy_method: Literal["parallel-snapshot", "subscription"] = Field(
        default="parallel-snapshot",
        description="parallel-snapshot: key ranges copied in parallel from the slot's exported "
        "snapshot, then streaming from that slot; subscription: PostgreSQL's own table sync",
    )
    copy_workers: int = Field(default=4, ge=1, le=64)
    copy_chunk_rows: int = Field(default=250_000, ge=1_000)
    copy_reconnect_seconds: int = Field(
        default=180,
        ge=1,
        le=600,
        description="how long the parallel copy waits for the target to answer again after losing it (a crash, "
        "a restart, a Multi-AZ failover) before the start fails; the copy then resumes where it was",
    )
    expected_copy_mb_per_s: float = Field(
        default=50.0, gt=0, description="used by preflight to estimate the WAL kept during the copy"
    )
    slot_wait_seconds: int = Field(
        default=120,
        ge=1,
        le=600,
        description="how long creating the replication slot may wait for transactions open on the source to end "
        "before the start fails, naming them",
    )
    lock_wait_seconds: int = Field(
        default=120,
        ge=1,
        le=600,
        description="how long creating a publication may wait for other sessions' locks on the selected tables "
        "(a VACUUM, ANALYZE, CREATE INDEX or ALTER TABLE) before the start or the cutover fails, naming them; "
        "engine debezium's publication (made before its connector starts) waits the same",
    )


_DCU_STEPS = (1, 2, 4, 8, 16, 32, 64, 128, 192, 256, 384)


class DmsSettings(_Model):
    """AWS DMS: a replication instance or DMS Serverless runs the full-load-and-cdc task."""

    serverless: bool = False
    instance_class: str = "dms.r6i.large"
    allocated_storage_gb: int = Field(default=100, ge=5, le=6144)
    lob_mode: Literal["full", "limited"] = "full"
    lob_max_kb: int = Field(default=64, ge=1)
    multi_az: bool = Field(default=True, description="a standby in a second zone (AWS recommends it for CDC)")
    engine_version: str | None = Field(
        default=None, description="DMS engine version, e.g. '3.5.4'; none: DMS's default"
    )
    min_capacity_units: int = Field(default=2, description="DMS Serverless: fewest DCUs")
    max_capacity_units: int = Field(default=16, description="DMS Serverless: most DCUs")
    target_table_prep: Literal["do-nothing", "truncate"] = Field(
        default="do-nothing",
        description="do-nothing: the target schema exists and is empty; truncate: empty the target tables first",
    )
    max_full_load_subtasks: int = Field(default=8, ge=1, le=49, description="tables loaded at once")
    validation_failure_max: int = Field(
        default=10_000, ge=1, description="DMS stops validating a task after this many failed rows"
    )
    ca_certificate_arn: str | None = Field(
        default=None,
        description="DMS certificate (the RDS CA bundle) to verify the servers: sslmode verify-full; "
        "none: sslmode require (encrypted, server not verified)",
    )

    @field_validator("instance_class")
    @classmethod
    def _instance_class(cls, value: str) -> str:
        if not re.match(r"^dms\.[a-z0-9]+\.[a-z0-9]+$", value):
            raise ValueError(f"{value!r} is not a DMS instance class, e.g. 'dms.r6i.large' or 'dms.c6i.xlarge'")
        return value

    @field_validator("min_capacity_units", "max_capacity_units")
    @classmethod
    def _dcu(cls, value: int) -> int:
        if value not in _DCU_STEPS:
            raise ValueError(f"{value} is not a DMS capacity unit step; use one of {', '.join(map(str, _DCU_STEPS))}")
        return value

    @model_validator(mode="after")
    def _capacity_range(self) -> DmsSettings:
        if self.min_capacity_units > self.max_capacity_units:
            raise ValueError(
                f"min_capacity_units ({self.min_capacity_units}) is above max_capacity_units ({self.max_capacity_units})"
            )
        return self


class DebeziumSettings(_Model):
    """Debezium change events through Kafka, applied to the target by an idempotent consumer."""

    topic_prefix: str | None = Field(
        default=None,
        description="Debezium's topic.prefix: table topics are <prefix>.<schema>.<table>; none: zdm_<name>",
    )
    batch_size: int = Field(
        default=2000,
        ge=1,
        le=10_000,
        description="events applied per target transaction (at most: a batch is not held back for more)",
    )
    batch_window_seconds: int = Field(
        default=1, ge=0, le=300, description="how long the applier gathers a batch before applying it"
    )
    heartbeat_interval_ms: int = Field(
        default=10_000,
        ge=100,
        description="how often the connector writes a WAL heartbeat so that an idle source does not pin WAL",
    )
    snapshot_fetch_size: int = Field(default=10_240, ge=100, description="rows per fetch in the initial snapshot")
    max_batch_size: int = Field(default=4096, ge=1, description="Debezium's max.batch.size (events per poll)")
    max_retries: int = Field(
        default=100,
        ge=-1,
        description="Debezium's errors.max.retries: a failure it deems retriable (a lost connection, but also a "
        "refused read) is retried this many times, restart_wait_ms apart (100 x 3 s: about 5 minutes, an RDS "
        "failover's time and more), before the connector fails and the engine reports it; -1 retries without "
        "end (Debezium's default, which shows a lasting failure as a copy that never ends)",
    )
    restart_wait_ms: int = Field(
        default=3_000,
        ge=100,
        description="Debezium's retriable.restart.connector.wait.ms: how long the connector waits after a lost "
        "connection (or another retriable failure) before it starts again (Debezium's default: 10,000); until "
        "then nothing reads its slot, and a cutover waits for it",
    )

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[a-zA-Z0-9_-][a-zA-Z0-9._-]{0,99}$", value):
            raise ValueError(
                f"{value!r} is not a usable topic prefix: letters, digits, '.', '_' and '-', at most 100, e.g. 'shop_cdc'"
            )
        return value


class Engine(_Model):
    type: Literal["logical", "dms", "debezium"] = "logical"
    logical: LogicalSettings = Field(default_factory=LogicalSettings)
    dms: DmsSettings = Field(default_factory=DmsSettings)
    debezium: DebeziumSettings = Field(default_factory=DebeziumSettings)


_BACKEND_KEYS = frozenset({"host", "port", "dbname", "user"})


class PgbouncerSettings(_Model):
    admin_dsn: SecretStr | None = Field(
        default=None, description="DSN of pgbouncer's admin console (database 'pgbouncer')"
    )
    database_alias: str = Field(default="app", description="the name clients connect to")
    config_path: str | None = Field(default=None, description="pgbouncer.ini the router rewrites")
    reader_alias: str | None = Field(
        default=None, description="the name read-only clients connect to; reads shift by its host list"
    )
    source_backend: str | None = Field(
        default=None,
        description="how pgbouncer reaches the source ('host=... port=... dbname=...', no password); "
        "none: the source endpoint's host, port and database",
    )
    target_backend: str | None = Field(default=None, description="the same for the target")
    reconnect_seconds: float = Field(
        default=30.0,
        ge=0,
        le=600,
        description="how long a step waits for pgbouncer's admin console to answer again (a restart) before it "
        "fails, leaving it to the task's retries; restarted mid-cutover, pgbouncer no longer holds the writers, "
        "who meet the old database's fence until the writer is switched",
    )

    @field_validator("source_backend", "target_backend")
    @classmethod
    def _backend(cls, value: str | None) -> str | None:
        if value is None:
            return value
        keys = {part.split("=", 1)[0].strip() for part in value.split() if "=" in part}
        if "password" in keys:
            raise ValueError(
                "a pgbouncer backend must not hold a password (it is written into pgbouncer.ini): "
                "let pgbouncer's auth_file or auth_query supply it"
            )
        unknown = sorted(keys - _BACKEND_KEYS)
        if unknown or not {"host", "dbname"} <= keys:
            raise ValueError(
                f"expected 'host=... port=... dbname=...' (keys host, port, dbname, user); got keys {sorted(keys)}"
            )
        return value


class Route53Settings(_Model):
    hosted_zone_id: str | None = None
    zone_name: str = "db.internal"
    writer_record: str = "writer"
    reader_record: str = "reader"
    ttl_seconds: int = Field(default=5, ge=1, le=300)
    insync_timeout_seconds: float = Field(
        default=180.0, gt=0, description="longest wait for a record change to reach every Route53 server (INSYNC)"
    )


class RdsProxySettings(_Model):
    proxy_name: str | None = None
    target_group_name: str = Field(default="default", description="the proxy's target group the router retargets")
    registration_timeout_seconds: float = Field(
        default=300.0, gt=0, description="longest wait for the new target to become AVAILABLE behind the proxy"
    )


class Router(_Model):
    type: Literal["pgbouncer", "route53", "rds-proxy"] = "pgbouncer"
    pgbouncer: PgbouncerSettings = Field(default_factory=PgbouncerSettings)
    route53: Route53Settings = Field(default_factory=Route53Settings)
    rds_proxy: RdsProxySettings = Field(default_factory=RdsProxySettings)

    @model_validator(mode="after")
    def _selected_settings(self) -> Router:
        if self.type == "route53" and self.route53.hosted_zone_id is None:
            raise ValueError("router type 'route53' needs 'route53.hosted_zone_id' (the private zone)")
        if self.type == "rds-proxy" and self.rds_proxy.proxy_name is None:
            raise ValueError("router type 'rds-proxy' needs 'rds_proxy.proxy_name'")
        return self


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|kB|KB|MB|GB|TB)?\s*$")
_UNITS = {None: 1, "B": 1, "kB": 1024, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def parse_bytes(value: Any) -> int:
    """Accept 16777216, '16MB', '1.5GB' (PostgreSQL-style units)."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 16777216 or '16MB'")
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ValueError(
            f"{value!r} is not a size: write a number of bytes or a number with a unit "
            "(B, kB, MB, GB, TB), e.g. '64MB', '1.5GB'"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2)])


ByteSize = Annotated[int, Field(ge=0)]


class LagLimits(_Model):
    max_seconds: float = Field(default=5.0, gt=0)
    max_bytes: ByteSize = 16 * 1024**2
    problems_max_seconds: int = Field(
        default=900,
        ge=0,
        description="how long the replication status may report problems without a break (an apply worker that "
        "keeps failing, a table its publication lost) while the state machine waits for the copy and the lag, "
        "before it rolls back naming them",
    )

    @field_validator("max_bytes", mode="before")
    @classmethod
    def _bytes(cls, value: Any) -> int:
        return parse_bytes(value)


class ReadShift(_Model):
    steps: list[int] = Field(default_factory=lambda: [10, 50, 100], min_length=1)
    bake_seconds: int = Field(default=60, ge=0, description="whole seconds (a Step Functions Wait)")

    @field_validator("steps")
    @classmethod
    def _steps(cls, steps: list[int]) -> list[int]:
        out_of_range = [s for s in steps if s < 1 or s > 100]
        if out_of_range:
            raise ValueError(
                f"each step is a percentage of reads on the target, from 1 to 100; got {out_of_range} in {steps}"
            )
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise ValueError(f"steps must rise strictly, e.g. [10, 50, 100]; got {steps}")
        if steps[-1] != 100:
            raise ValueError(f"the last step must be 100 (all reads on the target); got {steps}")
        return steps


class Validation(_Model):
    enabled: bool = True
    chunk_rows: int = Field(default=100_000, ge=100, description="rows per chunk: one Map item, one task")
    max_parallel_chunks: int = Field(default=8, ge=1, le=1000)
    report_first_keys: int = Field(default=20, ge=0)
    slice_rows: int = Field(
        default=10_000,
        ge=10,
        description="planning unit inside a chunk (at most chunk_rows): the chunk is compared in ranges of "
        "8 to 1024 rows sized to how dense differences are; a mismatching range is fetched as (key, row hash) "
        "pairs and diffed, or split at key quantiles when it holds more than twice slice_rows; once about 1 row "
        "in 300 differs, every row's (key, row hash) is read instead",
    )
    recheck_attempts: int = Field(
        default=5,
        ge=2,
        le=100,
        description="re-checks of a difference seen while replication runs (a row only the target has "
        "must be seen in two re-checks in a row)",
    )
    recheck_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        le=390,
        description="how long one re-check waits for the target to apply the source's WAL (two re-checks must "
        "fit the chunk function's 780 s budget; recheck_attempts is capped so that every wait fits)",
    )
    row_hash: Literal["auto", "md5"] = Field(
        default="auto",
        description="auto: PostgreSQL's 64-bit text hash when both servers give the same hashes (checked at "
        "plan time), else md5 of the UTF-8 text; md5: always md5 (slower, portable everywhere)",
    )
    bucket_scan_max_rows: int = Field(
        default=100_000_000,
        ge=1_000,
        description="a table whose key is in no physical order is compared by scanning it in buckets of the "
        "key (about this many rows / 1,024 a bucket); one scan process hashes at most this many (estimated) "
        "rows in a task, about 45 s at 2.3M rows/s (the chunk function has 900 s, and dense differences add "
        "a sorted scan), and a task's scan uses up to 8 of max_parallel_chunks processes a side: a larger "
        "table is split into groups of buckets, one task each, every one scanning the whole table; past 64 "
        "times this many rows, key ranges",
    )


class Cutover(_Model):
    fence_timeout_seconds: float = Field(default=5.0, gt=0)
    fence_grace_seconds: float = Field(
        default=1.0,
        gt=0,
        description="how long transactions open at the fence may run on before their sessions are ended",
    )
    terminate_long_transactions: bool = Field(
        default=True,
        description="end sessions whose transaction outlives the grace (true), or wait for them and give up "
        "the attempt at the fence timeout (false)",
    )
    catch_up_timeout_seconds: float = Field(default=30.0, gt=0)
    sequence_margin: int = Field(default=1000, ge=0)
    post_cutover_bake_seconds: int = Field(default=60, ge=0, description="whole seconds (a Step Functions Wait)")
    rollback_window_hours: float = Field(
        default=24.0,
        ge=0,
        le=8760,
        description="how long reverse replication keeps the source whole for a lossless rollback after the "
        "cutover; then it is retired (at most a year: a Standard Step Functions execution lasts no longer)",
    )

    @property
    def rollback_window_seconds(self) -> int:
        """The window as a Step Functions Wait takes it: whole seconds, rounded up."""
        return math.ceil(round(self.rollback_window_hours * 3600, 6))

    @model_validator(mode="after")
    def _grace_within_timeout(self) -> Cutover:
        if self.fence_grace_seconds >= self.fence_timeout_seconds:
            raise ValueError(
                f"fence_grace_seconds ({self.fence_grace_seconds:g}) must be below fence_timeout_seconds "
                f"({self.fence_timeout_seconds:g}): the grace is part of the time the fence may take"
            )
        return self


class Alarms(_Model):
    names: list[str] = Field(default_factory=list, description="existing CloudWatch alarms the gates read")
    error_rate_metric: str | None = Field(
        default=None, description="'Namespace/MetricName' of the application's error rate"
    )
    error_rate_threshold: float = Field(default=1.0, ge=0, description="the error rate above which it alarms")
    error_rate_statistic: Literal["Average", "Sum", "Maximum", "p90", "p99"] = "Average"
    error_rate_dimensions: dict[str, str] = Field(
        default_factory=dict, description="dimensions of the error-rate metric, e.g. {Service: shop-api}"
    )
    max_lag_seconds: float = Field(
        default=60.0, gt=0, description="replication lag that counts as unhealthy (rolls back), not the shift gate"
    )
    max_retained_wal: ByteSize = Field(default=10 * 1024**3, description="WAL the slot may keep on the source")
    target_errors_per_minute: int = Field(
        default=10, ge=1, description="ERROR/FATAL/PANIC lines a minute in the target's PostgreSQL log"
    )
    evaluation_minutes: int = Field(default=3, ge=1, le=60, description="minutes a threshold must be crossed")

    @field_validator("max_retained_wal", mode="before")
    @classmethod
    def _bytes(cls, value: Any) -> int:
        return parse_bytes(value)

    @field_validator("error_rate_metric")
    @classmethod
    def _metric(cls, value: str | None) -> str | None:
        if value is not None and (value.count("/") < 1 or value.startswith("/") or value.endswith("/")):
            raise ValueError(
                f"{value!r} must be 'Namespace/MetricName' (the namespace may hold '/'), e.g. 'Shop/API/ErrorRate'"
            )
        return value


_VPC_RE = re.compile(r"^vpc-[0-9a-f]{8,17}$")
_SUBNET_RE = re.compile(r"^subnet-[0-9a-f]{8,17}$")
_SG_RE = re.compile(r"^sg-[0-9a-f]{8,17}$")
_AZ_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d[a-z]$")


class Network(_Model):
    """Where the migration's resources run: an existing VPC (ids) or a new one (explicit zones)."""

    vpc_id: str | None = Field(default=None, description="existing VPC; none: the stack creates one")
    vpc_cidr: str | None = Field(
        default=None, description="the VPC's IPv4 range (required with vpc_id; new VPC default 10.80.0.0/16)"
    )
    subnet_ids: list[str] = Field(default_factory=list, description="private subnets, one per zone (with vpc_id)")
    availability_zones: list[str] = Field(
        default_factory=list, description="zone of each subnet (with vpc_id); the new VPC's zones otherwise"
    )
    nat_gateways: int = Field(default=1, ge=1, le=3, description="new VPC only: NAT gateways for AWS API calls")
    source_security_group_id: str | None = Field(
        default=None, description="the source database's security group: ingress from the migration is added"
    )
    target_security_group_id: str | None = None
    source_cidr: str | None = Field(
        default=None,
        description="the source database's IPv4 range when it lies outside the VPC's (peering, Transit Gateway, "
        "VPN): egress to its port is opened to this range instead of the VPC's",
    )
    target_cidr: str | None = Field(default=None, description="same for the target")

    @field_validator("source_cidr", "target_cidr")
    @classmethod
    def _database_cidr(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            network = ipaddress.IPv4Network(value)
        except ValueError:
            raise ValueError(
                f"{value!r} is not an IPv4 CIDR block of the database's addresses (host bits zero), e.g. '10.20.0.0/16'"
            ) from None
        if network.prefixlen < 8:
            raise ValueError(f"{value!r} is wider than /8: give the range the database's addresses are in")
        return value

    @field_validator("vpc_cidr")
    @classmethod
    def _cidr(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            network = ipaddress.IPv4Network(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an IPv4 CIDR block, e.g. '10.80.0.0/16'") from None
        if not 16 <= network.prefixlen <= 24:
            raise ValueError(f"{value!r}: use a prefix from /16 to /24")
        return value

    @model_validator(mode="after")
    def _ids(self) -> Network:
        problems: list[str] = []
        if self.vpc_id is not None and not _VPC_RE.match(self.vpc_id):
            problems.append(f"vpc_id {self.vpc_id!r} is not a VPC id (vpc-0123456789abcdef0)")
        problems += [
            f"subnet id {s!r} is not a subnet id (subnet-0123...)" for s in self.subnet_ids if not _SUBNET_RE.match(s)
        ]
        problems += [
            f"zone {z!r} is not an availability zone name (eu-west-1a)"
            for z in self.availability_zones
            if not _AZ_RE.match(z)
        ]
        for field in ("source_security_group_id", "target_security_group_id"):
            value = getattr(self, field)
            if value is not None and not _SG_RE.match(value):
                problems.append(f"{field} {value!r} is not a security group id (sg-0123...)")
        for side in ("source", "target"):
            if getattr(self, f"{side}_cidr") is not None and getattr(self, f"{side}_security_group_id") is not None:
                problems.append(
                    f"give either {side}_security_group_id (a database the migration reaches by its security group) "
                    f"or {side}_cidr (its address range), not both"
                )
        if len(set(self.availability_zones)) != len(self.availability_zones):
            problems.append(f"availability_zones repeat a zone: {self.availability_zones}")
        if self.vpc_id is not None:
            if len(self.subnet_ids) < 2:
                problems.append("with vpc_id give at least 2 'subnet_ids' (private subnets in different zones)")
            if len(self.availability_zones) != len(self.subnet_ids):
                problems.append(
                    f"with vpc_id give the zone of each subnet in 'availability_zones', in the same order "
                    f"({len(self.subnet_ids)} subnet(s), {len(self.availability_zones)} zone(s))"
                )
            if self.vpc_cidr is None:
                problems.append("with vpc_id give 'vpc_cidr' (the VPC's range: database and proxy rules use it)")
        else:
            if self.subnet_ids:
                problems.append("'subnet_ids' belong to an existing VPC: give 'vpc_id' too, or leave them out")
            if len(self.availability_zones) == 1:
                problems.append("a new VPC needs at least 2 'availability_zones' (or none for <region>a and <region>b)")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class ProvisionedKafka(_Model):
    broker_instance_type: str = "kafka.m7g.large"
    brokers_per_zone: int = Field(default=1, ge=1, le=5)
    volume_gb: int = Field(default=100, ge=1, le=16384)
    kafka_version: str = "3.6.0"


class Streaming(_Model):
    """An MSK cluster carrying the change stream (consumers, MSK Connect, the DMS Kafka task)."""

    enabled: bool = False
    cluster: Literal["serverless", "provisioned"] = Field(
        default="serverless",
        description="serverless: IAM sign-in only; provisioned: IAM for clients plus SASL/SCRAM for DMS",
    )
    topic: str | None = Field(default=None, description="change-stream topic; none: zdm.<name>.changes")
    partitions: int = Field(default=6, ge=1, le=1000)
    dms_change_stream: bool = Field(
        default=False, description="a CDC-only DMS task writing every change of the selected tables to the topic"
    )
    provisioned: ProvisionedKafka = Field(default_factory=ProvisionedKafka)

    @field_validator("topic")
    @classmethod
    def _topic(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[a-zA-Z0-9._-]{1,249}$", value):
            raise ValueError(f"{value!r} is not a Kafka topic name: letters, digits, '.', '_' and '-', at most 249")
        return value

    @model_validator(mode="after")
    def _dms_needs_scram(self) -> Streaming:
        if self.dms_change_stream and not self.enabled:
            raise ValueError("dms_change_stream writes to the MSK cluster: set 'enabled: true' too")
        if self.dms_change_stream and self.cluster == "serverless":
            raise ValueError(
                "dms_change_stream needs 'cluster: provisioned': MSK Serverless accepts only IAM sign-in, "
                "and a DMS Kafka endpoint can sign in only with SASL/SCRAM or TLS"
            )
        return self


class DebeziumOnAws(_Model):
    """Engine debezium on AWS: the connector on MSK Connect, the applier Lambda and its event sources."""

    connector_mcu_count: Literal[1, 2, 4, 8] = Field(
        default=1, description="MSK Connect units per worker (1 MCU: 1 vCPU and 4 GiB of memory)"
    )
    connector_workers: int = Field(
        default=1, ge=1, le=10, description="MSK Connect workers (a PostgreSQL connector runs one task)"
    )
    config_provider_zip: str | None = Field(
        default=None,
        description="the MSK config providers zip (or uber jar) built into the connector plugin, so the "
        "connector reads the database password from Secrets Manager; path on the deploying machine",
    )
    apply_retry_attempts: int = Field(
        default=3,
        ge=0,
        le=10_000,
        description="retries of a failed applier batch before it goes to the dead-letter queue (which rolls back)",
    )
    sqs_endpoint: bool = Field(
        default=True,
        description="create an SQS interface endpoint in the VPC (Lambda needs one for the event sources' "
        "on-failure queue); false when the VPC has one already",
    )

    @field_validator("config_provider_zip")
    @classmethod
    def _archive(cls, value: str | None) -> str | None:
        if value is not None and not value.endswith((".zip", ".jar")):
            raise ValueError(f"{value!r} is not a .zip or .jar file: give the MSK config providers archive")
        return value


class Aws(_Model):
    """What only an AWS deployment uses (`cdk deploy`); local runs ignore it."""

    network: Network = Field(default_factory=Network)
    streaming: Streaming = Field(default_factory=Streaming)
    debezium: DebeziumOnAws = Field(default_factory=DebeziumOnAws)
    log_retention_days: Literal[
        1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653
    ] = 90


# The Cutover function runs 900 s (stacks/registry.py); a minute is left for its steps' own work.
CUTOVER_WAIT_BUDGET_SECONDS = 840.0
# The Replication function (900 s) runs the parallel-snapshot copy in one invocation: its exported
# snapshot lives only as long as the session that created the slot, so a copy cannot span invocations.
COPY_TIME_BUDGET_SECONDS = 840.0
# Engine dms: how long the cutover waits, writes paused, for DMS to say the task stopped (engines/dms_fence.py).
DMS_STOP_TIMEOUT_SECONDS = 180.0


class Migration(_Model):
    name: str
    source: Endpoint
    target: Endpoint
    tables: TableSelection = Field(default_factory=TableSelection)
    engine: Engine = Field(default_factory=Engine)
    router: Router = Field(default_factory=Router)
    lag: LagLimits = Field(default_factory=LagLimits)
    read_shift: ReadShift = Field(default_factory=ReadShift)
    validation: Validation = Field(default_factory=Validation)
    cutover: Cutover = Field(default_factory=Cutover)
    alarms: Alarms = Field(default_factory=Alarms)
    aws: Aws = Field(default_factory=Aws)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(
                f"{value!r} is not a usable name: lower-case letters, digits and '-', starting with a "
                "letter, at most 40 characters (it names the stack, slot and publication)"
            )
        return value

    @model_validator(mode="after")
    def _target_is_not_the_source(self) -> Migration:
        if _endpoint_identity(self.source) == _endpoint_identity(self.target):
            raise ValueError(
                "target: names the same database as source (same connection settings); point 'target' at "
                "the database to migrate to"
            )
        return self

    @model_validator(mode="after")
    def _cutover_fits_its_function(self) -> Migration:
        # catch_up_timeout_seconds twice: the wait for a replication streaming without problems before the
        # fence (`CutoverRunner._check_ready`), then the catch-up inside it
        cut = self.cutover.fence_timeout_seconds + 2 * self.cutover.catch_up_timeout_seconds
        if self.engine.type == "dms":
            cut += DMS_STOP_TIMEOUT_SECONDS
        router = 0.0
        if self.router.type in ("route53", "rds-proxy"):
            router += self.router.route53.insync_timeout_seconds
        if self.router.type == "rds-proxy":
            router += self.router.rds_proxy.registration_timeout_seconds
        if cut + router > CUTOVER_WAIT_BUDGET_SECONDS:
            where = "router" if router > cut else "cutover"
            raise ValueError(
                f"{where}: a cutover may wait {cut + router:g} s (cutover.fence_timeout_seconds + twice "
                "catch_up_timeout_seconds, before the fence and inside it, + the router's insync/registration timeouts"
                + (f" + {DMS_STOP_TIMEOUT_SECONDS:g} s for the DMS task to stop" if self.engine.type == "dms" else "")
                + "), more than the "
                f"{CUTOVER_WAIT_BUDGET_SECONDS:g} s the Cutover function has for them (it is stopped at 15 minutes, "
                "mid-step): lower them"
            )
        return self

    @property
    def slot_name(self) -> str:
        return "zdm_" + self.name.replace("-", "_")

    @property
    def topic_prefix(self) -> str:
        """Debezium's topic.prefix (the change stream's topics start with it)."""
        return self.engine.debezium.topic_prefix or self.slot_name


def _endpoint_identity(endpoint: Endpoint) -> tuple[Any, ...]:
    """Where an endpoint points (password left out): host, port, database."""
    if endpoint.dsn is None:
        return ("aws", (endpoint.host or "").lower().rstrip("."), endpoint.port, endpoint.database)
    try:
        parts = parse_dsn(endpoint.dsn.get_secret_value())
    except Exception:  # an unparsable DSN is compared as written (never shown)
        return ("dsn", endpoint.dsn.get_secret_value())
    return ("dsn", parts.get("host"), parts.get("hostaddr"), parts.get("port", "5432"), parts.get("dbname"))


class MigrationFileError(ValueError):
    """A migration file that cannot be used; `problems` holds one line per problem."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{path}: {len(problems)} problem(s) in the migration file:\n{lines}")


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith(("function-", "tagged-union")):
            continue
        else:
            out += ("." if out else "") + part
    return out or "(top level)"


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The model inside an annotation: `X`, `X | None`, `list[X]`, `Annotated[X, ...]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model class that owns the field at `loc` (to list allowed keys)."""
    model: type[BaseModel] | None = Migration
    for part in loc[:-1]:
        if isinstance(part, int) or part.startswith(("function-", "tagged-union")):
            continue
        if model is None:
            return None
        field = model.model_fields.get(part)
        if field is None:
            return None
        model = _submodel(field.annotation)
    return model


_SECRET_FIELDS = frozenset({"dsn", "admin_dsn"})
_SECRET_HINT = re.compile(r"password|://[^/\s]*:[^/\s]*@", re.IGNORECASE)
_KIND_NAMES = {str: "text value", dict: "mapping", list: "list", int: "number", float: "number", bool: "boolean"}


def _show(value: Any, loc: tuple[int | str, ...]) -> str:
    """The offending input for a message, unless it may carry a password (a DSN put in the wrong place)."""
    if value is None:
        return "an empty value"
    text = repr(value)
    if _SECRET_FIELDS.intersection(p for p in loc if isinstance(p, str)) or _SECRET_HINT.search(text):
        return f"a {_KIND_NAMES.get(type(value), type(value).__name__)} (not shown: it may hold a password)"
    return text


def _describe(error: Any) -> str:
    loc = tuple(error["loc"])
    where = _loc(loc)
    kind = error["type"]
    if kind == "extra_forbidden":
        key = str(loc[-1])
        owner = _model_at(loc)
        allowed = sorted(owner.model_fields) if owner else []
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f" did you mean '{close[0]}'?" if close else ""
        return f"{where}: unknown key '{key}';{hint} allowed keys here: {', '.join(allowed)}"
    if kind == "missing":
        return f"{where}: required field is missing; add it"
    if kind == "literal_error":
        expected = error.get("ctx", {}).get("expected", "")
        return f"{where}: {_show(error['input'], loc)} is not allowed; use one of {expected}"
    if kind in (
        "int_type",
        "int_parsing",
        "float_type",
        "float_parsing",
        "bool_type",
        "bool_parsing",
        "string_type",
        "list_type",
        "model_type",
        "dict_type",
        "int_from_float",
    ):
        wanted = {
            "int": "a whole number",
            "float": "a number",
            "bool": "true or false",
            "string": "a text value",
            "list": "a list ([a, b] or one '- item' per line)",
            "model": "a mapping of keys",
            "dict": "a mapping of keys",
        }[kind.split("_")[0]]
        return f"{where}: expected {wanted}, got {_show(error['input'], loc)}"
    bounds = {
        "greater_than_equal": ("ge", "too small; use {} or more"),
        "greater_than": ("gt", "too small; use a value above {}"),
        "less_than_equal": ("le", "too large; use {} or less"),
        "less_than": ("lt", "too large; use a value below {}"),
    }
    if kind in bounds:
        key, fix = bounds[kind]
        limit = error.get("ctx", {}).get(key)
        if isinstance(limit, float) and limit.is_integer():
            limit = int(limit)
        return f"{where}: {_show(error['input'], loc)} is {fix.format(limit)}"
    if kind == "finite_number":
        return f"{where}: expected a finite number, got {_show(error['input'], loc)}"
    if kind == "too_short":
        least = error.get("ctx", {}).get("min_length", 1)
        return f"{where}: the list is empty; give at least {least} item(s), or remove the key to use the default"
    message = str(error["msg"]).removeprefix("Value error, ")
    if where == "(top level)" and re.match(r"^[a-z_.]+: ", message):  # a cross-field check names its field
        return message
    return f"{where}: {message}"


def parse_migration(data: Any, source: str = "<migration>") -> Migration:
    if not isinstance(data, dict):
        raise MigrationFileError(
            source, ["(top level): the file must be a YAML mapping with 'name', 'source', 'target', ..."]
        )
    try:
        return Migration.model_validate(data)
    except ValidationError as exc:
        raise MigrationFileError(source, [_describe(e) for e in exc.errors()]) from None


def load_migration(path: str | Path, overrides: dict[str, Any] | None = None) -> Migration:
    """Read and validate a migration file; `overrides` are merged on top (e.g. local DSNs)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MigrationFileError(
            str(path), ["file not found: give the path of a migrations/<name>.yaml file"]
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise MigrationFileError(
            str(path), [f"cannot read the file ({reason}): give the path of a readable migrations/<name>.yaml file"]
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = getattr(exc, "problem", None) or exc
        raise MigrationFileError(
            str(path),
            [f"not valid YAML at {where}: {problem} (check indentation, colons and quotes on or before that line)"],
        ) from None
    if overrides and isinstance(data, dict):
        data = deep_merge(data, overrides)
    return parse_migration(data, str(path))


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
