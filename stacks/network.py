"""The VPC (the file's ids, or a new one with explicit zones: no lookups at synth time) and one
security group per kind of client, each allowing only the ports it needs."""

from __future__ import annotations

from dataclasses import dataclass

from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from constructs import Construct

from stacks.common import MigrationContext, acknowledge

NEW_VPC_CIDR = "10.80.0.0/16"
KAFKA_IAM_PORT = 9098  # MSK: TLS + IAM sign-in
KAFKA_SCRAM_PORT = 9096  # MSK provisioned: TLS + SASL/SCRAM (DMS)


@dataclass(frozen=True)
class DatabaseSide:
    name: str  # "source" | "target"
    port: int
    security_group: ec2.ISecurityGroup | None
    cidr: str  # where the database's addresses are, when it has no security group here: the file's, or the VPC's

    def allow_from(self, group: ec2.SecurityGroup, description: str, ingress_description: str) -> None:
        """Let `group` reach this database's port: by its security group (egress and ingress) or its range (egress)."""
        if self.security_group is not None:
            group.add_egress_rule(self.security_group, ec2.Port.tcp(self.port), description)
            self.security_group.add_ingress_rule(group, ec2.Port.tcp(self.port), ingress_description)
        else:
            # The database's own rules must admit the migration (they are not ours to change).
            group.add_egress_rule(ec2.Peer.ipv4(self.cidr), ec2.Port.tcp(self.port), description)


class Network(Construct):
    def __init__(self, scope: Construct, construct_id: str, *, ctx: MigrationContext) -> None:
        super().__init__(scope, construct_id)
        settings = ctx.migration.aws.network
        if settings.vpc_id is not None:
            assert settings.vpc_cidr is not None  # the model requires it with vpc_id
            self.vpc: ec2.IVpc = ec2.Vpc.from_vpc_attributes(
                self,
                "Vpc",
                vpc_id=settings.vpc_id,
                vpc_cidr_block=settings.vpc_cidr,
                availability_zones=settings.availability_zones,
                private_subnet_ids=settings.subnet_ids,
            )
            self.cidr = settings.vpc_cidr
            acknowledge(
                self.vpc,
                "Annotation::@aws-cdk/aws-ec2:noSubnetRouteTableId",
                "The stack adds no routes to the file's subnets, so their route table ids are not needed.",
            )
        else:
            zones = ctx.stack.availability_zones  # the file's zones (MigrationStack answers without a lookup)
            self.cidr = settings.vpc_cidr or NEW_VPC_CIDR
            vpc = ec2.Vpc(
                self,
                "Vpc",
                ip_addresses=ec2.IpAddresses.cidr(self.cidr),
                availability_zones=zones,
                nat_gateways=min(settings.nat_gateways, len(zones)),
                subnet_configuration=[
                    ec2.SubnetConfiguration(name="nat", subnet_type=ec2.SubnetType.PUBLIC, cidr_mask=26),
                    ec2.SubnetConfiguration(
                        name="private", subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS, cidr_mask=20
                    ),
                ],
            )
            flow_logs = ctx.log_group(self, "FlowLogs", f"/zdm/{ctx.name}/vpc-flow-logs")
            flow_role = iam.Role(
                self,
                "FlowLogsRole",
                assumed_by=iam.ServicePrincipal(
                    "vpc-flow-logs.amazonaws.com",
                    conditions={"StringEquals": {"aws:SourceAccount": ctx.env.account}},
                ),
                description=f"zdm {ctx.name}: VPC flow logs into their log group",
            )
            vpc.add_flow_log(
                "FlowLog",
                destination=ec2.FlowLogDestination.to_cloud_watch_logs(flow_logs, flow_role),
                traffic_type=ec2.FlowLogTrafficType.ALL,
            )
            self.vpc = vpc
        self.subnets = ec2.SubnetSelection(subnets=self.vpc.private_subnets)
        self.subnet_ids = [s.subnet_id for s in self.vpc.private_subnets]

        self.functions_sg = self._group("Functions", "the migration Lambda functions")
        self.dms_sg = self._group("Dms", "DMS replication (instance or serverless)")
        self.proxies_sg = self._group("Proxies", "the RDS proxies in front of source and target")
        self.kafka_sg = self._group("Kafka", "the MSK cluster")

        # AWS APIs (Secrets Manager, DMS, CloudWatch, SSM, Step Functions, STS) over HTTPS, through
        # the NAT gateways or VPC endpoints: their addresses are not fixed, hence any IPv4 on 443.
        for group in (self.functions_sg, self.dms_sg):
            group.add_egress_rule(ec2.Peer.any_ipv4(), ec2.Port.tcp(443), "AWS APIs over HTTPS")

        self.databases = [
            DatabaseSide(
                "source",
                ctx.migration.source.port,
                self._database_group("Source", settings.source_security_group_id),
                settings.source_cidr or self.cidr,
            ),
            DatabaseSide(
                "target",
                ctx.migration.target.port,
                self._database_group("Target", settings.target_security_group_id),
                settings.target_cidr or self.cidr,
            ),
        ]
        for side in self.databases:
            for group in (self.functions_sg, self.dms_sg, self.proxies_sg):
                side.allow_from(group, f"the {side.name} database", f"zdm {ctx.name}: {group.node.id}")

        # Applications in the VPC reach the proxies; the functions too (health checks, validation).
        for side in self.databases:
            self.proxies_sg.add_ingress_rule(
                ec2.Peer.ipv4(self.cidr), ec2.Port.tcp(side.port), "applications in the VPC"
            )

        # Kafka: IAM clients (functions, consumers in the VPC) on 9098; DMS with SASL/SCRAM on 9096.
        self.kafka_sg.add_ingress_rule(ec2.Peer.ipv4(self.cidr), ec2.Port.tcp(KAFKA_IAM_PORT), "IAM clients in the VPC")
        self.kafka_sg.add_ingress_rule(self.dms_sg, ec2.Port.tcp(KAFKA_SCRAM_PORT), "the DMS change stream (SCRAM)")
        self.dms_sg.add_egress_rule(self.kafka_sg, ec2.Port.tcp(KAFKA_SCRAM_PORT), "the MSK cluster (SCRAM)")
        self.functions_sg.add_egress_rule(self.kafka_sg, ec2.Port.tcp(KAFKA_IAM_PORT), "the MSK cluster (IAM)")

    def _group(self, construct_id: str, what: str) -> ec2.SecurityGroup:
        return ec2.SecurityGroup(
            self,
            construct_id,
            vpc=self.vpc,
            description=f"zdm: {what}",
            allow_all_outbound=False,
        )

    def _database_group(self, construct_id: str, group_id: str | None) -> ec2.ISecurityGroup | None:
        if group_id is None:
            return None
        return ec2.SecurityGroup.from_security_group_id(
            self, f"{construct_id}Database", group_id, mutable=True, allow_all_outbound=False
        )
