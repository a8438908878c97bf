"""What every handler shares: Powertools objects and the clients built from the environment.

Only handlers read the environment; the domain core gets everything as arguments.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from pydantic import BaseModel, ConfigDict

from lambdas.core.config import Migration, parse_migration
from lambdas.core.db import Connection, connect
from lambdas.core.endpoints import SecretReader, resolve_dsn
from lambdas.core.validation.store import ValidationStore
from lambdas.core.validation.store_s3 import READERS as S3_READERS
from lambdas.core.validation.store_s3 import S3ValidationStore

SERVICE = "zdm"
# Some invocations have nothing to measure (a status read, a gate that only reads alarms): Powertools'
# documented way to keep its "No application metrics to publish" warning out of every such run.
warnings.filterwarnings("ignore", "No application metrics to publish*")
logger = Logger(service=SERVICE)
metrics = Metrics(namespace=os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "Zdm"), service=SERVICE)
tracer = Tracer(service=SERVICE)


class MigrationEvent(BaseModel):
    """Every task's input carries the migration's settings (no secrets on AWS: ARNs only)."""

    model_config = ConfigDict(extra="allow")
    migration: dict[str, Any]

    def parsed(self) -> Migration:
        return parse_migration(self.migration, "event.migration")


# AWS API calls inside a step (a Route53 change in the cutover, an alarm read by a gate) ride out throttling and
# transient errors here, with backoff, rather than fail the task: a task failed on a throttle past the cutover's
# point of no return would roll it back. Standard mode: throttles, 5xx and connection errors; jittered backoff
# of at most 20 s; 10 attempts are at most about a minute.
AWS_MAX_ATTEMPTS = 10


def aws_retries() -> Any:
    """The botocore client configuration of `aws_client`."""
    from botocore.config import Config

    return Config(retries={"mode": "standard", "total_max_attempts": AWS_MAX_ATTEMPTS})


@cache
def aws_client(service: str) -> Any:
    """One client per service and process (a warm Lambda reuses it), retrying as `aws_retries` says."""
    import boto3  # only on AWS paths

    return boto3.client(service, config=aws_retries())


def _secrets_client() -> SecretReader:
    client: SecretReader = aws_client("secretsmanager")  # only on AWS paths: local endpoints are DSNs
    return client


VALIDATION_BUCKET_ENV = "ZDM_VALIDATION_BUCKET"  # set by stacks/orchestration.py (the rehearsal: in its mock)


def validation_store() -> ValidationStore:
    """The bucket that holds validation plans' chunks and results (the Distributed Map reads them)."""
    bucket = os.environ.get(VALIDATION_BUCKET_ENV)
    if not bucket:
        raise RuntimeError(
            f"{VALIDATION_BUCKET_ENV} is not set: the validation tasks need the migration's validation bucket"
            " (the stack sets it; set it to a bucket name to run the handlers elsewhere)"
        )
    import boto3
    from botocore.config import Config

    config = aws_retries().merge(Config(max_pool_connections=S3_READERS))
    return S3ValidationStore(boto3.client("s3", config=config), bucket)


def dsns(migration: Migration) -> tuple[str, str]:
    needs_secrets = migration.source.secret_arn is not None or migration.target.secret_arn is not None
    client = _secrets_client() if needs_secrets else None
    return resolve_dsn(migration.source, client), resolve_dsn(migration.target, client)


@contextmanager
def both_databases(migration: Migration, application_name: str = "zdm") -> Iterator[tuple[Connection, Connection]]:
    """A task's session on the source and on the target, both closed when it ends (the source's too when
    the target cannot be reached)."""
    source_dsn, target_dsn = dsns(migration)
    source = connect(source_dsn, application_name=application_name)
    try:
        target = connect(target_dsn, application_name=application_name)
        try:
            yield source, target
        finally:
            target.close()
    finally:
        source.close()
