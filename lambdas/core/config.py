"""The migration file: YAML parsed into typed, validated models.

A bad file never gets half-used: `load_migration` either returns a complete `Migration`
or raises `MigrationFileError` carrying one message per problem, each naming the field
path and what to do about it.
"""

from __future__ import annotations

import difflib
import itertools
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
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


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Endpoint(_Model):
    """A database: either a libpq DSN (local runs) or a Secrets Manager secret plus address (AWS)."""

    dsn: SecretStr | None = Field(default=None, description="libpq connection string; holds the password, never logged")
    secret_arn: str | None = Field(default=None, description="Secrets Manager ARN with the credentials")
    host: str | None = None
    port: int = Field(default=5432, ge=1, le=65535)
    database: str | None = None

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
    expected_copy_mb_per_s: float = Field(
        default=50.0, gt=0, description="used by preflight to estimate the WAL kept during the copy"
    )


class DmsSettings(_Model):
    serverless: bool = False
    instance_class: str = "dms.r6i.large"
    allocated_storage_gb: int = Field(default=100, ge=5, le=6144)
    lob_mode: Literal["full", "limited"] = "full"
    lob_max_kb: int = Field(default=64, ge=1)


class Engine(_Model):
    type: Literal["logical", "dms"] = "logical"
    logical: LogicalSettings = Field(default_factory=LogicalSettings)
    dms: DmsSettings = Field(default_factory=DmsSettings)


class PgbouncerSettings(_Model):
    admin_dsn: SecretStr | None = Field(
        default=None, description="DSN of pgbouncer's admin console (database 'pgbouncer')"
    )
    database_alias: str = Field(default="app", description="the name clients connect to")
    config_path: str | None = Field(default=None, description="pgbouncer.ini the router rewrites")


class Route53Settings(_Model):
    hosted_zone_id: str | None = None
    zone_name: str = "db.internal"
    writer_record: str = "writer"
    reader_record: str = "reader"
    ttl_seconds: int = Field(default=5, ge=1, le=300)


class RdsProxySettings(_Model):
    proxy_name: str | None = None


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

    @field_validator("max_bytes", mode="before")
    @classmethod
    def _bytes(cls, value: Any) -> int:
        return parse_bytes(value)


class ReadShift(_Model):
    steps: list[int] = Field(default_factory=lambda: [10, 50, 100], min_length=1)
    bake_seconds: float = Field(default=60.0, ge=0)

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
    chunk_rows: int = Field(default=100_000, ge=100)
    max_parallel_chunks: int = Field(default=8, ge=1, le=1000)
    report_first_keys: int = Field(default=20, ge=0)


class Cutover(_Model):
    fence_timeout_seconds: float = Field(default=5.0, gt=0)
    catch_up_timeout_seconds: float = Field(default=30.0, gt=0)
    sequence_margin: int = Field(default=1000, ge=0)
    post_cutover_bake_seconds: float = Field(default=60.0, ge=0)
    rollback_window_hours: float = Field(default=24.0, ge=0)


class Alarms(_Model):
    names: list[str] = Field(default_factory=list, description="existing CloudWatch alarms the gates read")
    error_rate_metric: str | None = Field(
        default=None, description="'Namespace/MetricName' of the application's error rate"
    )


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

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError(
                f"{value!r} is not a usable name: lower-case letters, digits and '-', starting with a "
                "letter, at most 40 characters (it names the stack, slot and publication)"
            )
        return value

    @property
    def slot_name(self) -> str:
        return "zdm_" + self.name.replace("-", "_")


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
    if kind == "too_short":
        least = error.get("ctx", {}).get("min_length", 1)
        return f"{where}: the list is empty; give at least {least} item(s), or remove the key to use the default"
    message = str(error["msg"]).removeprefix("Value error, ")
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
