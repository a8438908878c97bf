"""Security properties across the whole template: IAM scoped to ARNs, encryption, TLS, retention."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.infrastructure.conftest import Synth

# Actions AWS authorizes only on Resource "*" (no resource-level permissions); each used on purpose.
WILDCARD_RESOURCE_ACTIONS = {
    "xray:PutTraceSegments": "X-Ray tracing of functions and the state machine",
    "xray:PutTelemetryRecords": "X-Ray tracing",
    "xray:GetSamplingRules": "X-Ray tracing of the state machine",
    "xray:GetSamplingTargets": "X-Ray tracing of the state machine",
    "ec2:DescribeNetworkInterfaces": "Lambda VPC attachment",
    "ec2:DescribeSubnets": "Lambda VPC attachment",
    "dms:DescribeReplicationTasks": "the DMS engine finds its task's state",
    "dms:DescribeReplications": "the DMS engine finds its serverless replication's state",
    "cloudwatch:GetMetricData": "the DMS engine reads CDC latency",
    "logs:CreateLogDelivery": "Step Functions log delivery",
    "logs:GetLogDelivery": "Step Functions log delivery",
    "logs:UpdateLogDelivery": "Step Functions log delivery",
    "logs:DeleteLogDelivery": "Step Functions log delivery",
    "logs:ListLogDeliveries": "Step Functions log delivery",
    "logs:PutResourcePolicy": "Step Functions log delivery",
    "logs:DescribeResourcePolicies": "Step Functions log delivery",
    "logs:DescribeLogGroups": "Step Functions log delivery",
    "kafkaconnect:CreateConnector": "the debezium runtime creates its connector (no resource-level permissions)",
    "kafkaconnect:ListConnectors": "the debezium runtime finds its connector by name",
    "lambda:ListEventSourceMappings": "the debezium runtime finds the applier's event source mappings",
    "lambda:CreateEventSourceMapping": "the applier's mappings (a lambda:FunctionArn condition names the applier)",
    "ec2:DescribeVpcs": "MSK Connect and Lambda's MSK pollers validate the VPC",
    "ec2:DescribeSecurityGroups": "MSK Connect and Lambda's MSK pollers validate the security groups",
}


def _statements(result: Synth) -> Iterator[tuple[str, dict[str, Any]]]:
    for logical_id, policy in result.resources("AWS::IAM::Policy").items():
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]:
            yield logical_id, statement
    for logical_id, role in result.resources("AWS::IAM::Role").items():
        for policy in role["Properties"].get("Policies", []):
            for statement in policy["PolicyDocument"]["Statement"]:
                yield logical_id, statement


def _listify(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def test_no_iam_statement_has_a_wildcard_action(shipped: Synth) -> None:
    for logical_id, statement in _statements(shipped):
        for action in _listify(statement["Action"]):
            assert "*" not in action, f"{logical_id}: {action}"


def test_resource_star_only_for_actions_aws_authorizes_on_star(shipped: Synth) -> None:
    for logical_id, statement in _statements(shipped):
        if "*" in _listify(statement["Resource"]):
            for action in _listify(statement["Action"]):
                assert action in WILDCARD_RESOURCE_ACTIONS, f"{logical_id}: {action} on Resource '*'"


def test_no_role_has_a_managed_policy_or_admin_access(shipped: Synth) -> None:
    for logical_id, role in shipped.resources("AWS::IAM::Role").items():
        assert not role["Properties"].get("ManagedPolicyArns"), logical_id


def test_every_log_group_is_kms_encrypted_with_retention(shipped: Synth) -> None:
    groups = shipped.resources("AWS::Logs::LogGroup")
    assert groups
    for logical_id, group in groups.items():
        props = group["Properties"]
        assert "KmsKeyId" in props, logical_id
        assert props["RetentionInDays"] == shipped.migration.aws.log_retention_days, logical_id


def test_every_lambda_writes_to_its_own_encrypted_log_group(shipped: Synth) -> None:
    for logical_id, function in shipped.resources("AWS::Lambda::Function").items():
        assert "LogGroup" in function["Properties"].get("LoggingConfig", {}), logical_id


def test_keys_rotate_and_survive_the_stack(shipped: Synth) -> None:
    keys = shipped.resources("AWS::KMS::Key")
    assert len(keys) == 2
    for key in keys.values():
        assert key["Properties"]["EnableKeyRotation"] is True
        assert key["DeletionPolicy"] == "Retain"


def test_queues_are_encrypted_and_refuse_plain_http(shipped: Synth) -> None:
    for queue in shipped.resources("AWS::SQS::Queue").values():
        assert "KmsMasterKeyId" in queue["Properties"]
    policies = json.dumps([p["Properties"] for p in shipped.resources("AWS::SQS::QueuePolicy").values()])
    assert '"aws:SecureTransport": "false"' in policies


def test_no_secret_value_is_written_into_the_template(shipped: Synth) -> None:
    text = json.dumps(shipped.json)
    assert "password=" not in text.lower()
    for endpoint in shipped.resources("AWS::DMS::Endpoint").values():
        kafka = endpoint["Properties"].get("KafkaSettings", {})
        if "SaslPassword" in kafka:
            assert "{{resolve:secretsmanager:" in json.dumps(kafka["SaslPassword"])


@pytest.mark.parametrize(
    "path", ["migrations/example.yaml", "migrations/serverless-proxy.yaml", "migrations/debezium.yaml"]
)
def test_services_assume_roles_only_for_this_account(synth: Callable[..., Synth], path: str) -> None:
    result = synth(path)
    for logical_id, role in result.resources("AWS::IAM::Role").items():
        for statement in role["Properties"]["AssumeRolePolicyDocument"]["Statement"]:
            service = statement["Principal"].get("Service", "")
            accounted = ("states.amazonaws.com", "vpc-flow-logs.amazonaws.com", "kafkaconnect.amazonaws.com")
            if service in accounted or str(service).startswith("dms."):
                assert statement["Condition"]["StringEquals"]["aws:SourceAccount"] == "123456789012", logical_id
