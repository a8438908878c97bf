"""What every handler shares: Powertools objects and the clients built from the environment.

Only handlers read the environment; the domain core gets everything as arguments.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from pydantic import BaseModel, ConfigDict

from lambdas.core.config import Migration, parse_migration
from lambdas.core.endpoints import SecretReader, resolve_dsn

SERVICE = "zdm"
logger = Logger(service=SERVICE)
metrics = Metrics(namespace=os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "Zdm"), service=SERVICE)
tracer = Tracer(service=SERVICE)


class MigrationEvent(BaseModel):
    """Every task's input carries the migration's settings (no secrets on AWS: ARNs only)."""

    model_config = ConfigDict(extra="allow")
    migration: dict[str, Any]

    def parsed(self) -> Migration:
        return parse_migration(self.migration, "event.migration")


@cache
def _secrets_client() -> SecretReader:
    import boto3  # only on AWS paths: local endpoints are DSNs

    client: SecretReader = boto3.client("secretsmanager")
    return client


def dsns(migration: Migration) -> tuple[str, str]:
    needs_secrets = migration.source.secret_arn is not None or migration.target.secret_arn is not None
    client = _secrets_client() if needs_secrets else None
    return resolve_dsn(migration.source, client), resolve_dsn(migration.target, client)
