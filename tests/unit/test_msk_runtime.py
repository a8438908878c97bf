"""The MSK runtime of the change stream over botocore Stubbers of real 'kafkaconnect' and 'lambda'
clients: every request is checked against the service model and the expected parameters, every
canned response against the response shape (moto has neither MSK Connect nor MSK event sources)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

import boto3
import pytest
from botocore.stub import ANY, Stubber

from lambdas.core.changestream.msk_runtime import (
    CHANGE_STREAM_ENV,
    ChangeStreamBusy,
    ChangeStreamFailed,
    MskChangeStream,
    MskChangeStreamSettings,
    secret_reference,
)
from lambdas.core.changestream.runtime import PartState

REGION = "eu-west-1"
ACCOUNT = "123456789012"
CLUSTER = f"arn:aws:kafka:{REGION}:{ACCOUNT}:cluster/zdm-shop-events-changes/0a1b2c3d-aaaa-bbbb-cccc-0123456789ab-s2"
CONNECTOR = "zdm-shop-events-debezium"
CONNECTOR_ARN = f"arn:aws:kafkaconnect:{REGION}:{ACCOUNT}:connector/{CONNECTOR}/5e6f7a8b-1111-2222-3333-444455556666-3"
APPLIER = "zdm-shop-events-apply_changes"
QUEUE = f"arn:aws:sqs:{REGION}:{ACCOUNT}:zdm-shop-events-change-dead-letters"
SECRET = f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:shop/events-pg13-source-MnOpQr"
TOPICS = ["shop_events.public.orders", "shop_events.public.customers"]
CONNECTOR_SETTINGS = {"connector.class": "io.debezium.connector.postgresql.PostgresConnector", "tasks.max": "1"}


def _settings(**changes: Any) -> MskChangeStreamSettings:
    values: dict[str, Any] = {
        "connector_name": CONNECTOR,
        "cluster_arn": CLUSTER,
        "bootstrap_servers": "b-1.zdm.kafka-serverless.eu-west-1.amazonaws.com:9098",
        "custom_plugin_arn": f"arn:aws:kafkaconnect:{REGION}:{ACCOUNT}:custom-plugin/zdm-shop-events-debezium/abc-1",
        "custom_plugin_revision": 1,
        "worker_configuration_arn": f"arn:aws:kafkaconnect:{REGION}:{ACCOUNT}:worker-configuration/zdm-w/def-1",
        "worker_configuration_revision": 1,
        "service_execution_role_arn": f"arn:aws:iam::{ACCOUNT}:role/zdm-connector",
        "subnets": ["subnet-0a1b2c3d4e5f60001", "subnet-0a1b2c3d4e5f60002"],
        "security_groups": ["sg-0a1b2c3d4e5f60ccc"],
        "log_group": "/aws/vendedlogs/zdm/shop-events/msk-connect",
        "applier_function": APPLIER,
        "dead_letter_queue_arn": QUEUE,
        "consumer_group_prefix": "zdm-shop-events-apply",
        "batch_size": 500,
        "batch_window_seconds": 1,
        "maximum_retry_attempts": 3,
        "source_secret_arn": SECRET,
        "connector_defaults": {"topic.creation.default.partitions": "1", "tasks.max": "9"},
    }
    values.update(changes)
    return MskChangeStreamSettings(**values)


class Clients:
    def __init__(self) -> None:
        creds = {"region_name": REGION, "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
        self.connect = boto3.client("kafkaconnect", **creds)
        self.lambda_ = boto3.client("lambda", **creds)
        self.connect_stub = Stubber(self.connect)
        self.lambda_stub = Stubber(self.lambda_)

    def runtime(self, **changes: Any) -> MskChangeStream:
        return MskChangeStream(self.connect, self.lambda_, _settings(**changes))

    # -- MSK Connect ---------------------------------------------------------------------------
    def connectors(self, state: str | None) -> None:
        summaries = [] if state is None else [_summary(state)]
        self.connect_stub.add_response(
            "list_connectors", {"connectors": summaries}, expected_params={"connectorNamePrefix": CONNECTOR}
        )

    def describe(self, state: str, code: str | None = None, message: str | None = None) -> None:
        description = {k: v for k, v in (("code", code), ("message", message)) if v}
        response: dict[str, Any] = {"connectorArn": CONNECTOR_ARN, "connectorState": state}
        if description:
            response["stateDescription"] = description
        self.connect_stub.add_response("describe_connector", response, expected_params={"connectorArn": CONNECTOR_ARN})

    # -- Lambda --------------------------------------------------------------------------------
    def mappings(self, *mappings: dict[str, Any]) -> None:
        self.lambda_stub.add_response(
            "list_event_source_mappings",
            {"EventSourceMappings": list(mappings)},
            expected_params={"EventSourceArn": CLUSTER, "FunctionName": APPLIER},
        )

    def done(self) -> None:
        self.connect_stub.assert_no_pending_responses()
        self.lambda_stub.assert_no_pending_responses()


def _summary(state: str) -> dict[str, Any]:
    return {"connectorName": CONNECTOR, "connectorArn": CONNECTOR_ARN, "connectorState": state}


def _uuid(topic: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, topic))


def _mapping(topic: str, state: str = "Enabled", result: str = "OK") -> dict[str, Any]:
    return {
        "UUID": _uuid(topic),
        "Topics": [topic],
        "State": state,
        "LastProcessingResult": result,
        "EventSourceArn": CLUSTER,
        "StateTransitionReason": "USER_INITIATED",
    }


@pytest.fixture
def aws() -> Iterator[Clients]:
    clients = Clients()
    with clients.connect_stub, clients.lambda_stub:
        yield clients


def _expected_mapping(topic: str) -> dict[str, Any]:
    return {
        "EventSourceArn": CLUSTER,
        "FunctionName": APPLIER,
        "Topics": [topic],
        "StartingPosition": "TRIM_HORIZON",
        "BatchSize": 500,
        "MaximumBatchingWindowInSeconds": 1,
        "MaximumRetryAttempts": 3,
        "DestinationConfig": {"OnFailure": {"Destination": QUEUE}},
        "AmazonManagedKafkaEventSourceConfig": {"ConsumerGroupId": f"zdm-shop-events-apply.{topic}"},
        "Enabled": True,
    }


def _expected_connector() -> dict[str, Any]:
    s = _settings()
    return {
        "connectorName": CONNECTOR,
        "connectorDescription": ANY,
        "kafkaConnectVersion": "3.7.x",
        "capacity": {"provisionedCapacity": {"mcuCount": 1, "workerCount": 1}},
        # the stack's defaults under the given settings (which win: tasks.max stays 1)
        "connectorConfiguration": {**CONNECTOR_SETTINGS, "topic.creation.default.partitions": "1"},
        "kafkaCluster": {
            "apacheKafkaCluster": {
                "bootstrapServers": s.bootstrap_servers,
                "vpc": {"subnets": s.subnets, "securityGroups": s.security_groups},
            }
        },
        "kafkaClusterClientAuthentication": {"authenticationType": "IAM"},
        "kafkaClusterEncryptionInTransit": {"encryptionType": "TLS"},
        "plugins": [{"customPlugin": {"customPluginArn": s.custom_plugin_arn, "revision": 1}}],
        "serviceExecutionRoleArn": s.service_execution_role_arn,
        "workerConfiguration": {"workerConfigurationArn": s.worker_configuration_arn, "revision": 1},
        "logDelivery": {"workerLogDelivery": {"cloudWatchLogs": {"enabled": True, "logGroup": s.log_group}}},
    }


# -- start ---------------------------------------------------------------------------------------
def test_start_creates_one_mapping_per_topic_then_the_connector_with_iam_over_tls(aws: Clients) -> None:
    # Given nothing exists yet
    aws.mappings()
    for topic in TOPICS:
        aws.lambda_stub.add_response(
            "create_event_source_mapping", {"UUID": _uuid(topic)}, expected_params=_expected_mapping(topic)
        )
    aws.connectors(None)
    aws.connect_stub.add_response(
        "create_connector",
        {"connectorArn": CONNECTOR_ARN, "connectorName": CONNECTOR, "connectorState": "CREATING"},
        expected_params=_expected_connector(),
    )
    # When started / Then every call matches, in this order (the stubs fail on anything else)
    aws.runtime().start(CONNECTOR_SETTINGS, TOPICS)
    aws.done()


def test_start_again_creates_nothing(aws: Clients) -> None:
    # Given the mappings and the connector exist and run (a retried task calls start again)
    aws.mappings(*(_mapping(t) for t in TOPICS))
    aws.connectors("RUNNING")
    # When started again / Then only the look-ups happen
    aws.runtime().start(CONNECTOR_SETTINGS, TOPICS)
    aws.done()


def test_start_after_stop_resumes_the_connector_and_enables_the_mappings(aws: Clients) -> None:
    aws.mappings(*(_mapping(t, "Disabled") for t in TOPICS))
    for topic in TOPICS:
        aws.lambda_stub.add_response(
            "update_event_source_mapping",
            {"UUID": _uuid(topic), "State": "Enabling"},
            expected_params={"UUID": _uuid(topic), "Enabled": True},
        )
    aws.connectors("PAUSED")
    aws.connect_stub.add_response(
        "resume_connector", {"connectorArn": CONNECTOR_ARN}, expected_params={"connectorArn": CONNECTOR_ARN}
    )
    aws.runtime().start(CONNECTOR_SETTINGS, TOPICS)
    aws.done()


def test_start_calls_the_topic_creator_first_when_given(aws: Clients) -> None:
    created: list[list[str]] = []
    aws.mappings(*(_mapping(t) for t in TOPICS))
    aws.connectors("RUNNING")
    runtime = MskChangeStream(aws.connect, aws.lambda_, _settings(), ensure_topics=created.append)
    runtime.start(CONNECTOR_SETTINGS, [*TOPICS, TOPICS[0]])
    assert created == [TOPICS]
    aws.done()


def test_a_mapping_or_connector_created_meanwhile_is_not_an_error(aws: Clients) -> None:
    aws.mappings(_mapping(TOPICS[1]))
    aws.lambda_stub.add_client_error(
        "create_event_source_mapping",
        service_error_code="ResourceConflictException",
        http_status_code=409,
        expected_params=_expected_mapping(TOPICS[0]),
    )
    aws.connectors(None)
    aws.connect_stub.add_client_error("create_connector", service_error_code="ConflictException", http_status_code=409)
    aws.runtime().start(CONNECTOR_SETTINGS, TOPICS)
    aws.done()


def test_start_on_a_failed_connector_raises_with_msk_connects_reason(aws: Clients) -> None:
    aws.mappings(*(_mapping(t) for t in TOPICS))
    aws.connectors("FAILED")
    aws.describe("FAILED", "ResourceNotFound", "The plugin revision could not be found")
    with pytest.raises(ChangeStreamFailed, match="ResourceNotFound: The plugin revision could not be found"):
        aws.runtime().start(CONNECTOR_SETTINGS, TOPICS)
    aws.done()


def test_start_while_the_connector_is_deleted_asks_to_retry(aws: Clients) -> None:
    aws.mappings(*(_mapping(t) for t in TOPICS))
    aws.connectors("DELETING")
    with pytest.raises(ChangeStreamBusy, match="deleting"):
        aws.runtime().start(CONNECTOR_SETTINGS, TOPICS)
    aws.done()


# -- health ----------------------------------------------------------------------------------------
def test_health_of_running_parts(aws: Clients) -> None:
    aws.connectors("RUNNING")
    aws.mappings(*(_mapping(t) for t in TOPICS))
    health = aws.runtime().health()
    assert (health.connector, health.applier, health.problems) == (PartState.RUNNING, PartState.RUNNING, [])
    assert health.running
    aws.done()


def test_health_of_nothing_is_absent(aws: Clients) -> None:
    aws.connectors(None)
    aws.mappings()
    health = aws.runtime().health()
    assert (health.connector, health.applier) == (PartState.ABSENT, PartState.ABSENT)
    aws.done()


def test_a_failed_connector_is_failed_with_its_reason(aws: Clients) -> None:
    aws.connectors("FAILED")
    aws.describe("FAILED", "WorkerError", "Access denied to secret shop/events-pg13-source")
    aws.mappings(*(_mapping(t) for t in TOPICS))
    health = aws.runtime().health()
    assert health.connector is PartState.FAILED
    assert health.applier is PartState.RUNNING
    assert health.problems == [
        f"connector {CONNECTOR} failed: WorkerError: Access denied to secret shop/events-pg13-source"
    ]
    aws.done()


def test_a_mapping_with_a_problem_fails_the_applier_with_the_reason(aws: Clients) -> None:
    aws.connectors("RUNNING")
    problem = "PROBLEM: Cluster failed to authorize Lambda."
    aws.mappings(_mapping(TOPICS[0]), _mapping(TOPICS[1], result=problem))
    health = aws.runtime().health()
    assert health.applier is PartState.FAILED
    assert health.problems == [f"mapping of topic {TOPICS[1]}: {problem}"]
    aws.done()


@pytest.mark.parametrize(
    ("connector", "mappings", "expected"),
    [
        ("CREATING", ("Creating", "Enabled"), (PartState.STARTING, PartState.STARTING)),
        ("PAUSING", ("Disabling", "Disabled"), (PartState.PAUSED, PartState.PAUSED)),
        ("PAUSED", ("Disabled", "Enabled"), (PartState.PAUSED, PartState.PAUSED)),
        ("RESUMING", ("Enabled", "Enabled"), (PartState.STARTING, PartState.RUNNING)),
    ],
)
def test_states_map_to_part_states(
    aws: Clients, connector: str, mappings: tuple[str, str], expected: tuple[PartState, PartState]
) -> None:
    aws.connectors(connector)
    aws.mappings(*(_mapping(t, s) for t, s in zip(TOPICS, mappings, strict=True)))
    health = aws.runtime().health()
    assert (health.connector, health.applier) == expected
    aws.done()


# -- stop ------------------------------------------------------------------------------------------
def test_stop_disables_the_mappings_and_pauses_the_connector_then_does_nothing(aws: Clients) -> None:
    aws.mappings(*(_mapping(t) for t in TOPICS))
    for topic in TOPICS:
        aws.lambda_stub.add_response(
            "update_event_source_mapping",
            {"UUID": _uuid(topic), "State": "Disabling"},
            expected_params={"UUID": _uuid(topic), "Enabled": False},
        )
    aws.connectors("RUNNING")
    aws.connect_stub.add_response(
        "pause_connector", {"connectorArn": CONNECTOR_ARN}, expected_params={"connectorArn": CONNECTOR_ARN}
    )
    runtime = aws.runtime()
    runtime.stop()
    # Again (a retried rollback): everything is paused already
    aws.mappings(*(_mapping(t, "Disabled") for t in TOPICS))
    aws.connectors("PAUSED")
    runtime.stop()
    aws.done()


def test_stop_while_a_mapping_is_created_asks_to_retry(aws: Clients) -> None:
    aws.mappings(_mapping(TOPICS[0], "Creating"))
    with pytest.raises(ChangeStreamBusy, match="creating"):
        aws.runtime().stop()
    aws.done()


# -- teardown ----------------------------------------------------------------------------------------
def test_teardown_removes_mappings_and_connector_and_twice_removes_nothing(aws: Clients) -> None:
    aws.mappings(*(_mapping(t) for t in TOPICS))
    for topic in TOPICS:
        aws.lambda_stub.add_response(
            "delete_event_source_mapping",
            {"UUID": _uuid(topic), "State": "Deleting"},
            expected_params={"UUID": _uuid(topic)},
        )
    aws.connectors("RUNNING")
    aws.connect_stub.add_response(
        "delete_connector",
        {"connectorArn": CONNECTOR_ARN, "connectorState": "DELETING"},
        expected_params={"connectorArn": CONNECTOR_ARN},
    )
    runtime = aws.runtime()
    removed = runtime.teardown()
    assert removed == [
        f"event source mapping {TOPICS[0]} -> {APPLIER}",
        f"event source mapping {TOPICS[1]} -> {APPLIER}",
        f"connector {CONNECTOR}",
    ]
    # A second teardown while AWS is still deleting, then once everything is gone: nothing to remove
    aws.mappings(*(_mapping(t, "Deleting") for t in TOPICS))
    aws.connectors("DELETING")
    assert runtime.teardown() == []
    aws.mappings()
    aws.connectors(None)
    assert runtime.teardown() == []
    aws.done()


def test_teardown_tolerates_a_mapping_deleted_meanwhile(aws: Clients) -> None:
    aws.mappings(_mapping(TOPICS[0]))
    aws.lambda_stub.add_client_error(
        "delete_event_source_mapping", service_error_code="ResourceNotFoundException", http_status_code=404
    )
    aws.connectors(None)
    assert aws.runtime().teardown() == []
    aws.done()


def test_lookups_follow_pages(aws: Clients) -> None:
    # Given a prefix that also matches another connector, and mappings over two pages
    other = {**_summary("RUNNING"), "connectorName": f"{CONNECTOR}-old", "connectorArn": f"{CONNECTOR_ARN}x"}
    aws.connect_stub.add_response(
        "list_connectors",
        {"connectors": [other], "nextToken": "t2"},
        expected_params={"connectorNamePrefix": CONNECTOR},
    )
    aws.connect_stub.add_response(
        "list_connectors",
        {"connectors": [_summary("RUNNING")]},
        expected_params={"connectorNamePrefix": CONNECTOR, "nextToken": "t2"},
    )
    aws.lambda_stub.add_response(
        "list_event_source_mappings",
        {"EventSourceMappings": [_mapping(TOPICS[0])], "NextMarker": "m2"},
        expected_params={"EventSourceArn": CLUSTER, "FunctionName": APPLIER},
    )
    aws.lambda_stub.add_response(
        "list_event_source_mappings",
        {"EventSourceMappings": [_mapping(TOPICS[1], "Disabled")]},
        expected_params={"EventSourceArn": CLUSTER, "FunctionName": APPLIER, "Marker": "m2"},
    )
    health = aws.runtime().health()
    assert (health.connector, health.applier) == (PartState.RUNNING, PartState.PAUSED)
    aws.done()


# -- settings --------------------------------------------------------------------------------------
def test_settings_round_trip_and_accept_the_stacks_json() -> None:
    settings = _settings()
    assert MskChangeStreamSettings.from_json(settings.to_json()) == settings
    # CloudFormation renders numbers in the joined JSON as text or numbers alike
    raw = json.loads(settings.to_json())
    raw["custom_plugin_revision"] = "1"
    raw["batch_size"] = "500"
    assert MskChangeStreamSettings.from_json(json.dumps(raw)) == settings


def test_settings_refuse_another_backend_and_unknown_keys() -> None:
    raw = json.loads(_settings().to_json())
    with pytest.raises(ValueError, match=rf"{CHANGE_STREAM_ENV} describes backend 'local'"):
        MskChangeStreamSettings.from_json(json.dumps({**raw, "backend": "local"}))
    with pytest.raises(ValueError, match=r"unknown keys \['surprise'\]"):
        MskChangeStreamSettings.from_json(json.dumps({**raw, "surprise": 1}))


def test_each_topic_gets_its_own_consumer_group_within_lambdas_limit() -> None:
    settings = _settings()
    groups = {settings.consumer_group(t) for t in TOPICS}
    assert len(groups) == 2
    long_topic = "shop_events.public." + "t" * 240
    group = settings.consumer_group(long_topic)
    assert len(group) == 200 and group != settings.consumer_group(long_topic + "2")


def test_credentials_are_config_provider_references_never_the_password() -> None:
    user, password = _settings().credentials()
    assert password.startswith("${secretsmanager:arn%3Aaws%3Asecretsmanager%3Aeu-west-1%3A") and password.endswith(
        ":password}"
    )
    assert unquote(password.split(":")[1]) == SECRET  # the provider URL-decodes the path
    assert user == secret_reference(SECRET, "username")
    with pytest.raises(ValueError, match="no source_secret_arn"):
        _settings(source_secret_arn=None).credentials()


def test_the_given_connector_settings_win_over_the_stacks_defaults() -> None:
    runtime = MskChangeStream(None, None, _settings())  # type: ignore[arg-type]
    configuration = runtime.configuration(CONNECTOR_SETTINGS)
    assert configuration["tasks.max"] == "1"
    assert configuration["topic.creation.default.partitions"] == "1"
