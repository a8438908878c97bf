"""What every construct of a migration's stack shares: the file, the account and region, names,
the KMS keys, log groups, and acknowledged cdk-nag findings (each with its reason)."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import aws_cdk as cdk
from aws_cdk import aws_kms as kms
from aws_cdk import aws_logs as logs
from constructs import Construct, IConstruct

from lambdas.core.config import Endpoint, Migration
from stacks.config import MigrationConfigError

__all__ = ["MigrationConfigError"]

_ARN_PARTS = re.compile(r"^arn:(?P<partition>aws[a-z-]*):secretsmanager:(?P<region>[a-z0-9-]+):(?P<account>\d{12}):")


@dataclass(frozen=True)
class AwsEnvironment:
    account: str
    region: str
    partition: str


def aws_environment(migration: Migration) -> AwsEnvironment:
    """Account and region of the deployment: those of the databases' secrets (no lookups)."""
    found: list[AwsEnvironment] = []
    for side in ("source", "target"):
        endpoint: Endpoint = getattr(migration, side)
        if endpoint.secret_arn is None:
            raise MigrationConfigError(
                f"{side}.dsn is for local runs; for AWS give {side}.secret_arn, {side}.host and {side}.database"
            )
        match = _ARN_PARTS.match(endpoint.secret_arn)
        assert match is not None  # the model validated the ARN
        found.append(AwsEnvironment(match["account"], match["region"], match["partition"]))
    if found[0] != found[1]:
        raise MigrationConfigError(
            f"source.secret_arn is in {found[0].account}/{found[0].region} but target.secret_arn in "
            f"{found[1].account}/{found[1].region}: DMS endpoints and RDS Proxy read secrets of their own "
            "account and region; copy the target's secret there"
        )
    return found[0]


def short_name(prefix: str, name: str, suffix: str = "", limit: int = 31) -> str:
    """`prefix-name-suffix` as an AWS identifier: letters, digits and single hyphens, at most `limit`
    characters (DMS resource identifiers: 31), shortened with a stable hash when too long."""
    parts = [p for p in (prefix, name, suffix) if p]
    text = re.sub(r"-{2,}", "-", "-".join(parts)).strip("-")
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:6]
    tail = f"-{digest}" + (f"-{suffix}" if suffix else "")
    return re.sub(r"-{2,}", "-", text[: limit - len(tail)].rstrip("-") + tail)


def lambda_function_name(migration_name: str, module: str) -> str:
    """The name of the migration's function for handler module `module` (CDK's and the runtime's)."""
    return short_name("zdm", migration_name, module, limit=64)


@dataclass
class Keys:
    """Customer managed keys of the migration: `data` for data at rest (DMS storage and endpoints,
    MSK, queues, the state machine, function environments), `logs` for every log group."""

    data: kms.Key
    logs: kms.Key


class MigrationContext:
    """Per-stack facts and helpers handed to every construct."""

    def __init__(self, scope: Construct, migration: Migration, env: AwsEnvironment, keys: Keys) -> None:
        self.scope = scope
        self.migration = migration
        self.env = env
        self.keys = keys
        self.stack = cdk.Stack.of(scope)

    @property
    def name(self) -> str:
        return self.migration.name

    @property
    def retention(self) -> logs.RetentionDays:
        return _RETENTION[self.migration.aws.log_retention_days]

    def log_group(self, scope: Construct, construct_id: str, name: str) -> logs.LogGroup:
        """A KMS-encrypted log group with the file's retention, kept after the stack is deleted
        (an audit trail of the migration outlives it)."""
        return logs.LogGroup(
            scope,
            construct_id,
            log_group_name=name,
            retention=self.retention,
            encryption_key=self.keys.logs,
            removal_policy=cdk.RemovalPolicy.RETAIN,
        )

    def arn(self, service: str, resource: str, *, region: bool = True, account: bool = True) -> str:
        return cdk.Arn.format(
            cdk.ArnComponents(
                service=service,
                resource=resource,
                region=self.env.region if region else "",
                account=self.env.account if account else "",
                arn_format=cdk.ArnFormat.NO_RESOURCE_NAME,
            ),
            self.stack,
        )


_RETENTION = {
    1: logs.RetentionDays.ONE_DAY,
    3: logs.RetentionDays.THREE_DAYS,
    5: logs.RetentionDays.FIVE_DAYS,
    7: logs.RetentionDays.ONE_WEEK,
    14: logs.RetentionDays.TWO_WEEKS,
    30: logs.RetentionDays.ONE_MONTH,
    60: logs.RetentionDays.TWO_MONTHS,
    90: logs.RetentionDays.THREE_MONTHS,
    120: logs.RetentionDays.FOUR_MONTHS,
    150: logs.RetentionDays.FIVE_MONTHS,
    180: logs.RetentionDays.SIX_MONTHS,
    365: logs.RetentionDays.ONE_YEAR,
    400: logs.RetentionDays.THIRTEEN_MONTHS,
    545: logs.RetentionDays.EIGHTEEN_MONTHS,
    731: logs.RetentionDays.TWO_YEARS,
    1096: logs.RetentionDays.THREE_YEARS,
    1827: logs.RetentionDays.FIVE_YEARS,
    2192: logs.RetentionDays.SIX_YEARS,
    2557: logs.RetentionDays.SEVEN_YEARS,
    2922: logs.RetentionDays.EIGHT_YEARS,
    3288: logs.RetentionDays.NINE_YEARS,
    3653: logs.RetentionDays.TEN_YEARS,
}


def acknowledge(construct: IConstruct, rule: str, reason: str) -> None:
    """Acknowledge one cdk-nag finding (`AwsSolutions-IAM5[Resource::*]` or a whole rule) with its reason."""
    cdk.Validations.of(construct).acknowledge(cdk.Acknowledgment(id=rule, reason=reason))


def flatten_reference(value: Any) -> str:
    """A resolved CloudFormation value as cdk-nag spells it in findings: Ref -> <Name>,
    GetAtt -> <Name.Attr>, Fn::Join joined (cdk-nag's flattenCfnReference)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value.replace("${", "<").replace("}", ">")
    if isinstance(value, dict):
        if "Fn::Join" in value:
            delimiter, items = value["Fn::Join"]
            return str(delimiter).join(flatten_reference(i) for i in items)
        if "Fn::Sub" in value:
            return flatten_reference(value["Fn::Sub"])
        if "Fn::GetAtt" in value:
            resource, attribute = value["Fn::GetAtt"]
            return f"<{flatten_reference(resource)}.{flatten_reference(attribute)}>"
        if "Fn::ImportValue" in value:
            return flatten_reference(value["Fn::ImportValue"])
        if "Ref" in value:
            return f"<{flatten_reference(value['Ref'])}>"
    return json.dumps(value, separators=(",", ":"))


def acknowledge_resource(construct: IConstruct, resource: str, reason: str) -> None:
    """Acknowledge cdk-nag's wildcard-resource finding (AwsSolutions-IAM5) for exactly `resource`."""
    flat = flatten_reference(cdk.Stack.of(construct).resolve(resource))
    acknowledge(construct, f"AwsSolutions-IAM5[Resource::{flat}]", reason)
