"""The migration's settings as an SSM parameter: what the Lambdas read at run time."""

from __future__ import annotations

import ipaddress
import json

from aws_cdk import aws_ssm as ssm
from constructs import Construct

from lambdas.core.config import Migration

STANDARD_TIER_LIMIT = 4096  # bytes of a Standard-tier SSM parameter's value


class MigrationConfigError(ValueError):
    pass


def deployable_settings(migration: Migration) -> dict[str, object]:
    """The file's settings with no secret material: AWS endpoints are Secrets Manager ARNs."""
    for side in ("source", "target"):
        if getattr(migration, side).dsn is not None:
            raise MigrationConfigError(
                f"{side}.dsn is for local runs; for AWS give {side}.secret_arn, {side}.host and {side}.database"
            )
    if migration.router.type == "pgbouncer":
        raise MigrationConfigError(
            "router.type: 'pgbouncer' is for local runs (its admin DSN is a secret the stack does not store, so the "
            "read shift and the rollback could not reach it); for AWS use 'route53' or 'rds-proxy'"
        )
    for side in ("source", "target"):
        endpoint = getattr(migration, side)
        if _is_ip_address(endpoint.host) and not (endpoint.rds_cluster_identifier or endpoint.rds_instance_identifier):
            raise MigrationConfigError(
                f"{side}.host {endpoint.host!r} is an IP address: the stack points the writer and reader records "
                f"(CNAMEs) at the host, and a CNAME names a host, never an address. Give the database's DNS name "
                f"(its RDS endpoint), or {side}.rds_instance_identifier / rds_cluster_identifier"
            )
    return migration.model_dump(mode="json", exclude={"router": {"pgbouncer": {"admin_dsn"}}})


def _is_ip_address(host: str | None) -> bool:
    try:
        ipaddress.ip_address(host or "")
    except ValueError:
        return False
    return True


class MigrationConfig(Construct):
    def __init__(self, scope: Construct, construct_id: str, *, migration: Migration) -> None:
        super().__init__(scope, construct_id)
        value = json.dumps(deployable_settings(migration), sort_keys=True)
        self.parameter = ssm.StringParameter(
            self,
            "Settings",
            parameter_name=f"/zdm/{migration.name}/settings",
            string_value=value,
            # Standard parameters hold at most 4 KB: a larger file needs the advanced tier (8 KB),
            # which Intelligent-Tiering picks by itself (a deploy would fail otherwise).
            tier=ssm.ParameterTier.INTELLIGENT_TIERING if len(value.encode()) > STANDARD_TIER_LIMIT else None,
            description=f"Settings of migration {migration.name} (no secrets: credentials stay in Secrets Manager)",
        )
