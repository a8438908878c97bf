"""AWS DMS: subnet group, a replication instance or DMS Serverless (the file chooses), the source
and target endpoints reading their credentials from Secrets Manager through an access role, the
full-load-and-cdc task, and the CDC-only task that writes the change stream to MSK.

Built when `engine.type: dms` (the migration's task) and/or `aws.streaming.dms_change_stream`
(the change-stream task). Account-level prerequisites DMS creates once per account (not here,
their names are fixed): `dms-vpc-role` and `dms-cloudwatch-logs-role` for a replication instance;
DMS Serverless uses its service-linked role.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

import aws_cdk as cdk
from aws_cdk import aws_dms as dms
from aws_cdk import aws_events as events
from aws_cdk import aws_iam as iam
from aws_cdk import aws_logs as logs
from aws_cdk import custom_resources as cr
from constructs import Construct

from lambdas.core import telemetry
from lambdas.core.config import Endpoint
from lambdas.core.engines.dms import DmsTarget, TableMappingError, table_mappings
from stacks.common import MigrationConfigError, MigrationContext, short_name
from stacks.network import Network
from stacks.streaming import Streaming

# Components whose messages land in the task's CloudWatch log (errors and warnings at least).
_LOG_COMPONENTS = ("SOURCE_UNLOAD", "SOURCE_CAPTURE", "TARGET_LOAD", "TARGET_APPLY", "TASK_MANAGER", "VALIDATOR_EXT")


@dataclass(frozen=True)
class DmsTask:
    """One DMS task or serverless replication the stack created."""

    construct: dms.CfnReplicationTask | dms.CfnReplicationConfig
    arn: str
    resource_id: str
    target: DmsTarget
    log_group: logs.LogGroup


class Replication(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        ctx: MigrationContext,
        network: Network,
        streaming: Streaming | None,
    ) -> None:
        super().__init__(scope, construct_id)
        self._ctx = ctx
        self._network = network
        m = ctx.migration
        settings = m.engine.dms
        try:
            self.mappings = table_mappings(m.tables.include, m.tables.exclude)
            # The migration's own task also carries the cutover's fence marker (lambdas/core/engines/dms_fence.py).
            self.task_mappings = table_mappings(m.tables.include, m.tables.exclude, fence_marker=True)
        except TableMappingError as exc:
            raise MigrationConfigError(str(exc)) from None
        self.serverless = settings.serverless
        self.tasks: list[DmsTask] = []
        self._log_groups: dict[str, logs.LogGroup] = {}
        self.instance_id: str | None = None

        self.access_role = self._secrets_access_role()
        self.subnet_group = dms.CfnReplicationSubnetGroup(
            self,
            "SubnetGroup",
            replication_subnet_group_identifier=short_name("zdm", ctx.name, limit=255),
            replication_subnet_group_description=f"zdm {ctx.name}: private subnets of the migration",
            subnet_ids=network.subnet_ids,
        )
        self.instance: dms.CfnReplicationInstance | None = None
        if not self.serverless:
            self.instance_id = short_name("zdm", ctx.name)
            self.instance = dms.CfnReplicationInstance(
                self,
                "Instance",
                replication_instance_identifier=self.instance_id,
                resource_identifier=self.instance_id,
                replication_instance_class=settings.instance_class,
                allocated_storage=settings.allocated_storage_gb,
                engine_version=settings.engine_version,
                multi_az=settings.multi_az,
                publicly_accessible=False,
                auto_minor_version_upgrade=True,
                kms_key_id=ctx.keys.data.key_arn,
                replication_subnet_group_identifier=self.subnet_group.ref,
                vpc_security_group_ids=[network.dms_sg.security_group_id],
            )

        self.source = self._database_endpoint("Source", "source", m.source)
        self.target_endpoint: dms.CfnEndpoint | None = None
        if m.engine.type == "dms":
            self.target_endpoint = self._database_endpoint("Target", "target", m.target)
            self.main = self._task(
                "Migration",
                suffix="load-cdc",
                migration_type="full-load-and-cdc",
                target_arn=self.target_endpoint.ref,
                settings=self._task_settings(validate=True),
            )
        if streaming is not None and m.aws.streaming.dms_change_stream:
            kafka = self._kafka_endpoint(streaming)
            self.change_stream = self._task(
                "ChangeStream",
                suffix="stream",
                migration_type="cdc",
                target_arn=kafka.ref,
                settings=self._task_settings(validate=False),
            )
        self._failure_events()

    # -- identity ----------------------------------------------------------------------------
    def _secrets_access_role(self) -> iam.Role:
        """The role DMS assumes to read the endpoints' secrets (DMS requires its regional principal)."""
        ctx = self._ctx
        role = iam.Role(
            self,
            "SecretsAccessRole",
            assumed_by=iam.ServicePrincipal(
                f"dms.{ctx.env.region}.amazonaws.com",
                conditions={"StringEquals": {"aws:SourceAccount": ctx.env.account}},
            ),
            description=f"zdm {ctx.name}: DMS reads the source and target secrets",
        )
        endpoints = [ctx.migration.source]
        if ctx.migration.engine.type == "dms":
            endpoints.append(ctx.migration.target)
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"],
                resources=[e.secret_arn for e in endpoints if e.secret_arn],
            )
        )
        keys = sorted({e.secret_kms_key_arn for e in endpoints if e.secret_kms_key_arn})
        if keys:
            role.add_to_policy(
                iam.PolicyStatement(
                    actions=["kms:Decrypt"],
                    resources=keys,
                    conditions={"StringEquals": {"kms:ViaService": f"secretsmanager.{ctx.env.region}.amazonaws.com"}},
                )
            )
        return role

    # -- endpoints ---------------------------------------------------------------------------
    def _database_endpoint(self, construct_id: str, side: str, endpoint: Endpoint) -> dms.CfnEndpoint:
        ctx = self._ctx
        settings = ctx.migration.engine.dms
        postgres = dms.CfnEndpoint.PostgreSqlSettingsProperty(
            secrets_manager_access_role_arn=self.access_role.role_arn,
            secrets_manager_secret_id=endpoint.secret_arn,
            # Source only: a heartbeat keeps the slot's restart point moving on an idle database, so DMS's
            # slot does not pin WAL; DDL capture is off (no trigger or table of DMS's on the source: schema
            # changes are not part of a migration), booleans stay booleans, and a LOB longer than the limit
            # fails the task instead of being truncated silently.
            heartbeat_enable=True if side == "source" else None,
            heartbeat_frequency=5 if side == "source" else None,
            capture_ddls=False if side == "source" else None,
            map_boolean_as_boolean=True if side == "source" else None,
            fail_tasks_on_lob_truncation=True if side == "source" else None,
            # Target only: no FK checks or triggers per applied row (what the apply worker of logical
            # replication does too); the source already enforced them.
            # And writable whatever the database's default: the read shift fences the target
            # (default_transaction_read_only) while DMS still applies to it.
            after_connect_script=(
                "SET session_replication_role = replica; SET default_transaction_read_only = off"
                if side == "target"
                else None
            ),
        )
        engine = "aurora-postgresql" if endpoint.rds_cluster_identifier else "postgres"
        return dms.CfnEndpoint(
            self,
            construct_id,
            endpoint_identifier=short_name("zdm", ctx.name, side, limit=255),
            endpoint_type=side,
            engine_name=engine,
            database_name=endpoint.database,
            # TLS always: verify-full against the given CA bundle, otherwise encrypted (require).
            ssl_mode="verify-full" if settings.ca_certificate_arn else "require",
            certificate_arn=settings.ca_certificate_arn,
            kms_key_id=ctx.keys.data.key_arn,
            postgre_sql_settings=postgres,
        )

    def _kafka_endpoint(self, streaming: Streaming) -> dms.CfnEndpoint:
        ctx = self._ctx
        secret = streaming.scram_secret
        assert secret is not None  # the streaming construct creates it for the DMS change stream
        bootstrap = self._bootstrap_brokers(streaming)
        return dms.CfnEndpoint(
            self,
            "Kafka",
            endpoint_identifier=short_name("zdm", ctx.name, "kafka", limit=255),
            endpoint_type="target",
            engine_name="kafka",
            kms_key_id=ctx.keys.data.key_arn,
            kafka_settings=dms.CfnEndpoint.KafkaSettingsProperty(
                broker=bootstrap,
                topic=streaming.topic,
                message_format="json",
                # TLS with SASL/SCRAM (SCRAM-SHA-512, DMS's default mechanism): the only authenticated
                # sign-in DMS has for MSK.
                security_protocol="sasl-ssl",
                sasl_user_name="zdm-dms",
                sasl_password=secret.secret_value_from_json("password").unsafe_unwrap(),
                include_transaction_details=True,
                include_control_details=True,
                include_table_alter_operations=True,
                include_null_and_empty=True,
                partition_include_schema_table=True,
                no_hex_prefix=True,
            ),
        )

    def _bootstrap_brokers(self, streaming: Streaming) -> str:
        """MSK publishes no bootstrap-broker attribute to CloudFormation: read it once at deploy
        time (GetBootstrapBrokers on this cluster only)."""
        ctx = self._ctx
        role = iam.Role(
            self,
            "BootstrapLookupRole",
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            description=f"zdm {ctx.name}: reads the MSK bootstrap brokers at deploy time",
        )
        log_group = ctx.log_group(self, "BootstrapLookupLogs", f"/zdm/{ctx.name}/deploy-lookups")
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["logs:CreateLogStream", "logs:PutLogEvents"], resources=[log_group.log_group_arn]
            )
        )
        role.add_to_policy(
            iam.PolicyStatement(actions=["kafka:GetBootstrapBrokers"], resources=[streaming.cluster_arn])
        )
        call = cr.AwsSdkCall(
            service="Kafka",
            action="getBootstrapBrokers",
            parameters={"ClusterArn": streaming.cluster_arn},
            physical_resource_id=cr.PhysicalResourceId.of(f"zdm-{ctx.name}-bootstrap"),
            output_paths=["BootstrapBrokerStringSaslScram"],
        )
        lookup = cr.AwsCustomResource(
            self,
            "BootstrapLookup",
            on_create=call,
            on_update=call,
            role=role,
            log_group=log_group,
            install_latest_aws_sdk=False,
            policy=cr.AwsCustomResourcePolicy.from_statements(
                [iam.PolicyStatement(actions=["kafka:GetBootstrapBrokers"], resources=[streaming.cluster_arn])]
            ),
        )
        return lookup.get_response_field("BootstrapBrokerStringSaslScram")

    # -- tasks -------------------------------------------------------------------------------
    def _task_settings(self, *, validate: bool) -> dict[str, Any]:
        s = self._ctx.migration.engine.dms
        return {
            "TargetMetadata": {
                "SupportLobs": True,
                "FullLobMode": s.lob_mode == "full",
                "LobChunkSize": 64,
                "LimitedSizeLobMode": s.lob_mode == "limited",
                "LobMaxSize": s.lob_max_kb if s.lob_mode == "limited" else 0,
                "BatchApplyEnabled": False,  # keeps transactions whole and in order
            },
            "FullLoadSettings": {
                "TargetTablePrepMode": "TRUNCATE_BEFORE_LOAD" if s.target_table_prep == "truncate" else "DO_NOTHING",
                "MaxFullLoadSubTasks": s.max_full_load_subtasks,
                "CommitRate": 10000,
                "StopTaskCachedChangesApplied": False,
                "StopTaskCachedChangesNotApplied": False,
            },
            "Logging": {
                "EnableLogging": True,
                "LogComponents": [{"Id": c, "Severity": "LOGGER_SEVERITY_DEFAULT"} for c in _LOG_COMPONENTS],
            },
            "ValidationSettings": {
                "EnableValidation": validate,
                "ValidationMode": "ROW_LEVEL",
                "ThreadCount": 5,
                "FailureMaxCount": s.validation_failure_max,
                "HandleCollationDiff": False,
                "RecordFailureDelayLimitInMinutes": 0,
            },
            "ErrorBehavior": {
                # Nothing is dropped quietly: data errors are logged (and alarmed), truncation and
                # table errors stop the task.
                "DataErrorPolicy": "LOG_ERROR",
                "DataTruncationErrorPolicy": "STOP_TASK",
                "TableErrorPolicy": "STOP_TASK",
                "ApplyErrorDeletePolicy": "LOG_ERROR",
                "ApplyErrorInsertPolicy": "LOG_ERROR",
                "ApplyErrorUpdatePolicy": "LOG_ERROR",
                "FailOnNoTablesCaptured": True,
            },
            "ControlTablesSettings": {
                "ControlSchema": "awsdms_control",
                "StatusTableEnabled": True,
                "SuspendedTablesTableEnabled": True,
                "HistoryTableEnabled": True,
            },
        }

    def _task(
        self,
        construct_id: str,
        *,
        suffix: str,
        migration_type: Literal["full-load-and-cdc", "cdc"],
        target_arn: str,
        settings: dict[str, Any],
    ) -> DmsTask:
        ctx = self._ctx
        resource_id = short_name("zdm", ctx.name, suffix)
        rules = self.task_mappings if migration_type == "full-load-and-cdc" else self.mappings
        mappings = json.dumps(rules)
        task: dms.CfnReplicationTask | dms.CfnReplicationConfig
        if self.instance is not None:
            assert self.instance_id is not None
            # DMS writes a task's log to dms-tasks-<instance id>; created here for retention and KMS.
            log_group = self._log_group(f"{construct_id}Logs", f"dms-tasks-{self.instance_id}")
            task = dms.CfnReplicationTask(
                self,
                construct_id,
                replication_task_identifier=resource_id,
                resource_identifier=resource_id,
                migration_type=migration_type,
                replication_instance_arn=self.instance.ref,
                source_endpoint_arn=self.source.ref,
                target_endpoint_arn=target_arn,
                table_mappings=mappings,
                replication_task_settings=json.dumps(settings),
            )
            arn = task.ref
            dimensions = {"ReplicationInstanceIdentifier": self.instance_id, "ReplicationTaskIdentifier": resource_id}
            kind: Any = "task"
        else:
            s = ctx.migration.engine.dms
            # DMS Serverless logs to dms-serverless-replication-<resource id>; created here likewise.
            log_group = self._log_group(f"{construct_id}Logs", f"dms-serverless-replication-{resource_id}")
            task = dms.CfnReplicationConfig(
                self,
                construct_id,
                replication_config_identifier=resource_id,
                resource_identifier=resource_id,
                replication_type=migration_type,
                source_endpoint_arn=self.source.ref,
                target_endpoint_arn=target_arn,
                table_mappings=rules,
                replication_settings=settings,
                compute_config=dms.CfnReplicationConfig.ComputeConfigProperty(
                    min_capacity_units=s.min_capacity_units,
                    max_capacity_units=s.max_capacity_units,
                    multi_az=s.multi_az,
                    kms_key_id=ctx.keys.data.key_arn,
                    replication_subnet_group_id=self.subnet_group.ref,
                    vpc_security_group_ids=[self._network.dms_sg.security_group_id],
                ),
            )
            arn = task.attr_replication_config_arn
            # Serverless metrics carry ReplicationConfigId = <account>:<resource id> (as CloudWatch shows it).
            dimensions = {"ReplicationConfigId": f"{ctx.env.account}:{resource_id}"}
            kind = "serverless"
        dms_task = DmsTask(task, arn, resource_id, DmsTarget(kind, arn, dimensions, migration_type), log_group)
        self.tasks.append(dms_task)
        return dms_task

    def _log_group(self, construct_id: str, name: str) -> logs.LogGroup:
        """One log group per name: both tasks of one instance write to dms-tasks-<instance id>.
        Each group gets a metric filter counting DMS error lines (`]E:`) for the task-error alarm."""
        if name in self._log_groups:
            return self._log_groups[name]
        group = self._ctx.log_group(self, construct_id, name)
        logs.MetricFilter(
            self,
            f"{construct_id}Errors",
            log_group=group,
            filter_pattern=logs.FilterPattern.literal('"]E:"'),
            metric_namespace=telemetry.filter_namespace(self._ctx.name),
            metric_name=telemetry.DMS_TASK_ERRORS,
            metric_value="1",
            default_value=0,
        )
        self._log_groups[name] = group
        return group

    def _failure_events(self) -> None:
        """DMS failure events of this migration's tasks -> a log group -> a metric (the task-failure alarm)."""
        if not self.tasks:
            return
        ctx = self._ctx
        group = ctx.log_group(self, "FailureEvents", f"/aws/events/zdm/{ctx.name}/dms-failures")
        logs.ResourcePolicy(
            self,
            "FailureEventsDelivery",
            resource_policy_name=f"zdm-{ctx.name}-dms-failure-events",
            policy_statements=[
                iam.PolicyStatement(
                    principals=[
                        iam.ServicePrincipal("events.amazonaws.com"),
                        iam.ServicePrincipal("delivery.logs.amazonaws.com"),
                    ],
                    actions=["logs:CreateLogStream", "logs:PutLogEvents"],
                    resources=[group.log_group_arn],
                )
            ],
        )
        rule = events.CfnRule(
            self,
            "FailureEventsRule",
            description=f"zdm {ctx.name}: DMS task failures, counted by a metric filter",
            event_pattern={
                "source": ["aws.dms"],
                "detail-type": [{"prefix": "DMS Replication"}],
                "resources": [t.arn for t in self.tasks],
                "detail": {"category": ["Failure"]},
            },
            targets=[events.CfnRule.TargetProperty(id="failure-log", arn=group.log_group_arn)],
        )
        rule.node.add_dependency(self.node.find_child("FailureEventsDelivery"))
        logs.MetricFilter(
            self,
            "FailureEventsMetric",
            log_group=group,
            filter_pattern=logs.FilterPattern.all_events(),
            metric_namespace=telemetry.filter_namespace(ctx.name),
            metric_name=telemetry.DMS_TASK_FAILURES,
            metric_value="1",
            default_value=0,
        )

    @property
    def primary(self) -> DmsTask | None:
        """The migration's own task (engine dms), not the change stream."""
        return next((t for t in self.tasks if t.target.migration_type != "cdc"), None)

    def to_json(self, value: Any) -> str:
        return cdk.Stack.of(self).to_json_string(value)
