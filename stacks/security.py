"""KMS keys of the migration: one for data at rest, one for logs. Rotation on, kept on delete."""

from __future__ import annotations

import aws_cdk as cdk
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kms as kms
from constructs import Construct

from stacks.common import AwsEnvironment, Keys


class Security(Construct):
    def __init__(self, scope: Construct, construct_id: str, *, migration_name: str, env: AwsEnvironment) -> None:
        super().__init__(scope, construct_id)
        self.data_key = kms.Key(
            self,
            "DataKey",
            alias=f"alias/zdm/{migration_name}/data",
            description=f"zdm {migration_name}: DMS storage and endpoints, MSK, queues, state machine, function settings",
            enable_key_rotation=True,
            removal_policy=cdk.RemovalPolicy.RETAIN,
        )
        self.logs_key = kms.Key(
            self,
            "LogsKey",
            alias=f"alias/zdm/{migration_name}/logs",
            description=f"zdm {migration_name}: every CloudWatch Logs group of the migration",
            enable_key_rotation=True,
            removal_policy=cdk.RemovalPolicy.RETAIN,
        )
        # CloudWatch Logs encrypts with the key only for log groups of this account and region
        # (key policies name the key itself as the resource: "*" here means this key).
        self.logs_key.add_to_resource_policy(
            iam.PolicyStatement(
                sid="CloudWatchLogsOfThisAccount",
                principals=[iam.ServicePrincipal(f"logs.{env.region}.amazonaws.com")],
                actions=["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"],
                resources=["*"],
                conditions={
                    "ArnLike": {
                        "kms:EncryptionContext:aws:logs:arn": (
                            f"arn:{env.partition}:logs:{env.region}:{env.account}:log-group:*"
                        )
                    }
                },
            )
        )
        # EventBridge delivers failed rollback invocations to the KMS-encrypted dead-letter queue.
        self.data_key.add_to_resource_policy(
            iam.PolicyStatement(
                sid="EventBridgeDeadLetterQueue",
                principals=[iam.ServicePrincipal("events.amazonaws.com")],
                actions=["kms:Decrypt", "kms:GenerateDataKey"],
                resources=["*"],
                conditions={"StringEquals": {"aws:SourceAccount": env.account}},
            )
        )
        self.keys = Keys(data=self.data_key, logs=self.logs_key)
