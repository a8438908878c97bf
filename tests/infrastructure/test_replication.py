"""Replication construct: DMS compute, endpoints through Secrets Manager, tasks, logs."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from aws_cdk.assertions import Match

from lambdas.core.engines.dms import matches
from tests.infrastructure.conftest import Synth

KEY = {"Fn::GetAtt": [Match.string_like_regexp("SecurityDataKey"), "Arn"]}


def test_replication_instance_is_private_encrypted_and_multi_az(example: Synth) -> None:
    example.template.has_resource_properties(
        "AWS::DMS::ReplicationInstance",
        {
            "ReplicationInstanceIdentifier": "zdm-shop-orders",
            "ResourceIdentifier": "zdm-shop-orders",
            "ReplicationInstanceClass": "dms.r6i.large",
            "AllocatedStorage": 100,
            "PubliclyAccessible": False,
            "MultiAZ": True,
            "KmsKeyId": KEY,
        },
    )
    example.template.has_resource_properties(
        "AWS::DMS::ReplicationSubnetGroup",
        {"SubnetIds": ["subnet-0a1b2c3d4e5f60001", "subnet-0a1b2c3d4e5f60002", "subnet-0a1b2c3d4e5f60003"]},
    )


def test_database_endpoints_read_credentials_from_secrets_manager_over_tls(shipped: Synth) -> None:
    if shipped.migration.engine.type != "dms":
        pytest.skip(f"engine {shipped.migration.engine.type}: no DMS endpoints")
    endpoints = [
        e["Properties"]
        for e in shipped.resources("AWS::DMS::Endpoint").values()
        if e["Properties"]["EngineName"] != "kafka"
    ]
    assert {e["EndpointType"] for e in endpoints} == {"source", "target"}
    for endpoint in endpoints:
        settings = endpoint["PostgreSqlSettings"]
        assert settings["SecretsManagerSecretId"].startswith("arn:aws:secretsmanager:eu-west-1:123456789012:secret:")
        assert "Fn::GetAtt" in settings["SecretsManagerAccessRoleArn"]
        assert endpoint["SslMode"] in ("require", "verify-full")
        assert "KmsKeyId" in endpoint
        for clear_text in ("Username", "Password", "ServerName"):
            assert clear_text not in endpoint
    source = next(e for e in endpoints if e["EndpointType"] == "source")["PostgreSqlSettings"]
    assert source["HeartbeatEnable"] is True and source["FailTasksOnLobTruncation"] is True


def test_the_access_role_is_assumed_by_regional_dms_and_reads_only_the_two_secrets(example: Synth) -> None:
    example.template.has_resource_properties(
        "AWS::IAM::Role",
        {
            "AssumeRolePolicyDocument": {
                "Statement": [
                    Match.object_like(
                        {
                            "Principal": {"Service": "dms.eu-west-1.amazonaws.com"},
                            "Condition": {"StringEquals": {"aws:SourceAccount": "123456789012"}},
                        }
                    )
                ]
            }
        },
    )
    example.template.has_resource_properties(
        "AWS::IAM::Policy",
        {
            "PolicyDocument": {
                "Statement": Match.array_with(
                    [
                        Match.object_like(
                            {
                                "Action": ["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"],
                                "Resource": [
                                    "arn:aws:secretsmanager:eu-west-1:123456789012:secret:shop/orders-pg13-source-AbCdEf",
                                    "arn:aws:secretsmanager:eu-west-1:123456789012:secret:shop/orders-pg16-target-GhIjKl",
                                ],
                            }
                        )
                    ]
                )
            },
            "Roles": [{"Ref": Match.string_like_regexp("ReplicationSecretsAccessRole")}],
        },
    )


def test_full_load_and_cdc_task_validates_logs_and_maps_the_file_tables(example: Synth) -> None:
    tasks = {
        t["Properties"]["MigrationType"]: t["Properties"]
        for t in example.resources("AWS::DMS::ReplicationTask").values()
    }
    task = tasks["full-load-and-cdc"]
    assert task["ResourceIdentifier"] == "zdm-shop-orders-load-cdc"
    settings = json.loads(task["ReplicationTaskSettings"])
    assert settings["ValidationSettings"]["EnableValidation"] is True
    assert settings["Logging"]["EnableLogging"] is True
    assert settings["TargetMetadata"]["FullLobMode"] is True
    assert settings["ErrorBehavior"]["DataTruncationErrorPolicy"] == "STOP_TASK"
    mappings = json.loads(task["TableMappings"])
    # include public.*, exclude public.*_archive and public.tmp_*
    assert matches(mappings, "public.orders")
    assert not matches(mappings, "public.orders_archive")
    assert not matches(mappings, "public.tmp_load")
    assert not matches(mappings, "sales.orders")
    example.template.has_resource_properties(
        "AWS::Logs::LogGroup",
        {"LogGroupName": "dms-tasks-zdm-shop-orders", "KmsKeyId": Match.any_value(), "RetentionInDays": 90},
    )


def test_cdc_only_task_streams_to_msk_with_scram_over_tls(example: Synth) -> None:
    tasks = {
        t["Properties"]["MigrationType"]: t["Properties"]
        for t in example.resources("AWS::DMS::ReplicationTask").values()
    }
    stream = tasks["cdc"]
    assert json.loads(stream["ReplicationTaskSettings"])["ValidationSettings"]["EnableValidation"] is False
    kafka = next(
        e["Properties"]
        for e in example.resources("AWS::DMS::Endpoint").values()
        if e["Properties"]["EngineName"] == "kafka"
    )
    settings = kafka["KafkaSettings"]
    assert settings["SecurityProtocol"] == "sasl-ssl"
    assert settings["Topic"] == "zdm.shop-orders.changes"
    # the password is a dynamic reference resolved by CloudFormation, never text in the template
    assert "{{resolve:secretsmanager:" in json.dumps(settings["SaslPassword"])


def test_serverless_replication_has_capacity_encryption_and_private_networking(serverless: Synth) -> None:
    config = next(iter(serverless.resources("AWS::DMS::ReplicationConfig").values()))["Properties"]
    assert config["ReplicationType"] == "full-load-and-cdc"
    assert config["ResourceIdentifier"] == "zdm-shop-payments-load-cdc"
    compute = config["ComputeConfig"]
    assert (compute["MinCapacityUnits"], compute["MaxCapacityUnits"], compute["MultiAZ"]) == (2, 32, True)
    assert "KmsKeyId" in compute and compute["VpcSecurityGroupIds"]
    assert config["ReplicationSettings"]["ValidationSettings"]["EnableValidation"] is True
    # the file's schemas, and the cutover's fence marker (_zdm.dms_fence_markers)
    assert {r["object-locator"]["schema-name"] for r in config["TableMappings"]["rules"]} == {
        "public",
        "ledger",
        "_zdm",
    }
    serverless.template.resource_count_is("AWS::DMS::ReplicationInstance", 0)
    serverless.template.has_resource_properties(
        "AWS::Logs::LogGroup", {"LogGroupName": "dms-serverless-replication-zdm-shop-payments-load-cdc"}
    )


def test_logical_engine_without_change_stream_builds_no_dms(synth: Callable[..., Synth]) -> None:
    result = synth("migrations/example.yaml", engine={"type": "logical"}, aws={"streaming": {"enabled": False}})
    for kind in ("AWS::DMS::ReplicationInstance", "AWS::DMS::Endpoint", "AWS::DMS::ReplicationTask"):
        result.template.resource_count_is(kind, 0)


def test_the_migration_task_carries_the_fence_marker_table_and_the_stream_task_does_not(example: Synth) -> None:
    # Given the example's two DMS tasks (the migration's, and the CDC-only change stream to MSK)
    tasks = {
        t["Properties"]["MigrationType"]: json.loads(t["Properties"]["TableMappings"])
        for t in example.resources("AWS::DMS::ReplicationTask").values()
    }
    # Then the cutover's marker table travels with the migration's task only
    assert matches(tasks["full-load-and-cdc"], "_zdm.dms_fence_markers")
    assert not matches(tasks["cdc"], "_zdm.dms_fence_markers")
    # And DMS's sessions on the target stay writable when the read shift fences the target
    target = next(
        e["Properties"]["PostgreSqlSettings"]
        for e in example.resources("AWS::DMS::Endpoint").values()
        if e["Properties"]["EndpointType"] == "target" and e["Properties"]["EngineName"] != "kafka"
    )
    assert "SET default_transaction_read_only = off" in target["AfterConnectScript"]
