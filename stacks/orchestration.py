"""The Lambda functions (one per handler in the registry) and the state machine that runs them.

Adding a handler is one line in `HANDLERS`: a `HandlerSpec` names the module in
`lambdas/handlers/`, what it may touch (`Access`), and who invokes it. The state machine is
`statemachine/migration.asl.json`, inlined; every `${<Name>FunctionArn}` in it is substituted
with the ARN of the registry's function `<Name>`, the others with the migration's name, settings
parameter and rollback window (an unknown `${...}` fails the synth), and the state machine's
role may invoke exactly the functions its definition names.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import aws_cdk as cdk
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_sqs as sqs
from aws_cdk import aws_ssm as ssm
from aws_cdk import aws_stepfunctions as sfn
from constructs import Construct

from lambdas.core import telemetry
from lambdas.core.telemetry import alarm_name_prefix
from stacks.bundling import PYTHON_VERSION, ROOT, lambda_code
from stacks.change_stream import ChangeStream
from stacks.common import MigrationContext, acknowledge, acknowledge_resource, lambda_function_name, short_name
from stacks.network import Network
from stacks.registry import HANDLERS, Access, HandlerSpec
from stacks.replication import Replication
from stacks.traffic import Traffic
from stacks.validation_store import ValidationStore

ASL = ROOT / "statemachine" / "migration.asl.json"
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z0-9_]+)\}")


def placeholders(definition: str) -> list[str]:
    return sorted(set(_PLACEHOLDER.findall(definition)))


def _maps(states: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for state in states.values():
        if state.get("Type") == "Map":
            found.append(state)
            found += _maps(state.get("ItemProcessor", state.get("Iterator", {})).get("States", {}))
        for branch in state.get("Branches", []):
            found += _maps(branch.get("States", {}))
    return found


def _distributed_maps(definition: str) -> bool:
    maps = _maps(json.loads(definition)["States"])
    return any(m.get("ItemProcessor", {}).get("ProcessorConfig", {}).get("Mode") == "DISTRIBUTED" for m in maps)


def _s3_map_io(definition: str) -> bool:
    return any("ItemReader" in m or "ResultWriter" in m for m in _maps(json.loads(definition)["States"]))


class Orchestration(Construct):
    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        ctx: MigrationContext,
        network: Network,
        settings: ssm.StringParameter,
        replication: Replication | None,
        traffic: Traffic,
        handlers: tuple[HandlerSpec, ...] = HANDLERS,
        definition_file: Path = ASL,
        change_stream: ChangeStream | None = None,
        validation_store: ValidationStore | None = None,
    ) -> None:
        super().__init__(scope, construct_id)
        self._ctx = ctx
        self._network = network
        self._replication = replication
        self._traffic = traffic
        self._change_stream = change_stream
        self._validation_store = validation_store
        self._settings = settings
        # Engine-specific functions (the debezium applier) only where their engine runs.
        handlers = tuple(spec for spec in handlers if spec.applies_to(ctx.migration.engine.type))
        self.specs = handlers
        self.state_machine_name = short_name("zdm", ctx.name, limit=80)
        self.state_machine_arn = ctx.arn("states", f"stateMachine:{self.state_machine_name}")
        self.code = lambda_code()
        self.dead_letters = sqs.Queue(
            self,
            "DeadLetters",
            queue_name=short_name("zdm", ctx.name, "dead-letters", limit=80),
            encryption=sqs.QueueEncryption.KMS,
            encryption_master_key=ctx.keys.data,
            enforce_ssl=True,
            retention_period=cdk.Duration.days(14),
        )
        acknowledge(
            self.dead_letters,
            "AwsSolutions-SQS3",
            "This queue is the dead-letter queue (of the rollback function and its EventBridge target).",
        )
        self.functions: dict[str, lambda_.Function] = {spec.name: self._function(spec) for spec in handlers}

        definition = definition_file.read_text(encoding="utf-8")
        known: dict[str, str] = {spec.placeholder: self.functions[spec.name].function_arn for spec in handlers}
        known |= {
            "MigrationName": ctx.name,
            "SettingsParameterName": settings.parameter_name,
            "SettingsParameterArn": settings.parameter_arn,
            # The Defaults state's rollback window: hours to whole seconds, which ASL cannot compute.
            "RollbackWindowSeconds": str(ctx.migration.cutover.rollback_window_seconds),
        }
        if validation_store is not None:  # the Distributed Map's ResultWriter (its run manifests)
            known["ValidationBucketName"] = validation_store.bucket.bucket_name
        used = placeholders(definition)
        unknown = [p for p in used if p not in known]
        if unknown:
            raise ValueError(
                f"{definition_file.name}: no substitution for {', '.join('${' + u + '}' for u in unknown)}; "
                f"known: {', '.join(sorted(known))} (add a HandlerSpec to stacks/orchestration.py HANDLERS)"
            )
        self.substitutions = {p: known[p] for p in used}
        self.invoked = [spec for spec in handlers if spec.placeholder in used]

        role = iam.Role(
            self,
            "StateMachineRole",
            assumed_by=iam.ServicePrincipal(
                "states.amazonaws.com", conditions={"StringEquals": {"aws:SourceAccount": ctx.env.account}}
            ),
            description=f"zdm {ctx.name}: the migration state machine",
        )
        if self.invoked:
            role.add_to_policy(
                iam.PolicyStatement(
                    actions=["lambda:InvokeFunction"],
                    resources=[self.functions[s.name].function_arn for s in self.invoked],
                )
            )
        if "SettingsParameterName" in used:
            role.add_to_policy(iam.PolicyStatement(actions=["ssm:GetParameter"], resources=[settings.parameter_arn]))
        if _distributed_maps(definition):
            # A Distributed Map runs each item as a child execution of this state machine.
            executions = ctx.arn("states", f"execution:{self.state_machine_name}/*")
            role.add_to_policy(
                iam.PolicyStatement(actions=["states:StartExecution"], resources=[self.state_machine_arn])
            )
            role.add_to_policy(
                iam.PolicyStatement(
                    actions=["states:DescribeExecution", "states:StopExecution"], resources=[executions]
                )
            )
            acknowledge_resource(
                role, executions, "The Distributed Map's child executions of this state machine, named at run time."
            )
        if _s3_map_io(definition):
            if validation_store is None:
                raise ValueError(f"{definition_file.name}: a Map reads or writes S3 but no validation store was given")
            validation_store.grant_state_machine(role)
        log_group = ctx.log_group(self, "StateMachineLogs", f"/aws/vendedlogs/states/zdm-{ctx.name}")
        self.state_machine = sfn.StateMachine(
            self,
            "StateMachine",
            state_machine_name=self.state_machine_name,
            state_machine_type=sfn.StateMachineType.STANDARD,
            definition_body=sfn.DefinitionBody.from_string(definition),
            definition_substitutions=self.substitutions,
            role=role,
            tracing_enabled=True,
            # Execution data stays out of the logs: task results can hold row keys of the migrated tables.
            logs=sfn.LogOptions(destination=log_group, level=sfn.LogLevel.ALL, include_execution_data=False),
            encryption_configuration=sfn.CustomerManagedEncryptionConfiguration(ctx.keys.data),
        )
        acknowledge(
            role,
            "AwsSolutions-IAM5[Resource::*]",
            "Step Functions' log delivery (logs:CreateLogDelivery, ...) and X-Ray (xray:PutTraceSegments, ...) "
            "actions have no resource-level permissions: AWS requires Resource '*' for them.",
        )

    # -- functions ---------------------------------------------------------------------------
    def _function(self, spec: HandlerSpec) -> lambda_.Function:
        ctx = self._ctx
        function_name = lambda_function_name(ctx.name, spec.module)
        role = iam.Role(
            self,
            f"{spec.name}Role",
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            description=f"zdm {ctx.name}: the {spec.module} function",
        )
        log_group = ctx.log_group(self, f"{spec.name}Logs", f"/aws/lambda/{function_name}")
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["logs:CreateLogStream", "logs:PutLogEvents"], resources=[log_group.log_group_arn]
            )
        )
        environment = {
            "POWERTOOLS_SERVICE_NAME": telemetry.SERVICE,
            "POWERTOOLS_METRICS_NAMESPACE": telemetry.NAMESPACE,
            "POWERTOOLS_LOG_LEVEL": "INFO",
            "ZDM_MIGRATION": ctx.name,
        }
        if spec.in_vpc:
            self._grant_network_interfaces(role, spec)
        function = lambda_.Function(
            self,
            spec.name,
            function_name=function_name,
            description=f"zdm {ctx.name}: {spec.description or spec.module}",
            runtime=lambda_.Runtime.PYTHON_3_12,
            architecture=lambda_.Architecture.X86_64,
            code=self.code,
            handler=spec.handler,
            role=role,
            timeout=cdk.Duration.seconds(spec.timeout_seconds),
            memory_size=spec.memory_mb,
            log_group=log_group,
            tracing=lambda_.Tracing.ACTIVE,
            environment=environment,
            environment_encryption=ctx.keys.data,
            vpc=self._network.vpc if spec.in_vpc else None,
            vpc_subnets=self._network.subnets if spec.in_vpc else None,
            security_groups=[self._network.functions_sg] if spec.in_vpc else None,
            dead_letter_queue=self.dead_letters if spec.invoked_by == "alarm" else None,
            retry_attempts=2 if spec.invoked_by == "alarm" else None,
        )
        if spec.invoked_by == "alarm":
            # The dead-letter queue is encrypted with the data key: Lambda sends failed events with the role.
            role.add_to_policy(
                iam.PolicyStatement(actions=["kms:GenerateDataKey", "kms:Decrypt"], resources=[ctx.keys.data.key_arn])
            )
        for access in spec.access:
            self._grant(access, function, role)
        acknowledge(
            function,
            "AwsSolutions-L1",
            f"Pinned to Python {PYTHON_VERSION}: the asset is bundled with cp{PYTHON_VERSION.replace('.', '')} "
            "manylinux wheels (stacks/bundling.py) and tested by importing it under that version; the "
            "runtime and the bundle move together.",
        )
        acknowledge(
            role,
            "AwsSolutions-IAM5[Resource::*]",
            "X-Ray (xray:PutTraceSegments, xray:PutTelemetryRecords) and, where granted, ec2:Describe*, "
            "dms:DescribeReplicationTasks/DescribeReplications and cloudwatch:GetMetricData have no "
            "resource-level permissions: AWS requires Resource '*' for them.",
        )
        return function

    def _grant_network_interfaces(self, role: iam.Role, spec: HandlerSpec) -> None:
        """What Lambda needs to attach the function to the VPC, on this VPC's subnets and group only."""
        ctx = self._ctx
        network = self._network
        interfaces = ctx.arn("ec2", "network-interface/*")
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["ec2:CreateNetworkInterface"],
                resources=[
                    interfaces,
                    *(ctx.arn("ec2", f"subnet/{s}") for s in network.subnet_ids),
                    ctx.arn("ec2", f"security-group/{network.functions_sg.security_group_id}"),
                ],
            )
        )
        role.add_to_policy(
            iam.PolicyStatement(
                actions=[
                    "ec2:DeleteNetworkInterface",
                    "ec2:AssignPrivateIpAddresses",
                    "ec2:UnassignPrivateIpAddresses",
                ],
                resources=[interfaces],
                conditions={"ArnEquals": {"ec2:Vpc": ctx.arn("ec2", f"vpc/{network.vpc.vpc_id}")}},
            )
        )
        # Describe* calls have no resource-level permissions (Resource '*' is required).
        role.add_to_policy(
            iam.PolicyStatement(actions=["ec2:DescribeNetworkInterfaces", "ec2:DescribeSubnets"], resources=["*"])
        )
        acknowledge_resource(
            role,
            interfaces,
            "Lambda creates and deletes the function's network interfaces; their ids are not known "
            "before it does. Limited to this VPC (ec2:Vpc condition), its subnets and the functions' group.",
        )

    # -- access ------------------------------------------------------------------------------
    def _grant(self, access: Access, function: lambda_.Function, role: iam.Role) -> None:
        ctx = self._ctx
        m = ctx.migration
        if access is Access.ENGINE:
            # Every engine reaches the databases (dms: the cutover's fence marker table, dms_fence.py).
            self._grant(Access.DATABASES, function, role)
            if m.engine.type == "dms":
                self._grant(Access.METRICS_READ, function, role)
            if self._replication is not None:  # the dms engine's task and/or the DMS change stream
                self._grant(Access.DMS, function, role)
            if self._change_stream is not None:  # engine debezium: the connector and the applier's mappings
                self._change_stream.grant_control(function, role)
        elif access is Access.CHANGE_STREAM:
            if self._change_stream is not None:
                self._change_stream.grant_control(function, role)
        elif access is Access.APPLY:
            if self._change_stream is None:
                raise ValueError(f"{function.node.id}: Access.APPLY needs the change stream (engine debezium)")
            self._change_stream.grant_apply(function, role)
            # Event source mappings carry no migration settings: the applier reads them from the parameter.
            function.add_environment("ZDM_SETTINGS_PARAMETER", self._settings.parameter_name)
            role.add_to_policy(
                iam.PolicyStatement(actions=["ssm:GetParameter"], resources=[self._settings.parameter_arn])
            )
        elif access is Access.DATABASES:
            endpoints = (m.source, m.target)
            role.add_to_policy(
                iam.PolicyStatement(
                    actions=["secretsmanager:GetSecretValue"],
                    resources=[e.secret_arn for e in endpoints if e.secret_arn],
                )
            )
            keys = sorted({e.secret_kms_key_arn for e in endpoints if e.secret_kms_key_arn})
            if keys:
                role.add_to_policy(
                    iam.PolicyStatement(
                        actions=["kms:Decrypt"],
                        resources=keys,
                        conditions={
                            "StringEquals": {"kms:ViaService": f"secretsmanager.{ctx.env.region}.amazonaws.com"}
                        },
                    )
                )
        elif access is Access.DMS:
            tasks = self._replication.tasks if self._replication else []
            if not tasks:
                return
            stack = cdk.Stack.of(self)
            for task in tasks:
                variable = "ZDM_DMS_CHANGE_STREAM" if task.target.migration_type == "cdc" else "ZDM_DMS_TARGET"
                function.add_environment(variable, stack.to_json_string(_target_json(task.target)))
            instance_tasks = [t.arn for t in tasks if t.target.kind == "task"]
            serverless = [t.arn for t in tasks if t.target.kind == "serverless"]
            if instance_tasks:
                role.add_to_policy(
                    iam.PolicyStatement(
                        actions=["dms:StartReplicationTask", "dms:StopReplicationTask", "dms:DescribeTableStatistics"],
                        resources=instance_tasks,
                    )
                )
                # DescribeReplicationTasks has no resource-level permissions (Resource '*' is required).
                role.add_to_policy(iam.PolicyStatement(actions=["dms:DescribeReplicationTasks"], resources=["*"]))
            if serverless:
                role.add_to_policy(
                    iam.PolicyStatement(
                        actions=[
                            "dms:StartReplication",
                            "dms:StopReplication",
                            "dms:DescribeReplicationTableStatistics",
                        ],
                        resources=serverless,
                    )
                )
                # DescribeReplications has no resource-level permissions (Resource '*' is required).
                role.add_to_policy(iam.PolicyStatement(actions=["dms:DescribeReplications"], resources=["*"]))
        elif access is Access.DMS_LAG:
            tasks = [
                t for t in (self._replication.tasks if self._replication else []) if t.target.migration_type != "cdc"
            ]
            if m.engine.type != "dms" or not tasks:
                return
            stack = cdk.Stack.of(self)
            function.add_environment("ZDM_DMS_TARGET", stack.to_json_string(_target_json(tasks[0].target)))
            self._grant(Access.METRICS_READ, function, role)
        elif access is Access.METRICS_READ:
            # GetMetricData has no resource-level permissions (Resource '*' is required).
            role.add_to_policy(iam.PolicyStatement(actions=["cloudwatch:GetMetricData"], resources=["*"]))
        elif access is Access.ALARMS_READ:
            names = [*m.alarms.names, f"{alarm_name_prefix(ctx.name)}*"]
            function.add_environment("ZDM_ALARM_NAMES", json.dumps(m.alarms.names))
            function.add_environment("ZDM_ALARM_PREFIX", alarm_name_prefix(ctx.name))
            resources = [ctx.arn("cloudwatch", f"alarm:{n}") for n in names]
            role.add_to_policy(iam.PolicyStatement(actions=["cloudwatch:DescribeAlarms"], resources=resources))
            acknowledge_resource(
                role,
                resources[-1],
                "The alarms this migration's stack creates, all named with its prefix zdm-<name>-.",
            )
        elif access is Access.TRAFFIC:
            self._grant_traffic(function, role)
        elif access is Access.VALIDATION_STORE:
            if self._validation_store is None:
                raise ValueError(f"{function.node.id}: Access.VALIDATION_STORE needs the validation store")
            self._validation_store.grant_functions(function, role)
        elif access is Access.EXECUTIONS:
            function.add_environment("ZDM_STATE_MACHINE_ARN", self.state_machine_arn)
            executions = ctx.arn("states", f"execution:{self.state_machine_name}:*")
            role.add_to_policy(
                iam.PolicyStatement(
                    actions=["states:ListExecutions", "states:StartExecution"], resources=[self.state_machine_arn]
                )
            )
            role.add_to_policy(iam.PolicyStatement(actions=["states:StopExecution"], resources=[executions]))
            acknowledge_resource(
                role,
                executions,
                "The executions of this migration's state machine only; their names are not known in advance.",
            )

    def _grant_traffic(self, function: lambda_.Function, role: iam.Role) -> None:
        ctx = self._ctx
        traffic = self._traffic
        function.add_environment(
            "ZDM_TRAFFIC",
            cdk.Stack.of(self).to_json_string(
                {
                    "hosted_zone_id": traffic.zone.hosted_zone_id,
                    "writer_record": traffic.writer_name,
                    "reader_record": traffic.reader_name,
                    "proxies": traffic.proxy_names,
                }
            ),
        )
        role.add_to_policy(
            iam.PolicyStatement(
                actions=["route53:ChangeResourceRecordSets"],
                resources=[traffic.zone_arn],
                conditions={
                    "ForAllValues:StringEquals": {
                        "route53:ChangeResourceRecordSetsNormalizedRecordNames": [
                            traffic.writer_name.lower(),
                            traffic.reader_name.lower(),
                        ],
                        "route53:ChangeResourceRecordSetsRecordTypes": ["CNAME"],
                    }
                },
            )
        )
        role.add_to_policy(
            iam.PolicyStatement(actions=["route53:ListResourceRecordSets"], resources=[traffic.zone_arn])
        )
        changes = ctx.arn("route53", "change/*", region=False, account=False)
        role.add_to_policy(iam.PolicyStatement(actions=["route53:GetChange"], resources=[changes]))
        acknowledge_resource(
            role,
            changes,
            "route53:GetChange polls the change just submitted; change ids exist only after the call.",
        )
        proxies = [s for s in traffic.sides.values() if s.proxy is not None]
        if proxies:
            resources: list[str] = []
            for side in proxies:
                assert side.proxy is not None
                resources.append(side.proxy.db_proxy_arn)
                resources.extend(side.database_arns)
            # Target groups are named 'default' by RDS; their ARNs carry a generated id.
            groups = ctx.arn("rds", "target-group:*")
            resources.append(groups)
            role.add_to_policy(
                iam.PolicyStatement(
                    actions=[
                        "rds:RegisterDBProxyTargets",
                        "rds:DeregisterDBProxyTargets",
                        "rds:DescribeDBProxyTargets",
                        "rds:DescribeDBProxyTargetGroups",
                    ],
                    resources=resources,
                )
            )
            acknowledge_resource(
                role,
                groups,
                "A proxy's target group ARN carries an id RDS generates; the proxy ARN in the same "
                "statement limits the calls to this migration's proxies.",
            )

    def function_for(self, invoked_by: str) -> list[lambda_.Function]:
        return [self.functions[s.name] for s in self.specs if s.invoked_by == invoked_by]

    @property
    def security_group(self) -> ec2.ISecurityGroup:
        return self._network.functions_sg


def _target_json(target: object) -> dict[str, object]:
    from lambdas.core.engines.dms import DmsTarget

    assert isinstance(target, DmsTarget)
    return {
        "kind": target.kind,
        "arn": target.arn,
        "metric_dimensions": target.metric_dimensions,
        "migration_type": target.migration_type,
    }
