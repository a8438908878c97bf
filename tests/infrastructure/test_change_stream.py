"""Change-stream construct (engine debezium on AWS): the MSK Connect plugin and worker
configuration, the connector's role, the applier and its grants, the dead-letter queue and the
alarms that roll back on a dead letter."""

from __future__ import annotations

import base64
import json
import re
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aws_cdk.assertions import Annotations, Match

from lambdas.core import telemetry
from lambdas.core.changestream.msk_runtime import CHANGE_STREAM_ENV, MskChangeStreamSettings
from stacks.config import MigrationConfigError
from stacks.connector_plugin import DEBEZIUM_ARTIFACTS, PROVIDED_BY_CONNECT, debezium_libs
from tests.infrastructure.conftest import Synth, load, synth_migration

SOURCE_SECRET = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:shop/events-pg13-source-MnOpQr"
TARGET_SECRET = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:shop/events-pg16-target-StUvWx"
# Dependencies copied into the depending jar (relocated classes), not needed beside it.
SHADED = {("jackson-core", "fastdoubleparser")}


def _resolve(value: Any) -> str:
    """A CloudFormation string value with Ref/GetAtt replaced by readable stand-ins."""
    if isinstance(value, str):
        return value
    if "Fn::Join" in value:
        delimiter, parts = value["Fn::Join"]
        return str(delimiter).join(_resolve(p) for p in parts)
    if "Ref" in value:
        return "aws" if value["Ref"] == "AWS::Partition" else f"ref:{value['Ref']}"
    if "Fn::GetAtt" in value:
        return f"att:{value['Fn::GetAtt'][0]}.{value['Fn::GetAtt'][1]}"
    raise AssertionError(f"unexpected value {value!r}")


def _function(result: Synth, module: str) -> dict[str, Any]:
    return next(
        f["Properties"]
        for f in result.resources("AWS::Lambda::Function").values()
        if f["Properties"].get("Handler") == f"lambdas.handlers.{module}.handler"
    )


def _role_statements(result: Synth, role_fragment: str) -> list[dict[str, Any]]:
    role = next(k for k in result.resources("AWS::IAM::Role") if role_fragment in k)
    return [
        s
        for p in result.resources("AWS::IAM::Policy").values()
        if {"Ref": role} in p["Properties"]["Roles"]
        for s in p["Properties"]["PolicyDocument"]["Statement"]
    ]


def _listify(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _actions(statements: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    by_action: dict[str, list[dict[str, Any]]] = {}
    for statement in statements:
        for action in _listify(statement["Action"]):
            by_action.setdefault(action, []).append(statement)
    return by_action


# -- the plugin -------------------------------------------------------------------------------------
def test_the_plugin_is_a_zip_of_the_debezium_connector_from_the_asset_bucket(debezium: Synth) -> None:
    plugin = next(iter(debezium.resources("AWS::KafkaConnect::CustomPlugin").values()))["Properties"]
    assert plugin["ContentType"] == "ZIP"
    assert re.match(r"^zdm-shop-events-debezium-[0-9a-f]{10}$", plugin["Name"])  # a new archive is a new plugin
    location = plugin["Location"]["S3Location"]
    assert "cdk-hnb659fds-assets" in json.dumps(location["BucketArn"])
    assert location["FileKey"].endswith(".zip")
    archive = debezium.stack.change_stream.archive  # type: ignore[union-attr]
    with zipfile.ZipFile(archive.path) as z:
        names = z.namelist()
        connector_jar = next(
            n for n in names if n.startswith("debezium-connector-postgres/debezium-connector-postgres-")
        )
        with z.open(connector_jar) as jar, zipfile.ZipFile(jar) as inner:
            assert "io/debezium/connector/postgresql/PostgresConnector.class" in inner.namelist()
    folders = {n.split("/")[0] for n in names}
    assert folders == {"debezium-connector-postgres"}  # no config provider given in the file
    for artifact in DEBEZIUM_ARTIFACTS:
        assert any(re.match(rf"debezium-connector-postgres/{re.escape(artifact)}-\d", n) for n in names), artifact
    for provided in PROVIDED_BY_CONNECT:  # Kafka Connect's own classes stay out of the plugin
        assert not any(re.match(rf".*/{re.escape(provided)}-\d", n) for n in names), provided


def test_every_compile_dependency_of_a_plugin_jar_is_in_the_plugin_or_provided_by_kafka_connect() -> None:
    ns = "{http://maven.apache.org/POM/4.0.0}"
    libs = debezium_libs()
    present = set(DEBEZIUM_ARTIFACTS)
    for artifact in DEBEZIUM_ARTIFACTS:
        jar = next(libs.glob(f"{artifact}-[0-9]*.jar"))
        with zipfile.ZipFile(jar) as z:
            poms = [n for n in z.namelist() if n.startswith("META-INF/maven/") and n.endswith(f"/{artifact}/pom.xml")]
            if not poms:
                continue  # no pom inside (postgresql, protobuf, sketches): no dependencies declared there
            root = ET.fromstring(z.read(poms[0]))
        for dependency in root.iterfind(f"{ns}dependencies/{ns}dependency"):
            scope = dependency.findtext(f"{ns}scope") or "compile"
            if scope not in ("compile", "runtime") or dependency.findtext(f"{ns}optional") == "true":
                continue
            name = dependency.findtext(f"{ns}artifactId") or ""
            if name.endswith("-test-container"):  # test-scoped in Debezium's parent pom
                continue
            if (artifact, name) in SHADED:
                continue
            assert name in present or name in PROVIDED_BY_CONNECT, f"{artifact} needs {name}"


def test_without_a_config_provider_the_synth_warns(debezium: Synth) -> None:
    Annotations.from_stack(debezium.stack).has_warning(
        "/Zdm-ShopEvents/ChangeStream", Match.string_like_regexp("config_provider_zip is not set")
    )


def test_the_config_provider_zip_goes_into_the_plugin(tmp_path: Path) -> None:
    provider = tmp_path / "msk-config-providers-0.4.0-with-dependencies.zip"
    with zipfile.ZipFile(provider, "w") as z:
        z.writestr("msk-config-providers/msk-config-providers-0.4.0.jar", b"PK fake provider")
        z.writestr("msk-config-providers/lib/secretsmanager-2.31.0.jar", b"PK fake sdk")
        z.writestr("README.md", "not a jar")
    result = synth_migration(load("migrations/debezium.yaml", aws={"debezium": {"config_provider_zip": str(provider)}}))
    archive = result.stack.change_stream.archive  # type: ignore[union-attr]
    assert archive.has_config_provider
    with zipfile.ZipFile(archive.path) as z:
        provided = sorted(n for n in z.namelist() if n.startswith("msk-config-providers/"))
    assert provided == [
        "msk-config-providers/msk-config-providers-0.4.0.jar",
        "msk-config-providers/secretsmanager-2.31.0.jar",
    ]
    Annotations.from_stack(result.stack).has_no_warning("*", Match.string_like_regexp("config_provider_zip"))


def test_a_missing_config_provider_file_or_debezium_jars_fail_the_synth_naming_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "nowhere.zip"
    with pytest.raises(MigrationConfigError, match=r"config_provider_zip: no file at .*nowhere\.zip"):
        synth_migration(load("migrations/debezium.yaml", aws={"debezium": {"config_provider_zip": str(missing)}}))
    monkeypatch.setenv("ZDM_DEBEZIUM_LIBS", str(tmp_path))
    with pytest.raises(MigrationConfigError, match="no jar for debezium-connector-postgres"):
        synth_migration(load("migrations/debezium.yaml"))


def test_worker_configuration_uses_json_without_schemas_and_the_secrets_manager_provider(debezium: Synth) -> None:
    worker = next(iter(debezium.resources("AWS::KafkaConnect::WorkerConfiguration").values()))["Properties"]
    properties = dict(
        line.split("=", 1) for line in base64.b64decode(worker["PropertiesFileContent"]).decode().splitlines()
    )
    assert properties == {
        "key.converter": "org.apache.kafka.connect.json.JsonConverter",
        "value.converter": "org.apache.kafka.connect.json.JsonConverter",
        "key.converter.schemas.enable": "false",
        "value.converter.schemas.enable": "false",
        "config.providers": "secretsmanager",
        "config.providers.secretsmanager.class": "com.amazonaws.kafka.config.providers.SecretsManagerConfigProvider",
        "config.providers.secretsmanager.param.region": "eu-west-1",
    }


# -- the connector's role -------------------------------------------------------------------------------
def test_the_connector_role_is_assumed_by_msk_connect_for_this_connector_only(debezium: Synth) -> None:
    role = next(r for k, r in debezium.resources("AWS::IAM::Role").items() if "ChangeStreamConnectorRole" in k)
    (statement,) = role["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    assert statement["Principal"] == {"Service": "kafkaconnect.amazonaws.com"}
    assert statement["Condition"]["StringEquals"] == {"aws:SourceAccount": "123456789012"}
    assert _resolve(statement["Condition"]["ArnLike"]["aws:SourceArn"]) == (
        "arn:aws:kafkaconnect:eu-west-1:123456789012:connector/zdm-shop-events-debezium/*"
    )


def test_the_connector_role_writes_this_clusters_topics_and_reads_only_the_source_secret(debezium: Synth) -> None:
    statements = _role_statements(debezium, "ChangeStreamConnectorRole")
    by_action = _actions(statements)
    assert [s["Resource"] for s in by_action["secretsmanager:GetSecretValue"]] == [SOURCE_SECRET]
    assert TARGET_SECRET not in json.dumps(statements)
    cluster = {"Fn::GetAtt": [Match.string_like_regexp("StreamingCluster"), "Arn"]}
    debezium.template.has_resource_properties(
        "AWS::IAM::Policy",
        {
            "PolicyDocument": {
                "Statement": Match.array_with(
                    [Match.object_like({"Action": Match.array_with(["kafka-cluster:Connect"]), "Resource": cluster})]
                )
            }
        },
    )
    # Every data-plane permission names this cluster: its ARN, or its topics and groups by name
    this_cluster = "arn:aws:kafka:eu-west-1:123456789012:"
    for statement in statements:
        if not any(a.startswith("kafka-cluster:") for a in _listify(statement["Action"])):
            continue
        for resource in _listify(statement["Resource"]):
            if isinstance(resource, dict) and "Fn::GetAtt" in resource:
                assert resource["Fn::GetAtt"][0].startswith("StreamingCluster")
            else:
                text = _resolve(resource)
                assert text.startswith(this_cluster) and "/zdm-shop-events-changes/*/" in text, text
    written = {_resolve(r) for s in by_action["kafka-cluster:WriteData"] for r in _listify(s["Resource"])}
    prefix = "arn:aws:kafka:eu-west-1:123456789012:topic/zdm-shop-events-changes/*/"
    assert written == {
        f"{prefix}shop_events.*",
        f"{prefix}__debezium-heartbeat.shop_events",
        f"{prefix}__amazon_msk_connect_*_zdm-shop-events-debezium_*",
        f"{prefix}__msk_connect_*_zdm-shop-events-debezium_*",
    }
    assert "kafka-cluster:*" not in json.dumps(statements)


# -- the replication function drives it -----------------------------------------------------------------
def test_the_replication_function_gets_the_runtime_settings(debezium: Synth) -> None:
    env = _function(debezium, "replication")["Environment"]["Variables"]
    settings = MskChangeStreamSettings.from_json(_resolve(env[CHANGE_STREAM_ENV]))
    assert settings.connector_name == "zdm-shop-events-debezium"
    assert settings.applier_function == _function(debezium, "apply_changes")["FunctionName"]
    assert settings.bootstrap_servers.endswith(".BootstrapBrokerStringSaslIam")
    assert (settings.custom_plugin_revision, settings.worker_configuration_revision) == (1, 1)
    assert (settings.batch_size, settings.batch_window_seconds, settings.maximum_retry_attempts) == (2000, 1, 3)
    assert (settings.mcu_count, settings.workers, settings.kafka_connect_version) == (1, 1, "3.7.x")
    assert settings.source_secret_arn == SOURCE_SECRET
    assert settings.dead_letter_queue_arn.startswith("att:ChangeStreamDeadLetters")
    assert len(settings.subnets) == 2 and len(settings.security_groups) == 1
    assert settings.connector_defaults["topic.creation.default.partitions"] == "1"
    assert settings.connector_defaults["config.action.reload"] == "none"
    assert "password" not in _resolve(env[CHANGE_STREAM_ENV]).lower().replace("source_secret_arn", "")


def test_the_replication_function_controls_this_connector_and_the_appliers_mappings_only(debezium: Synth) -> None:
    by_action = _actions(_role_statements(debezium, "OrchestrationReplicationRole"))
    connector = "arn:aws:kafkaconnect:eu-west-1:123456789012:connector/zdm-shop-events-debezium/*"
    for action in ("DescribeConnector", "PauseConnector", "ResumeConnector", "DeleteConnector"):
        assert [_resolve(s["Resource"]) for s in by_action[f"kafkaconnect:{action}"]] == [connector]
    applier = "arn:aws:lambda:eu-west-1:123456789012:function:zdm-shop-events-apply_changes"
    for action in ("CreateEventSourceMapping", "UpdateEventSourceMapping", "DeleteEventSourceMapping"):
        (statement,) = by_action[f"lambda:{action}"]
        condition = statement["Condition"]["ArnLike"]["lambda:FunctionArn"]
        assert [_resolve(c) for c in condition] == [applier, f"{applier}:*"]
    (mappings,) = by_action["lambda:DeleteEventSourceMapping"]
    assert _resolve(mappings["Resource"]) == "arn:aws:lambda:eu-west-1:123456789012:event-source-mapping:*"
    (pass_role,) = by_action["iam:PassRole"]
    assert pass_role["Condition"] == {"StringEquals": {"iam:PassedToService": "kafkaconnect.amazonaws.com"}}
    assert pass_role["Resource"]["Fn::GetAtt"][0].startswith("ChangeStreamConnectorRole")
    assert "lambda:InvokeFunction" not in by_action


# -- the applier ---------------------------------------------------------------------------------------
def test_the_applier_runs_in_the_vpc_with_its_settings(debezium: Synth) -> None:
    applier = _function(debezium, "apply_changes")
    assert applier["FunctionName"] == "zdm-shop-events-apply_changes"
    assert "VpcConfig" in applier
    assert applier["Timeout"] <= 14 * 60  # event source mappings allow at most 14 minutes
    env = applier["Environment"]["Variables"]
    assert {CHANGE_STREAM_ENV, "ZDM_SETTINGS_PARAMETER", "ZDM_MIGRATION"} <= set(env)
    assert env["ZDM_DEAD_LETTER_QUEUE_URL"]["Ref"].startswith("ChangeStreamDeadLetters")
    # the names the handler reads
    from lambdas.handlers import apply_changes

    assert {apply_changes.SETTINGS_PARAMETER_ENV, apply_changes.DEAD_LETTER_QUEUE_URL_ENV} <= set(env)


def test_the_applier_reads_the_table_topics_the_target_secret_and_writes_the_dead_letter_queue(
    debezium: Synth,
) -> None:
    statements = _role_statements(debezium, "OrchestrationApplyChangesRole")
    by_action = _actions(statements)
    assert [s["Resource"] for s in by_action["secretsmanager:GetSecretValue"]] == [TARGET_SECRET]
    assert SOURCE_SECRET not in json.dumps(statements)
    prefix = "arn:aws:kafka:eu-west-1:123456789012:"
    assert [_resolve(s["Resource"]) for s in by_action["kafka-cluster:ReadData"]] == [
        f"{prefix}topic/zdm-shop-events-changes/*/shop_events.*"
    ]
    assert [_resolve(s["Resource"]) for s in by_action["kafka-cluster:AlterGroup"]] == [
        f"{prefix}group/zdm-shop-events-changes/*/zdm-shop-events-apply.*"
    ]
    assert "kafka-cluster:WriteData" not in by_action
    (send,) = by_action["sqs:SendMessage"]
    assert send["Resource"]["Fn::GetAtt"][0].startswith("ChangeStreamDeadLetters")
    assert "kafka:DescribeClusterV2" in by_action


def test_the_dead_letter_queue_is_encrypted_with_the_data_key_and_refuses_plain_http(debezium: Synth) -> None:
    queue_id, queue = next(
        (k, q) for k, q in debezium.resources("AWS::SQS::Queue").items() if k.startswith("ChangeStreamDeadLetters")
    )
    assert queue["Properties"]["QueueName"] == "zdm-shop-events-change-dead-letters"
    assert queue["Properties"]["KmsMasterKeyId"]["Fn::GetAtt"][0].startswith("SecurityDataKey")
    debezium.template.has_resource_properties(
        "AWS::SQS::QueuePolicy",
        {
            "Queues": [{"Ref": queue_id}],
            "PolicyDocument": {
                "Statement": Match.array_with(
                    [Match.object_like({"Effect": "Deny", "Condition": {"Bool": {"aws:SecureTransport": "false"}}})]
                )
            },
        },
    )
    debezium.template.has_resource_properties(
        "AWS::EC2::VPCEndpoint", {"ServiceName": "com.amazonaws.eu-west-1.sqs", "PrivateDnsEnabled": True}
    )


def test_a_dead_letter_or_a_queued_failed_batch_trips_the_composite(debezium: Synth) -> None:
    alarms = {k: a["Properties"] for k, a in debezium.resources("AWS::CloudWatch::Alarm").items()}
    by_name = {a["AlarmName"]: (k, a) for k, a in alarms.items()}
    dead_id, dead = by_name["zdm-shop-events-change-stream-dead-letters"]
    assert (dead["Namespace"], dead["MetricName"], dead["Statistic"]) == ("Zdm", telemetry.DEAD_LETTERS, "Sum")
    assert {d["Name"]: d["Value"] for d in dead["Dimensions"]} == telemetry.dimensions("shop-events")
    assert (dead["Threshold"], dead["ComparisonOperator"], dead["EvaluationPeriods"]) == (
        1,
        "GreaterThanOrEqualToThreshold",
        1,
    )
    queued_id, queued = by_name["zdm-shop-events-change-stream-failed-batches"]
    assert (queued["Namespace"], queued["MetricName"]) == ("AWS/SQS", "ApproximateNumberOfMessagesVisible")
    assert queued["Threshold"] == 1 and queued["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"
    composite = next(iter(debezium.resources("AWS::CloudWatch::CompositeAlarm").values()))["Properties"]
    rule = json.dumps(composite["AlarmRule"])
    assert dead_id in rule and queued_id in rule


# -- where it is built ---------------------------------------------------------------------------------
def test_engine_debezium_builds_the_cluster_even_with_streaming_disabled(synth: Callable[..., Synth]) -> None:
    result = synth(
        "migrations/debezium.yaml", aws={"streaming": {"enabled": False}, "debezium": {"sqs_endpoint": False}}
    )
    result.template.resource_count_is("AWS::MSK::ServerlessCluster", 1)
    result.template.resource_count_is("AWS::KafkaConnect::CustomPlugin", 1)
    result.template.resource_count_is("AWS::EC2::VPCEndpoint", 0)
    result.template.has_resource_properties(
        "AWS::MSK::ServerlessCluster", {"ClientAuthentication": {"Sasl": {"Iam": {"Enabled": True}}}}
    )


def test_other_engines_build_no_change_stream(example: Synth, serverless: Synth) -> None:
    for result in (example, serverless):
        for kind in ("AWS::KafkaConnect::CustomPlugin", "AWS::KafkaConnect::WorkerConfiguration"):
            result.template.resource_count_is(kind, 0)
        handlers = {f["Properties"].get("Handler") for f in result.resources("AWS::Lambda::Function").values()}
        assert "lambdas.handlers.apply_changes.handler" not in handlers
        env = json.dumps(_function(result, "replication")["Environment"])
        assert CHANGE_STREAM_ENV not in env


def test_the_connectors_workers_reach_the_cluster_the_source_and_https_only(debezium: Synth) -> None:
    group_id, group = next(
        (k, g) for k, g in debezium.resources("AWS::EC2::SecurityGroup").items() if "ConnectorSecurityGroup" in k
    )
    egress = group["Properties"]["SecurityGroupEgress"]
    ports = sorted((e.get("FromPort"), e.get("CidrIp", "group")) for e in egress)
    assert ports == [(443, "0.0.0.0/0"), (5432, "10.82.0.0/16")]
    rules = [
        r["Properties"]
        for r in debezium.resources("AWS::EC2::SecurityGroupEgress").values()
        if r["Properties"]["GroupId"] == {"Fn::GetAtt": [group_id, "GroupId"]}
    ]
    assert [(r["FromPort"], r["ToPort"]) for r in rules] == [(9098, 9098)]
