"""One stack per migration, one construct per concern:

config (settings parameter) -> security (KMS keys) -> network -> streaming (MSK) ->
replication (DMS) -> change stream (MSK Connect, applier, dead letters: engine debezium) ->
traffic (RDS Proxy, Route53) -> orchestration (Lambdas, state machine) ->
monitoring (alarms, composite, EventBridge rollback rule, dashboard).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aws_cdk as cdk
from constructs import Construct

from lambdas.core.config import Migration
from stacks.change_stream import ChangeStream
from stacks.common import MigrationContext, aws_environment
from stacks.config import MigrationConfig
from stacks.monitoring import Monitoring
from stacks.network import Network
from stacks.orchestration import ASL, Orchestration
from stacks.registry import HANDLERS, HandlerSpec
from stacks.replication import Replication
from stacks.security import Security
from stacks.streaming import Streaming
from stacks.traffic import Traffic
from stacks.validation_store import ValidationStore


def stack_name_for(migration: Migration) -> str:
    return "Zdm-" + "".join(part.capitalize() for part in migration.name.split("-"))


class MigrationStack(cdk.Stack):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        migration: Migration,
        handlers: tuple[HandlerSpec, ...] = HANDLERS,
        definition_file: Path = ASL,
        **kwargs: Any,
    ) -> None:
        env = aws_environment(migration)  # refuses local (DSN) endpoints before anything is built
        super().__init__(
            scope,
            construct_id,
            description=f"Zero-downtime migration {migration.name}",
            env=cdk.Environment(account=env.account, region=env.region),
            **kwargs,
        )
        # AWS::RDS::DBProxyTargetGroup takes no tags (CDK would add them).
        self._zones = migration.aws.network.availability_zones or [f"{env.region}a", f"{env.region}b"]
        cdk.Tags.of(self).add("zdm:migration", migration.name, exclude_resource_types=["AWS::RDS::DBProxyTargetGroup"])
        self.config = MigrationConfig(self, "Config", migration=migration)
        self.security = Security(self, "Security", migration_name=migration.name, env=env)
        ctx = MigrationContext(self, migration, env, self.security.keys)
        self.network = Network(self, "Network", ctx=ctx)
        # Engine debezium streams through the cluster: it is built whatever aws.streaming.enabled says.
        needs_kafka = migration.aws.streaming.enabled or migration.engine.type == "debezium"
        self.streaming = Streaming(self, "Streaming", ctx=ctx, network=self.network) if needs_kafka else None
        needs_dms = migration.engine.type == "dms" or migration.aws.streaming.dms_change_stream
        self.replication = (
            Replication(self, "Replication", ctx=ctx, network=self.network, streaming=self.streaming)
            if needs_dms
            else None
        )
        self.change_stream = (
            ChangeStream(self, "ChangeStream", ctx=ctx, network=self.network, streaming=self.streaming)
            if migration.engine.type == "debezium" and self.streaming is not None
            else None
        )
        self.traffic = Traffic(self, "Traffic", ctx=ctx, network=self.network)
        self.validation_store = ValidationStore(self, "ValidationStore", ctx=ctx)
        self.orchestration = Orchestration(
            self,
            "Orchestration",
            ctx=ctx,
            network=self.network,
            settings=self.config.parameter,
            replication=self.replication,
            traffic=self.traffic,
            handlers=handlers,
            definition_file=definition_file,
            change_stream=self.change_stream,
            validation_store=self.validation_store,
        )
        self.monitoring = Monitoring(
            self,
            "Monitoring",
            ctx=ctx,
            replication=self.replication,
            rollback=self.orchestration.function_for("alarm"),
            dead_letters=self.orchestration.dead_letters,
            change_stream=self.change_stream,
        )
        cdk.CfnOutput(self, "StateMachineArn", value=self.orchestration.state_machine.state_machine_arn)
        cdk.CfnOutput(self, "Dashboard", value=f"zdm-{migration.name}")
        cdk.CfnOutput(self, "WriterName", value=self.traffic.writer_name)
        cdk.CfnOutput(self, "ReaderName", value=self.traffic.reader_name)

    @property
    def availability_zones(self) -> list[str]:
        """The file's zones: CDK would otherwise look the region's zones up (an AWS call at synth time)."""
        return list(self._zones)
