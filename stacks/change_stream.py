"""Engine debezium on AWS: what the change stream needs besides the MSK cluster (stacks/streaming.py).

Built when `engine.type: debezium`. The stack creates what does not depend on the tables; the
replication function creates the connector and one event source mapping per table topic at run
time (lambdas/core/changestream/msk_runtime.py), from the JSON this construct puts in its
`ZDM_CHANGE_STREAM` environment variable:

- the MSK Connect custom plugin (the Debezium PostgreSQL connector and the MSK config provider,
  one zip built at synth time: stacks/connector_plugin.py) and a worker configuration (JSON
  converters without schemas, the Secrets Manager config provider);
- the connector's service execution role: sign in to this cluster only, write the migration's
  topics (`<topic prefix>.*`, the heartbeat topic), MSK Connect's own topics and groups of this
  connector, and read the source's secret; nothing else;
- a security group for the connector's workers (the cluster, the source database, HTTPS for
  Secrets Manager), the workers' log group (vended-log name, KMS-encrypted);
- the dead-letter queue (KMS, TLS only): the on-failure destination of every event source
  mapping and the applier's own dead letters; any message in it trips the rollback (monitoring);
- an SQS interface endpoint in the VPC (Lambda delivers a mapping's failed batches through it),
  unless `aws.debezium.sqs_endpoint: false`;
- the grants: `grant_control` for the replication function (MSK Connect on this connector, the
  event source mappings of the applier only, PassRole of the execution role to MSK Connect),
  `grant_apply` for the applier (consume this cluster's table topics in its own consumer groups,
  the target's secret, the dead-letter queue, the network interfaces of the event source pollers).
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import aws_cdk as cdk
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kafkaconnect as kafkaconnect
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_s3_assets as s3_assets
from aws_cdk import aws_sqs as sqs
from aws_cdk import custom_resources as cr
from constructs import Construct

from lambdas.core.changestream.connector import heartbeat_topic
from lambdas.core.changestream.msk_runtime import BACKEND, CHANGE_STREAM_ENV, SECRETS_PROVIDER
from lambdas.core.config import Endpoint
from stacks.common import (
    MigrationConfigError,
    MigrationContext,
    acknowledge,
    acknowledge_resource,
    lambda_function_name,
    short_name,
)
from stacks.connector_plugin import PluginBuildError, build_plugin
from stacks.network import KAFKA_IAM_PORT, Network
from stacks.streaming import Streaming

APPLIER_MODULE = "apply_changes"  # lambdas/handlers/apply_changes.py (stacks/registry.py: ApplyChanges)
KAFKA_CONNECT_VERSION = "3.7.x"  # Java 17: Debezium 3 needs it (MSK Connect's 2.7.1 runs Java 11)
CONFIG_PROVIDER_CLASS = "com.amazonaws.kafka.config.providers.SecretsManagerConfigProvider"
MONITOR_GROUP = "zdm-monitor"  # lambdas/core/changestream/kafka.py: the engine's offset reads
DEAD_LETTER_QUEUE_URL_ENV = "ZDM_DEAD_LETTER_QUEUE_URL"  # lambdas/handlers/apply_changes.py: its dead letters
_CUSTOM_RESOURCE_PROVIDER = "AWS" + cr.AwsCustomResource.PROVIDER_FUNCTION_UUID.replace("-", "")


def worker_properties(region: str) -> str:
    """The workers' connect-distributed.properties: JSON without schemas (the applier's format), and
    the config provider that resolves `${secretsmanager:<url-encoded ARN>:<key>}` in connector settings."""
    lines = [
        "key.converter=org.apache.kafka.connect.json.JsonConverter",
        "value.converter=org.apache.kafka.connect.json.JsonConverter",
        "key.converter.schemas.enable=false",
        "value.converter.schemas.enable=false",
        f"config.providers={SECRETS_PROVIDER}",
        f"config.providers.{SECRETS_PROVIDER}.class={CONFIG_PROVIDER_CLASS}",
        f"config.providers.{SECRETS_PROVIDER}.param.region={region}",
    ]
    return "\n".join(lines) + "\n"


CONNECTOR_DEFAULTS = {
    # The brokers create no topic implicitly: the connector creates each topic on its first write, one
    # partition (a table's changes stay in order, as locally) and the cluster's replication factor.
    "topic.creation.default.partitions": "1",
    "topic.creation.default.replication.factor": "-1",
    # With a config provider MSK Connect restarts the connector on every lookup TTL unless told not to.
    "config.action.reload": "none",
    "database.sslmode": "require",
}


class ChangeStream(Construct):
    def __init__(
        self, scope: Construct, construct_id: str, *, ctx: MigrationContext, network: Network, streaming: Streaming
    ) -> None:
        super().__init__(scope, construct_id)
        self._ctx = ctx
        self._network = network
        self._streaming = streaming
        m = ctx.migration
        settings = m.aws.debezium
        self.prefix = m.topic_prefix
        self.connector_name = short_name("zdm", ctx.name, "debezium", limit=128)
        self.applier_function_name = lambda_function_name(ctx.name, APPLIER_MODULE)
        self.applier_function_arn = ctx.arn("lambda", f"function:{self.applier_function_name}")
        self.consumer_group_prefix = short_name("zdm", ctx.name, "apply", limit=64)

        self._plugin()
        self._workers()
        self.log_group = ctx.log_group(self, "ConnectorLogs", f"/aws/vendedlogs/zdm/{ctx.name}/msk-connect")
        self.security_group = self._connector_network()
        self.role = self._execution_role()
        self.dead_letters = sqs.Queue(
            self,
            "DeadLetters",
            queue_name=short_name("zdm", ctx.name, "change-dead-letters", limit=80),
            encryption=sqs.QueueEncryption.KMS,
            encryption_master_key=ctx.keys.data,
            enforce_ssl=True,
            retention_period=cdk.Duration.days(14),
        )
        acknowledge(
            self.dead_letters,
            "AwsSolutions-SQS3",
            "This queue is the dead-letter queue itself: the on-failure destination of the applier's event "
            "source mappings and the applier's own dead letters; a message in it trips the rollback alarm.",
        )
        if settings.sqs_endpoint:
            self._sqs_endpoint()
        bootstrap = self._bootstrap_brokers()
        self.runtime_settings: dict[str, Any] = {
            "backend": BACKEND,
            "connector_name": self.connector_name,
            "cluster_arn": streaming.cluster_arn,
            "bootstrap_servers": bootstrap,
            # Revision 1 always: neither resource changes in place (every update replaces it, and the
            # names carry their content's hash). CloudFormation's Revision attribute is a number, which
            # Fn::Join (this JSON) cannot take.
            "custom_plugin_arn": self.plugin.attr_custom_plugin_arn,
            "custom_plugin_revision": 1,
            "worker_configuration_arn": self.worker_configuration.attr_worker_configuration_arn,
            "worker_configuration_revision": 1,
            "service_execution_role_arn": self.role.role_arn,
            "subnets": network.subnet_ids,
            "security_groups": [self.security_group.security_group_id],
            "log_group": self.log_group.log_group_name,
            "applier_function": self.applier_function_name,
            "dead_letter_queue_arn": self.dead_letters.queue_arn,
            "dead_letter_queue_url": self.dead_letters.queue_url,
            "consumer_group_prefix": self.consumer_group_prefix,
            "kafka_connect_version": KAFKA_CONNECT_VERSION,
            "mcu_count": settings.connector_mcu_count,
            "workers": settings.connector_workers,
            "batch_size": m.engine.debezium.batch_size,
            "batch_window_seconds": m.engine.debezium.batch_window_seconds,
            "maximum_retry_attempts": settings.apply_retry_attempts,
            "source_secret_arn": m.source.secret_arn,
            "connector_defaults": CONNECTOR_DEFAULTS,
        }

    # -- plugin and workers ----------------------------------------------------------------------
    def _plugin(self) -> None:
        ctx = self._ctx
        configured = ctx.migration.aws.debezium.config_provider_zip
        provider = Path(configured).expanduser() if configured else None
        try:
            archive = build_plugin(provider)
        except PluginBuildError as exc:
            raise MigrationConfigError(str(exc)) from None
        self.archive = archive
        if not archive.has_config_provider:
            cdk.Annotations.of(self).add_warning_v2(
                "zdm:debezium-config-provider",
                "aws.debezium.config_provider_zip is not set: the connector plugin holds no MSK config "
                "provider, so the connector cannot read the source's password from Secrets Manager and "
                "fails when started. Download the msk-config-providers release zip (docs/architecture.md) "
                "and name it in the migration file before deploying.",
            )
        asset = s3_assets.Asset(self, "PluginArchive", path=str(archive.path))
        self.plugin_asset = asset
        self.plugin = kafkaconnect.CfnCustomPlugin(
            self,
            "Plugin",
            # Plugins cannot change in place: a new archive is a new plugin (the name carries its hash).
            name=short_name("zdm", ctx.name, f"debezium-{archive.digest[:10]}", limit=128),
            content_type="ZIP",
            description=f"zdm {ctx.name}: Debezium PostgreSQL connector and the MSK config provider",
            location=kafkaconnect.CfnCustomPlugin.CustomPluginLocationProperty(
                s3_location=kafkaconnect.CfnCustomPlugin.S3LocationProperty(
                    bucket_arn=asset.bucket.bucket_arn, file_key=asset.s3_object_key
                )
            ),
        )

    def _workers(self) -> None:
        ctx = self._ctx
        properties = worker_properties(ctx.env.region)
        self.worker_properties = properties
        digest = hashlib.sha256(properties.encode()).hexdigest()[:10]
        self.worker_configuration = kafkaconnect.CfnWorkerConfiguration(
            self,
            "WorkerConfiguration",
            # Every property change replaces the resource: the name carries the content's hash.
            name=short_name("zdm", ctx.name, f"debezium-{digest}", limit=128),
            description=f"zdm {ctx.name}: JSON converters without schemas, Secrets Manager config provider",
            properties_file_content=base64.b64encode(properties.encode()).decode(),
        )

    # -- network -----------------------------------------------------------------------------
    def _connector_network(self) -> ec2.SecurityGroup:
        network = self._network
        group = ec2.SecurityGroup(
            self,
            "ConnectorSecurityGroup",
            vpc=network.vpc,
            description="zdm: the Debezium connector workers on MSK Connect",
            allow_all_outbound=False,
        )
        group.add_egress_rule(network.kafka_sg, ec2.Port.tcp(KAFKA_IAM_PORT), "the MSK cluster (IAM)")
        group.add_egress_rule(ec2.Peer.any_ipv4(), ec2.Port.tcp(443), "Secrets Manager and STS over HTTPS")
        source = next(side for side in network.databases if side.name == "source")
        source.allow_from(group, "the source database", f"zdm {self._ctx.name}: Debezium connector")
        # Lambda's pollers for the applier's event source mappings run in the cluster's subnets with the
        # cluster's security group: they reach the brokers and, over HTTPS, Lambda, STS and SQS.
        network.kafka_sg.add_egress_rule(network.kafka_sg, ec2.Port.tcp(KAFKA_IAM_PORT), "event source pollers")
        network.kafka_sg.add_egress_rule(
            ec2.Peer.any_ipv4(), ec2.Port.tcp(443), "event source pollers: Lambda, STS, SQS over HTTPS"
        )
        return group

    def _sqs_endpoint(self) -> None:
        network = self._network
        group = ec2.SecurityGroup(
            self,
            "SqsEndpointSecurityGroup",
            vpc=network.vpc,
            description="zdm: the SQS endpoint for the change stream dead-letter queue",
            allow_all_outbound=False,
        )
        ec2.InterfaceVpcEndpoint(
            self,
            "SqsEndpoint",
            vpc=network.vpc,
            service=ec2.InterfaceVpcEndpointAwsService.SQS,
            subnets=network.subnets,
            security_groups=[group],
            private_dns_enabled=True,
            open=False,
        )
        group.add_ingress_rule(ec2.Peer.ipv4(network.cidr), ec2.Port.tcp(443), "HTTPS from the VPC")

    def _bootstrap_brokers(self) -> str:
        """MSK publishes no bootstrap-broker attribute to CloudFormation: read the IAM bootstrap string
        once at deploy time (GetBootstrapBrokers on this cluster only). The custom resource provider is
        one function per stack: when the DMS construct made it, it is reused with its role."""
        ctx = self._ctx
        cluster = self._streaming.cluster_arn
        statement = iam.PolicyStatement(actions=["kafka:GetBootstrapBrokers"], resources=[cluster])
        exists = cdk.Stack.of(self).node.try_find_child(_CUSTOM_RESOURCE_PROVIDER) is not None
        role: iam.Role | None = None
        log_group = None
        if not exists:
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
            role.add_to_policy(statement)
        call = cr.AwsSdkCall(
            service="Kafka",
            action="getBootstrapBrokers",
            parameters={"ClusterArn": cluster},
            physical_resource_id=cr.PhysicalResourceId.of(f"zdm-{ctx.name}-bootstrap-iam"),
            output_paths=["BootstrapBrokerStringSaslIam"],
        )
        lookup = cr.AwsCustomResource(
            self,
            "BootstrapLookup",
            on_create=call,
            on_update=call,
            role=role,
            log_group=log_group,
            install_latest_aws_sdk=False,
            policy=cr.AwsCustomResourcePolicy.from_statements([statement]),
        )
        return lookup.get_response_field("BootstrapBrokerStringSaslIam")

    # -- identities ----------------------------------------------------------------------------
    def _kafka_arn(self, kind: str, name: str) -> str:
        """A topic or group ARN of this cluster (any cluster uuid: it is known only after creation)."""
        return self._ctx.arn("kafka", f"{kind}/{self._streaming.cluster_name}/*/{name}")

    def _secret_read(self, role: iam.Role, endpoint: Endpoint) -> None:
        assert endpoint.secret_arn is not None  # AWS endpoints (aws_environment refused DSNs)
        role.add_to_policy(
            iam.PolicyStatement(actions=["secretsmanager:GetSecretValue"], resources=[endpoint.secret_arn])
        )
        if endpoint.secret_kms_key_arn:
            role.add_to_policy(
                iam.PolicyStatement(
                    actions=["kms:Decrypt"],
                    resources=[endpoint.secret_kms_key_arn],
                    conditions={
                        "StringEquals": {"kms:ViaService": f"secretsmanager.{self._ctx.env.region}.amazonaws.com"}
                    },
                )
            )

    def _execution_role(self) -> iam.Role:
        """The connector's service execution role (MSK Connect requires one of the customer's)."""
        ctx = self._ctx
        connector_arns = ctx.arn("kafkaconnect", f"connector/{self.connector_name}/*")
        role = iam.Role(
            self,
            "ConnectorRole",
            assumed_by=iam.ServicePrincipal(
                "kafkaconnect.amazonaws.com",
                conditions={
                    "StringEquals": {"aws:SourceAccount": ctx.env.account},
                    "ArnLike": {"aws:SourceArn": connector_arns},
                },
            ),
            description=f"zdm {ctx.name}: the Debezium connector on MSK Connect",
        )
        cluster = self._streaming.cluster_arn
        role.add_to_policy(
            iam.PolicyStatement(
                actions=[
                    "kafka-cluster:Connect",
                    "kafka-cluster:DescribeCluster",
                    "kafka-cluster:DescribeClusterDynamicConfiguration",
                    "kafka-cluster:WriteDataIdempotently",
                ],
                resources=[cluster],
            )
        )
        change_topics = [
            self._kafka_arn("topic", f"{self.prefix}.*"),
            self._kafka_arn("topic", heartbeat_topic(self.prefix)),
        ]
        role.add_to_policy(
            iam.PolicyStatement(
                actions=[
                    "kafka-cluster:CreateTopic",
                    "kafka-cluster:DescribeTopic",
                    "kafka-cluster:DescribeTopicDynamicConfiguration",
                    "kafka-cluster:WriteData",
                ],
                resources=change_topics,
            )
        )
        # MSK Connect's own topics (offsets, configs, status) and groups of this connector:
        # __amazon_msk_connect_<kind>_<connector name>_<connector id> (older: __msk_connect_...).
        internal = [f"__amazon_msk_connect_*_{self.connector_name}_*", f"__msk_connect_*_{self.connector_name}_*"]
        internal_topics = [self._kafka_arn("topic", name) for name in internal]
        role.add_to_policy(
            iam.PolicyStatement(
                actions=[
                    "kafka-cluster:CreateTopic",
                    "kafka-cluster:DescribeTopic",
                    "kafka-cluster:DescribeTopicDynamicConfiguration",
                    "kafka-cluster:WriteData",
                    "kafka-cluster:ReadData",
                ],
                resources=internal_topics,
            )
        )
        groups = [self._kafka_arn("group", name) for name in (*internal, f"connect-{self.connector_name}*")]
        role.add_to_policy(
            iam.PolicyStatement(actions=["kafka-cluster:DescribeGroup", "kafka-cluster:AlterGroup"], resources=groups)
        )
        self._secret_read(role, ctx.migration.source)
        for resource in (*change_topics, *internal_topics, *groups):
            if "*" in resource:
                acknowledge_resource(
                    role,
                    resource,
                    "Topics and groups of this migration's cluster only, by name pattern: the cluster's uuid is "
                    "known after creation, table topics follow the tables and MSK Connect names its own topics "
                    "and groups with the connector's id.",
                )
        return role

    # -- grants --------------------------------------------------------------------------------
    def grant_control(self, function: lambda_.Function, role: iam.Role) -> None:
        """The replication function drives the connector and the applier's event source mappings."""
        ctx = self._ctx
        network = self._network
        function.add_environment(CHANGE_STREAM_ENV, cdk.Stack.of(self).to_json_string(self.runtime_settings))
        connectors = ctx.arn("kafkaconnect", f"connector/{self.connector_name}/*")
        role.add_to_policy(
            iam.PolicyStatement(
                actions=[
                    "kafkaconnect:DescribeConnector",
                    "kafkaconnect:PauseConnector",
                    "kafkaconnect:ResumeConnector",
                    "kafkaconnect:DeleteConnector",
                ],
                resources=[connectors],
            )
        )
        # CreateConnector and ListConnectors have no resource-level permissions.
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["kafkaconnect:CreateConnector", "kafkaconnect:ListConnectors"], resources=["*"]
            )
        )
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["iam:PassRole"],
                resources=[self.role.role_arn],
                conditions={"StringEquals": {"iam:PassedToService": "kafkaconnect.amazonaws.com"}},
            )
        )
        service_linked = ctx.arn(
            "iam", "role/aws-service-role/kafkaconnect.amazonaws.com/AWSServiceRoleForKafkaConnect*", region=False
        )
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["iam:CreateServiceLinkedRole"],
                resources=[service_linked],
                conditions={"StringLike": {"iam:AWSServiceName": "kafkaconnect.amazonaws.com"}},
            )
        )
        role.add_to_policy(
            iam.PolicyStatement(actions=["iam:AttachRolePolicy", "iam:PutRolePolicy"], resources=[service_linked])
        )
        # CreateConnector's dependent actions: MSK Connect validates the VPC, subnets and groups and sets
        # up the workers' log delivery with the caller's permissions (these have no resource-level scope;
        # network-interface/* is acknowledged with the function's own VPC attachment).
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["ec2:DescribeVpcs", "ec2:DescribeSubnets", "ec2:DescribeSecurityGroups"], resources=["*"]
            )
        )
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["ec2:CreateNetworkInterface"],
                resources=[
                    ctx.arn("ec2", "network-interface/*"),
                    *(ctx.arn("ec2", f"subnet/{s}") for s in network.subnet_ids),
                    ctx.arn("ec2", f"security-group/{self.security_group.security_group_id}"),
                ],
            )
        )
        role.add_to_policy(
            iam.PolicyStatement(
                actions=[
                    "logs:CreateLogDelivery",
                    "logs:GetLogDelivery",
                    "logs:UpdateLogDelivery",
                    "logs:DeleteLogDelivery",
                    "logs:ListLogDeliveries",
                    "logs:PutResourcePolicy",
                    "logs:DescribeResourcePolicies",
                    "logs:DescribeLogGroups",
                ],
                resources=["*"],
            )
        )
        # The applier's event source mappings, and no other function's.
        applier = {"ArnLike": {"lambda:FunctionArn": [self.applier_function_arn, f"{self.applier_function_arn}:*"]}}
        role.add_to_policy(
            iam.PolicyStatement(actions=["lambda:CreateEventSourceMapping"], resources=["*"], conditions=applier)
        )
        role.add_to_policy(iam.PolicyStatement(actions=["lambda:ListEventSourceMappings"], resources=["*"]))
        mappings = ctx.arn("lambda", "event-source-mapping:*")
        role.add_to_policy(
            iam.PolicyStatement(
                actions=[
                    "lambda:GetEventSourceMapping",
                    "lambda:UpdateEventSourceMapping",
                    "lambda:DeleteEventSourceMapping",
                ],
                resources=[mappings],
                conditions=applier,
            )
        )
        # The engine reads the table topics' end offsets and the fence marker, and creates the table
        # topics before their mappings (lambdas/core/changestream/kafka.py).
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["kafka-cluster:Connect", "kafka-cluster:DescribeCluster"],
                resources=[self._streaming.cluster_arn],
            )
        )
        topics = self._kafka_arn("topic", f"{self.prefix}.*")
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["kafka-cluster:DescribeTopic", "kafka-cluster:ReadData", "kafka-cluster:CreateTopic"],
                resources=[topics],
            )
        )
        monitor = self._kafka_arn("group", f"{MONITOR_GROUP}*")
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["kafka-cluster:DescribeGroup", "kafka-cluster:AlterGroup"], resources=[monitor]
            )
        )
        for resource, reason in (
            (connectors, "This migration's connector only: its ARN ends with an id MSK Connect assigns at creation."),
            (
                mappings,
                "Event source mapping ids exist only after creation; the lambda:FunctionArn condition limits the "
                "calls to the mappings of this migration's applier function.",
            ),
            (
                service_linked,
                "MSK Connect's service-linked role, created once per account by the first CreateConnector.",
            ),
            (topics, "The migration's table topics on its own cluster (the cluster uuid is known after creation)."),
            (monitor, "The engine's monitoring consumer group on the migration's own cluster."),
        ):
            acknowledge_resource(role, resource, reason)

    def grant_apply(self, function: lambda_.Function, role: iam.Role) -> None:
        """The applier: consumes the table topics through its event source mappings, writes the target."""
        ctx = self._ctx
        network = self._network
        cluster = self._streaming.cluster_arn
        function.add_environment(CHANGE_STREAM_ENV, cdk.Stack.of(self).to_json_string(self.runtime_settings))
        function.add_environment(DEAD_LETTER_QUEUE_URL_ENV, self.dead_letters.queue_url)
        self._secret_read(role, ctx.migration.target)
        # The event source mapping signs in with the function's role (IAM access control).
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["kafka-cluster:Connect", "kafka-cluster:DescribeClusterDynamicConfiguration"],
                resources=[cluster],
            )
        )
        topics = self._kafka_arn("topic", f"{self.prefix}.*")
        groups = self._kafka_arn("group", f"{self.consumer_group_prefix}.*")
        role.add_to_policy(
            iam.PolicyStatement(actions=["kafka-cluster:DescribeTopic", "kafka-cluster:ReadData"], resources=[topics])
        )
        role.add_to_policy(
            iam.PolicyStatement(actions=["kafka-cluster:DescribeGroup", "kafka-cluster:AlterGroup"], resources=[groups])
        )
        role.add_to_policy(
            iam.PolicyStatement(actions=["kafka:DescribeClusterV2", "kafka:GetBootstrapBrokers"], resources=[cluster])
        )
        # Lambda's pollers attach to the cluster's subnets with the cluster's security group.
        interfaces = ctx.arn("ec2", "network-interface/*")
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["ec2:CreateNetworkInterface"],
                resources=[
                    interfaces,
                    *(ctx.arn("ec2", f"subnet/{s}") for s in network.subnet_ids),
                    ctx.arn("ec2", f"security-group/{network.kafka_sg.security_group_id}"),
                ],
            )
        )
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["ec2:DescribeVpcs", "ec2:DescribeSecurityGroups", "ec2:DescribeSubnets"], resources=["*"]
            )
        )
        # Failed batches (the mappings' on-failure destination) and the applier's own dead letters.
        role.add_to_policy(iam.PolicyStatement(actions=["sqs:SendMessage"], resources=[self.dead_letters.queue_arn]))
        role.add_to_policy(
            iam.PolicyStatement(actions=["kms:GenerateDataKey", "kms:Decrypt"], resources=[ctx.keys.data.key_arn])
        )
        for resource, reason in (
            (topics, "The migration's table topics on its own cluster (the cluster uuid is known after creation)."),
            (groups, "The applier's consumer groups, one per table topic, all named with its prefix."),
        ):
            acknowledge_resource(role, resource, reason)
