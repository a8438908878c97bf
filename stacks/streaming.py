"""MSK for the change stream: Serverless (IAM sign-in only) by default, or provisioned with IAM
for clients plus SASL/SCRAM for the DMS Kafka endpoint (DMS cannot sign in with IAM). TLS in
transit always; a provisioned cluster's storage and the SCRAM secret use the migration's key."""

from __future__ import annotations

import json

from aws_cdk import aws_msk as msk
from aws_cdk import aws_secretsmanager as secretsmanager
from constructs import Construct

from stacks.common import MigrationContext, acknowledge, short_name
from stacks.network import KAFKA_IAM_PORT, Network


class Streaming(Construct):
    def __init__(self, scope: Construct, construct_id: str, *, ctx: MigrationContext, network: Network) -> None:
        super().__init__(scope, construct_id)
        settings = ctx.migration.aws.streaming
        self.topic = settings.topic or f"zdm.{ctx.name}.changes"
        self.cluster_name = short_name("zdm", ctx.name, "changes", limit=64)
        self.scram_secret: secretsmanager.Secret | None = None
        self.scram_bootstrap: str | None = None
        zones = len(network.subnet_ids)
        if settings.cluster == "serverless":
            cluster: msk.CfnServerlessCluster | msk.CfnCluster = msk.CfnServerlessCluster(
                self,
                "Cluster",
                cluster_name=self.cluster_name,
                client_authentication=msk.CfnServerlessCluster.ClientAuthenticationProperty(
                    sasl=msk.CfnServerlessCluster.SaslProperty(iam=msk.CfnServerlessCluster.IamProperty(enabled=True))
                ),
                vpc_configs=[
                    msk.CfnServerlessCluster.VpcConfigProperty(
                        subnet_ids=network.subnet_ids, security_groups=[network.kafka_sg.security_group_id]
                    )
                ],
            )
            replication_factor = 3  # MSK Serverless keeps three copies of every partition
            self.cluster_arn = cluster.attr_arn
        else:
            p = settings.provisioned
            broker_logs = ctx.log_group(self, "BrokerLogs", f"/zdm/{ctx.name}/msk-brokers")
            configuration = msk.CfnConfiguration(
                self,
                "Configuration",
                name=short_name("zdm", ctx.name, "kafka", limit=64),
                description="zdm change stream: topics are created by the stack, never implicitly",
                server_properties="\n".join(
                    [
                        "auto.create.topics.enable=false",
                        f"default.replication.factor={min(3, zones * p.brokers_per_zone)}",
                        f"min.insync.replicas={max(1, min(3, zones * p.brokers_per_zone) - 1)}",
                    ]
                ),
                kafka_versions_list=[p.kafka_version],
            )
            cluster = msk.CfnCluster(
                self,
                "Cluster",
                cluster_name=self.cluster_name,
                kafka_version=p.kafka_version,
                number_of_broker_nodes=zones * p.brokers_per_zone,
                broker_node_group_info=msk.CfnCluster.BrokerNodeGroupInfoProperty(
                    client_subnets=network.subnet_ids,
                    instance_type=p.broker_instance_type,
                    security_groups=[network.kafka_sg.security_group_id],
                    storage_info=msk.CfnCluster.StorageInfoProperty(
                        ebs_storage_info=msk.CfnCluster.EBSStorageInfoProperty(volume_size=p.volume_gb)
                    ),
                    connectivity_info=msk.CfnCluster.ConnectivityInfoProperty(
                        public_access=msk.CfnCluster.PublicAccessProperty(type="DISABLED")
                    ),
                ),
                client_authentication=msk.CfnCluster.ClientAuthenticationProperty(
                    sasl=msk.CfnCluster.SaslProperty(
                        iam=msk.CfnCluster.IamProperty(enabled=True),
                        scram=msk.CfnCluster.ScramProperty(enabled=settings.dms_change_stream),
                    ),
                    unauthenticated=msk.CfnCluster.UnauthenticatedProperty(enabled=False),
                ),
                encryption_info=msk.CfnCluster.EncryptionInfoProperty(
                    encryption_at_rest=msk.CfnCluster.EncryptionAtRestProperty(
                        data_volume_kms_key_id=ctx.keys.data.key_arn
                    ),
                    encryption_in_transit=msk.CfnCluster.EncryptionInTransitProperty(
                        client_broker="TLS", in_cluster=True
                    ),
                ),
                configuration_info=msk.CfnCluster.ConfigurationInfoProperty(
                    arn=configuration.attr_arn, revision=configuration.attr_latest_revision_revision
                ),
                enhanced_monitoring="PER_TOPIC_PER_BROKER",
                logging_info=msk.CfnCluster.LoggingInfoProperty(
                    broker_logs=msk.CfnCluster.BrokerLogsProperty(
                        cloud_watch_logs=msk.CfnCluster.CloudWatchLogsProperty(
                            enabled=True, log_group=broker_logs.log_group_name
                        )
                    )
                ),
            )
            replication_factor = min(3, zones * p.brokers_per_zone)
            self.cluster_arn = cluster.attr_arn
            if settings.dms_change_stream:
                self._scram_user(ctx, cluster)
        self.cluster = cluster
        msk.CfnTopic(
            self,
            "ChangeTopic",
            cluster_arn=self.cluster_arn,
            topic_name=self.topic,
            partition_count=settings.partitions,
            replication_factor=replication_factor,
        )
        self.iam_port = KAFKA_IAM_PORT

    def _scram_user(self, ctx: MigrationContext, cluster: msk.CfnCluster) -> None:
        """The DMS Kafka endpoint's SASL/SCRAM identity. MSK requires the secret's name to start
        with AmazonMSK_ and a customer managed key."""
        secret = secretsmanager.Secret(
            self,
            "DmsScramSecret",
            secret_name=f"AmazonMSK_zdm-{ctx.name}-dms",
            description=f"zdm {ctx.name}: SASL/SCRAM sign-in of the DMS change stream to MSK",
            encryption_key=ctx.keys.data,
            generate_secret_string=secretsmanager.SecretStringGenerator(
                secret_string_template=json.dumps({"username": "zdm-dms"}),
                generate_string_key="password",
                exclude_punctuation=True,
                password_length=32,
            ),
        )
        # Associating the secret lets MSK read it (MSK manages the secret's resource policy itself).
        msk.CfnBatchScramSecret(
            self, "DmsScramAssociation", cluster_arn=cluster.attr_arn, secret_arn_list=[secret.secret_arn]
        )
        acknowledge(
            secret,
            "AwsSolutions-SMG4",
            "The DMS Kafka endpoint holds this password from deployment (a dynamic reference); rotating it "
            "would break the endpoint until the next deployment. It is generated, 32 characters, KMS-encrypted, "
            "and valid only for this cluster on port 9096 inside the VPC.",
        )
        self.scram_secret = secret
